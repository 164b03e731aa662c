"""Focal: per group, a point-wise cosine loss weighted by the (detached) distance to the power γ.

See docs/design.md#m-focal.

The weighting is a soft version of hard mining: badly reconstructed points dominate the loss, but
through the loss value rather than a gradient hook. γ = 0 is the plain mean point-wise distance.
"""

from __future__ import annotations

from torch import Tensor

from hdmap_ad.core.method_params import FocalParams
from hdmap_ad.core.methods.base import Method, register
from hdmap_ad.core.model import Reconstruction, group_distances

# Guards Σw when every weight underflows to 0 (all points perfectly reconstructed, γ > 0).
TINY = 1e-12


def focal_group_losses(dist: Tensor, gamma: float) -> Tensor:
    """Per-group focal loss G from point distances B×G×h×w (with gradient)."""
    d = dist.float().flatten(2).transpose(0, 1).flatten(1)  # G×(B·h·w): one pool per group over the batch
    # Floor at 0 before the power: 1 - cos can round a hair below 0, and a negative base with a
    # fractional γ would give NaN. 0**0 = 1 keeps γ = 0 exactly the plain mean.
    w = d.detach().clamp_min(0).pow(gamma)
    return (w * d).sum(dim=1) / w.sum(dim=1).clamp_min(TINY)


@register
class Focal(Method):
    name = "focal"
    params: FocalParams

    def loss(self, recon: Reconstruction, domain_ids: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        per_group = focal_group_losses(group_distances(recon), self.params.gamma)
        # γ is a setting (the param focal.gamma), not a curve: only the per-group losses are logged
        info = {f"focal/loss_{g}": v for g, v in enumerate(per_group.detach().tolist())}  # one sync
        return per_group.mean(), info
