"""TopK: train only on the hardest q % of points (group-averaged distance) of each batch (SPEC §3).

q_t starts at 100 (every point, a warm start like the baseline's hard-mining ramp) and falls
linearly to q over `warmup` steps; k never drops below `min_k` so a small batch still averages
over enough points.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from hdmap_ad.methods.base import Method, register
from hdmap_ad.model import Reconstruction, group_distances


class TopkParams(BaseModel):
    """`topk:` section of params.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    q: float = Field(2.0, gt=0, le=100, description="final percentage of points kept")
    warmup: int = Field(200, ge=0, description="steps over which q_t falls linearly from 100 to q")
    min_k: int = Field(100, ge=1, description="lower bound on the number of points kept")


def q_at(step: int, q: float, warmup: int) -> float:
    """q_t: 100 at step 0, linear to q at step `warmup`, q afterwards (q at once when warmup = 0)."""
    if warmup <= 0 or step >= warmup:
        return float(q)
    return 100.0 + (q - 100.0) * step / warmup


def k_at(n_points: int, q_t: float, min_k: int) -> int:
    """k = max(min_k, ⌊N·q_t/100⌋), capped at N."""
    # The 1e-9 keeps exact products (e.g. N·q_t/100 = 20) from flooring to 19 by rounding.
    return min(n_points, max(min_k, math.floor(n_points * q_t / 100.0 + 1e-9)))


@register
class Topk(Method):
    name = "topk"
    Params = TopkParams
    params: TopkParams

    def loss(self, recon: Reconstruction, domain_ids: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        mean_dist = group_distances(recon).float().mean(dim=1).flatten()  # d̄ over all B·h·w points
        q_t = q_at(step, self.params.q, self.params.warmup)
        k = k_at(mean_dist.numel(), q_t, self.params.min_k)
        loss = mean_dist.topk(k, sorted=False).values.mean()
        return loss, {"topk/q": q_t, "topk/k": float(k)}
