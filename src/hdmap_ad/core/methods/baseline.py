"""Baseline Dinomaly: global cosine loss with hard mining, mean of group maps (docs/design.md#m-baseline)."""

from __future__ import annotations

from torch import Tensor

from hdmap_ad.core.methods.base import Method, MethodContext, register
from hdmap_ad.core.model import Reconstruction, global_cosine_hm_loss, hard_mining_ratio


def hard_mining_info(ratio: float, threshold: Tensor | float, ctx: MethodContext) -> dict[str, float]:
    """The hard-mining diagnostics: the threshold (a statistic of the batch), and the ratio while it
    ramps (with `hard_mining_ramp_steps` 0 it is the constant `hard_mining_max_ratio`, a param)."""
    info = {"hard_mining/threshold": float(threshold)}
    if ctx.hard_mining_ramp_steps > 0:
        info["hard_mining/ratio"] = ratio
    return info


@register
class Baseline(Method):
    name = "baseline"

    def hard_mining_ratio(self, step: int) -> float:
        return hard_mining_ratio(step, self.ctx.hard_mining_max_ratio, self.ctx.hard_mining_ramp_steps)

    def loss(self, recon: Reconstruction, domain_ids: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        ratio = self.hard_mining_ratio(step)
        loss, info = global_cosine_hm_loss(recon, ratio, self.ctx.hard_mining_factor)
        return loss, hard_mining_info(ratio, info["threshold"], self.ctx)
