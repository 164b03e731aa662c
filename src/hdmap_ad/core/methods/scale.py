"""Scale: the baseline's per-group losses and maps combined with softmax weights α (docs/design.md#m-scale).

Learnable: logits w ∈ R^G start at 0 (α uniform = the baseline) and get their own optimiser
group at `lr_mult` × the learning rate. Fixed (`learnable: false`): α = `weights`, normalised to
sum 1, so e.g. [1, 1] and [0.5, 0.5] mean the same thing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.method_params import ScaleParams
from hdmap_ad.core.methods.base import MethodContext, register
from hdmap_ad.core.methods.baseline import Baseline, hard_mining_info
from hdmap_ad.core.model import Reconstruction, global_cosine_hm_loss


@register
class Scale(Baseline):
    name = "scale"
    params: ScaleParams

    def __init__(self, params: ScaleParams, ctx: MethodContext) -> None:
        super().__init__(params, ctx)
        if params.learnable:
            self.logits = nn.Parameter(torch.zeros(ctx.num_groups))
        else:
            # The group count is known only once the model is configured, so checked here.
            if len(params.weights) != ctx.num_groups:
                raise HdmapError(
                    f"method scale: weights has {len(params.weights)} entries "
                    f"but model.fuse_groups has {ctx.num_groups} groups"
                )
            fixed = torch.tensor(params.weights, dtype=torch.float32)
            self.register_buffer("fixed_alpha", fixed / fixed.sum())

    def alpha(self) -> Tensor:
        """Group weights α (G, sums to 1)."""
        if self.params.learnable:
            return torch.softmax(self.logits.float(), dim=0)
        return self.fixed_alpha

    def loss(self, recon: Reconstruction, domain_ids: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        ratio = self.hard_mining_ratio(step)
        _, hm = global_cosine_hm_loss(recon, ratio, self.ctx.hard_mining_factor)  # hook registered here
        loss = (self.alpha() * hm["per_group"].float()).sum()
        return loss, hard_mining_info(ratio, hm["threshold"], self.ctx)

    def reduce_maps(self, maps: Tensor) -> Tensor:
        alpha = self.alpha().detach().to(device=maps.device, dtype=maps.dtype)
        return (maps * alpha.view(1, -1, 1, 1)).sum(dim=1, keepdim=True)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        if not self.params.learnable:
            return []
        # The loop sets each group's lr to schedule(step) × lr_mult; "lr" here is only the start value.
        return [
            {"params": [self.logits], "lr": lr * self.params.lr_mult, "lr_mult": self.params.lr_mult, "name": self.name}
        ]

    def diagnostics(self) -> dict[str, float]:
        if not self.params.learnable:
            return {}  # fixed weights do not move: they are params (constants), not curves
        return {f"scale/alpha_{g}": a for g, a in enumerate(self.alpha().detach().tolist())}

    def constants(self) -> dict[str, float]:
        if self.params.learnable:
            return {}
        return {f"scale.alpha_{g}": a for g, a in enumerate(self.fixed_alpha.tolist())}
