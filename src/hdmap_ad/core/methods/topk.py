"""TopK: train only on the hardest q % of points (group-averaged distance) of each batch (docs/design.md#m-topk).

q_t starts at 100 (every point, a warm start like the baseline's hard-mining ramp) and falls
linearly to q over `warmup` steps; k never drops below `min_k` so a small batch still averages
over enough points.
"""

from __future__ import annotations

import math

from torch import Tensor

from hdmap_ad.core.method_params import TopkParams
from hdmap_ad.core.methods.base import Method, register
from hdmap_ad.core.model import Reconstruction, group_distances


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
    params: TopkParams

    def loss(self, recon: Reconstruction, domain_ids: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        mean_dist = group_distances(recon).float().mean(dim=1).flatten()  # d̄ over all B·h·w points
        q_t = q_at(step, self.params.q, self.params.warmup)
        k = k_at(mean_dist.numel(), q_t, self.params.min_k)
        loss = mean_dist.topk(k, sorted=False).values.mean()
        # q_t and k move only while q_t ramps; without a warmup they are fixed by the settings (params)
        return loss, ({"topk/q": q_t, "topk/k": float(k)} if self.params.warmup > 0 else {})
