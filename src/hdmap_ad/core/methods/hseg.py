"""Hseg: horizontal segment dropout on the bottleneck input, training only (docs/design.md#m-hseg).

Aimed at faults that run along a map's rows: whole short runs of patch tokens in a row vanish from
the decoder's input (all channels, no 1/(1−p) rescaling), so it must rebuild them from the rows
above and below. The bottleneck MLP's own element dropout is lowered to `elem_p` meanwhile. Only the
bottleneck's input changes: the loss is whatever the rest of the method says (the baseline's alone,
topk's in `topk+hseg`). Evaluation is untouched: the hook does nothing in eval mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.method_params import HsegParams
from hdmap_ad.core.methods.base import register
from hdmap_ad.core.methods.baseline import Baseline
from hdmap_ad.core.methods.segments import row_segment_mask
from hdmap_ad.core.model import Dinomaly


def drop_row_segments(x: Tensor, prefix: int, grid: tuple[int, int], params: HsegParams) -> Tensor:
    """B×T×C tokens (`prefix` non-patch tokens first, then an h×w row-major grid) with row segments of
    the patch tokens zeroed; prefix tokens are kept."""
    b, t, c = x.shape
    h, w = grid
    if t - prefix != h * w:
        raise ValueError(f"hseg: {t - prefix} patch tokens do not fill the {h}x{w} grid")
    dropped = row_segment_mask((b,), h, w, params.row_p, params.seg_len, params.seg_drop_p, x.device)
    keep = (~dropped).reshape(b, h * w, 1).to(x.dtype)
    return torch.cat([x[:, :prefix], x[:, prefix:] * keep], dim=1)


@register
class Hseg(Baseline):
    name = "hseg"
    params: HsegParams

    def attach(self, model: Dinomaly) -> None:
        grid, prefix = model.grid, model.token_prefix
        if self.params.seg_len > grid[1]:
            raise HdmapError(
                f"hseg.seg_len: {self.params.seg_len} is longer than a token-grid row ({grid[1]} patches at "
                f"preprocess.crop {list(model.config.image_size)})"
            )
        for m in model.bottleneck.modules():
            if isinstance(m, nn.Dropout):
                m.p = self.params.elem_p

        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not module.training:
                return None
            return (drop_row_segments(args[0], prefix, grid, self.params), *args[1:])

        self._handle = model.bottleneck.register_forward_pre_hook(pre_hook)
