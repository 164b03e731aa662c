"""Focal: per group, a point-wise cosine loss weighted by the (detached) distance to the power γ (SPEC §3).

The weighting is a soft version of hard mining: badly reconstructed points dominate the loss, but
through the loss value rather than a gradient hook. γ = 0 is the plain mean point-wise distance.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from hdmap_ad.methods.base import Method, register
from hdmap_ad.model import Reconstruction, group_distances

# Guards Σw when every weight underflows to 0 (all points perfectly reconstructed, γ > 0).
TINY = 1e-12


class FocalParams(BaseModel):
    """`focal:` section of params.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gamma: float = Field(2.0, ge=0, description="focusing exponent; 0 = plain point-wise cosine loss")


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
    Params = FocalParams
    params: FocalParams

    def loss(self, recon: Reconstruction, domain_ids: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        per_group = focal_group_losses(group_distances(recon), self.params.gamma)
        info = {"focal/gamma": self.params.gamma}
        info.update({f"focal/loss_{g}": v for g, v in enumerate(per_group.detach().tolist())})  # one sync
        return per_group.mean(), info
