"""Aux: the baseline plus an auxiliary domain classifier on the bottleneck output (docs/design.md#m-aux).

The head sees the mean of the bottleneck's patch tokens, so its cross-entropy shapes the
bottleneck (the shared representation all domains pass through) while the frozen encoder, whose
features are detached, is never touched. The anomaly score is the baseline's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.method_params import AuxParams
from hdmap_ad.core.methods.base import MethodContext, register
from hdmap_ad.core.methods.baseline import Baseline
from hdmap_ad.core.model import Reconstruction

# docs/design.md#model-init: init for every Linear of the trainable model; the head follows it for consistency.
INIT_STD, INIT_CUTOFF = 0.01, 0.03


def patch_token_mean(recon: Reconstruction) -> Tensor:
    """Mean over the patch tokens of the bottleneck output B×T×C → B×C (prefix tokens dropped).

    The number of patch tokens is read off the encoder group maps (h·w), so the prefix count
    (CLS + registers) needs no extra plumbing and stays right for any encoder.
    """
    h, w = recon.enc_groups[0].shape[-2:]
    tokens = recon.bottleneck_out
    if tokens.shape[1] < h * w:
        raise ValueError(f"bottleneck output has {tokens.shape[1]} tokens, fewer than the {h * w} patches")
    return tokens[:, tokens.shape[1] - h * w :, :].mean(dim=1)


@register
class Aux(Baseline):
    name = "aux"
    params: AuxParams

    def __init__(self, params: AuxParams, ctx: MethodContext) -> None:
        super().__init__(params, ctx)
        if len(ctx.domains) < 2:
            # One class makes the CE identically 0: the method would silently be the baseline.
            raise HdmapError(
                f"method aux needs at least 2 domains in data.domains to classify, got {list(ctx.domains)}"
            )
        self.head = nn.Sequential(nn.LayerNorm(ctx.embed_dim), nn.Linear(ctx.embed_dim, len(ctx.domains)))
        nn.init.trunc_normal_(self.head[1].weight, std=INIT_STD, a=-INIT_CUTOFF, b=INIT_CUTOFF)
        nn.init.zeros_(self.head[1].bias)
        # Train accuracy over the current logging window, kept as tensors to avoid a sync per step.
        self._correct = torch.zeros((), dtype=torch.long)
        self._seen = 0

    def logits(self, recon: Reconstruction) -> Tensor:
        return self.head(patch_token_mean(recon))

    def loss(self, recon: Reconstruction, domain_ids: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        base, info = super().loss(recon, domain_ids, step)
        logits = self.logits(recon)
        ce = F.cross_entropy(logits.float(), domain_ids)
        self._correct = self._correct.to(logits.device) + (logits.argmax(dim=1) == domain_ids).sum()
        self._seen += len(domain_ids)
        info.update({"aux/ce": float(ce.detach()), "aux/baseline_loss": float(base.detach())})
        return base + self.params.weight * ce, info

    def diagnostics(self) -> dict[str, float]:
        """Train domain accuracy over the batches since the last logging step (then reset)."""
        if self._seen == 0:
            return {}
        acc = float(self._correct) / self._seen
        self._correct, self._seen = torch.zeros((), dtype=torch.long), 0
        return {"aux/train_acc": acc}

    @torch.no_grad()
    def eval_batch(self, recon: Reconstruction, domain_ids: Tensor) -> dict[str, Tensor]:
        return {"domain_pred": self.logits(recon).argmax(dim=1)}
