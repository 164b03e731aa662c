"""Vdrop: row-segment dropout of the values in the decoder's linear attention, training only
(docs/design.md#m-vdrop).

In the decoder blocks `apply_layers`, for a random ⌈head_ratio·heads⌉ of the heads of each sample,
row segments of the value tensor V are zeroed (Q and K untouched), so those heads' key-value summary
Σ φ(k_t) v_tᵀ is built without short horizontal runs of tokens. The row probability ramps in
linearly over `warmup_steps`. Evaluation is untouched: the hook does nothing in eval mode.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.method_params import VdropParams
from hdmap_ad.core.methods.base import MethodContext, register
from hdmap_ad.core.methods.baseline import Baseline
from hdmap_ad.core.methods.segments import row_segment_mask
from hdmap_ad.core.model import Dinomaly


def ramp(step: int, warmup_steps: int) -> float:
    """min(1, step / warmup_steps): the fraction of `row_p` in force at `step` (1 at once for 0 steps)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def value_drop_mask(
    batch: int, heads: int, grid: tuple[int, int], params: VdropParams, row_p: float, device: torch.device
) -> Tensor:
    """Bool mask B×heads×(h·w), True where a patch token's value row is zeroed: only in the
    ⌈head_ratio·heads⌉ heads drawn for each sample."""
    k = math.ceil(params.head_ratio * heads - 1e-9)  # the 1e-9 keeps e.g. 0.5·4 = 2 from rounding up to 3
    order = torch.rand(batch, heads, device=device).argsort(dim=1)
    chosen = torch.zeros(batch, heads, dtype=torch.bool, device=device).scatter_(1, order[:, :k], True)
    h, w = grid
    rows = row_segment_mask((batch, heads), h, w, row_p, params.band_width, params.seg_drop_p, device)
    return rows.reshape(batch, heads, h * w) & chosen.unsqueeze(-1)


def drop_values(qkv: Tensor, heads: int, prefix: int, mask: Tensor) -> Tensor:
    """The qkv projection's output B×T×3C (laid out as 3 × heads × d per token) with the value rows of
    `mask` (B×heads×N over the patch tokens) zeroed; queries, keys and prefix tokens are kept."""
    b, t, c3 = qkv.shape
    d = c3 // (3 * heads)
    factor = torch.ones(b, t, 3, heads, 1, dtype=qkv.dtype, device=qkv.device)
    factor[:, prefix:, 2] = (~mask).transpose(1, 2).unsqueeze(-1).to(qkv.dtype)
    return (qkv.view(b, t, 3, heads, d) * factor).view(b, t, c3)


@register
class Vdrop(Baseline):
    name = "vdrop"
    params: VdropParams

    def __init__(self, params: VdropParams, ctx: MethodContext) -> None:
        super().__init__(params, ctx)
        self._row_p = 0.0  # row_p in force this step (begin_step sets it)

    def begin_step(self, step: int) -> None:
        self._row_p = self.params.row_p * ramp(step, self.params.warmup_steps)

    def diagnostics(self) -> dict[str, float]:
        # row_p moves only while it ramps in; without a warmup it is the param vdrop.row_p
        return {"vdrop/row_p": self._row_p} if self.params.warmup_steps > 0 else {}

    def attach(self, model: Dinomaly) -> None:
        grid, prefix, depth = model.grid, model.token_prefix, len(model.decoder)
        bad = [i for i in self.params.apply_layers if i >= depth]
        if bad:
            raise HdmapError(
                f"vdrop.apply_layers: {bad} are not decoder blocks (model.decoder_depth is {depth}: 0..{depth - 1})"
            )
        if self.params.band_width > grid[1]:
            raise HdmapError(
                f"vdrop.band_width: {self.params.band_width} is longer than a token-grid row ({grid[1]} patches at "
                f"preprocess.crop {list(model.config.image_size)})"
            )
        self._handles = []
        for i in self.params.apply_layers:
            attn = model.decoder[i].attn
            heads = attn.num_heads

            def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor, heads: int = heads) -> Tensor | None:
                if not module.training:
                    return None
                mask = value_drop_mask(out.shape[0], heads, grid, self.params, self._row_p, out.device)
                return drop_values(out, heads, prefix, mask)

            self._handles.append(attn.qkv.register_forward_hook(hook))
