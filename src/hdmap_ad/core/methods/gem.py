"""GeM: a generalised mean over fuse groups instead of the plain mean, in the loss and the map.

See docs/design.md#m-gem.

With p > 1 the per-point value leans towards the worst-reconstructed group, so a point that one
scale reconstructs badly is not averaged away by the others; p = 1 is the plain mean.
"""

from __future__ import annotations

from torch import Tensor

from hdmap_ad.core.method_params import GemParams
from hdmap_ad.core.methods.base import Method, register
from hdmap_ad.core.methods.baseline import hard_mining_info
from hdmap_ad.core.model import Reconstruction, group_distances, hard_mining_ratio, scale_easy_gradients

# 1 - cos can come out a hair below 0 by rounding; a negative base breaks a fractional power, and
# 0 ** p has no useful gradient, so distances are floored here (docs/design.md#m-gem: max(d_g, 1e-6)).
MIN_DISTANCE = 1e-6


def generalized_mean(x: Tensor, p: float, dim: int = 1, keepdim: bool = False) -> Tensor:
    """(mean over `dim` of max(x, 1e-6)^p)^(1/p), computed in float32 (powers overflow bf16 quickly)."""
    return x.float().clamp_min(MIN_DISTANCE).pow(p).mean(dim=dim, keepdim=keepdim).pow(1.0 / p)


@register
class Gem(Method):
    name = "gem"
    params: GemParams

    def loss(self, recon: Reconstruction, domain_ids: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        per_point = generalized_mean(group_distances(recon), self.params.p, dim=1)  # B×h×w
        ratio = hard_mining_ratio(step, self.ctx.hard_mining_max_ratio, self.ctx.hard_mining_ramp_steps)
        # Hard mining on G itself: scaling dL/dG at easy points scales every group's gradient there.
        threshold = scale_easy_gradients(per_point, per_point.detach(), ratio, self.params.factor)
        return per_point.mean(), hard_mining_info(ratio, threshold, self.ctx)

    def reduce_maps(self, maps: Tensor) -> Tensor:
        return generalized_mean(maps, self.params.p, dim=1, keepdim=True)
