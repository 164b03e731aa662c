"""Intervals of a paired Δ over seeds (docs/design.md#stats-intervals) and the share of seeds where the
method is better (docs/design.md#stats-power)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sst

from hdmap_ad.pipeline.stats.common import NOT_COMPUTABLE, check_confidence, finite_diffs, finite_or_none


@dataclass
class DeltaInterval:
    """Δ = mean of the per-seed differences with two intervals over seeds.

    ``t_low``/``t_high``: paired t interval, mean ± t_{1-(1-c)/2, n-1} · sd/√n (ddof=1).
    ``boot_low``/``boot_high``: ``scipy.stats.bootstrap`` of the mean over the seeds (``boot_method``,
    ``n_resamples``, generator seeded with ``seed``). Both only see seed-to-seed noise on one fixed test
    set; the hierarchical bootstrap adds the test-set noise (docs/design.md#stats-intervals).
    """

    n: int
    delta: float | None
    confidence: float
    t_low: float | None
    t_high: float | None
    boot_low: float | None
    boot_high: float | None
    boot_method: str
    n_resamples: int
    seed: int
    t_method: str = "paired t interval over seeds: mean(Δ) ± t(df=n−1)·sd(Δ, ddof=1)/√n"
    note: str = ""


def paired_delta_interval(
    diffs: Sequence[float],
    confidence: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
    boot_method: str = "percentile",
) -> DeltaInterval:
    """Paired t and bootstrap intervals for mean(diffs), diffs = method − baseline per paired seed.

    The bootstrap defaults to the percentile method: with the usual 5 seeds there are only 126 distinct
    resamples and BCa's jackknife acceleration is itself estimated from 5 values, so its correction is
    noise; ``boot_method`` may be "BCa" or "basic" (scipy's names). Either bootstrap interval is
    narrower than the t interval at small n (it uses the plug-in sd and normal-like quantiles), so at 5
    seeds it is the optimistic one of the two. Non-finite diffs are dropped and said. Fewer than 2
    values or all differences equal (zero variance) → both intervals None, "not computable: ...".
    """
    confidence = check_confidence(confidence)
    if boot_method not in ("percentile", "BCa", "basic"):
        raise ValueError(f"boot_method must be percentile, BCa or basic, got {boot_method!r}")
    d, notes = finite_diffs(diffs)
    res = DeltaInterval(
        n=int(d.size),
        delta=finite_or_none(d.mean()) if d.size else None,
        confidence=confidence,
        t_low=None,
        t_high=None,
        boot_low=None,
        boot_high=None,
        boot_method=boot_method,
        n_resamples=int(n_resamples),
        seed=int(seed),
    )
    if d.size < 2:
        notes.append(NOT_COMPUTABLE + f"{d.size} paired seed(s), an interval needs at least 2")
    elif np.all(d == d[0]):
        notes.append(NOT_COMPUTABLE + "all paired differences are equal (zero variance)")
    else:
        n = d.size
        half = float(sst.t.ppf(0.5 + confidence / 2, n - 1)) * float(np.std(d, ddof=1)) / math.sqrt(n)
        res.t_low, res.t_high = finite_or_none(d.mean() - half), finite_or_none(d.mean() + half)
        with warnings.catch_warnings():
            # scipy warns (and may return NaN) for BCa on tiny or degenerate samples; the NaN becomes None.
            warnings.simplefilter("ignore")
            boot = sst.bootstrap(
                (d,),
                np.mean,
                n_resamples=int(n_resamples),
                confidence_level=confidence,
                method=boot_method,
                vectorized=True,
                rng=np.random.default_rng(seed),
            )
        res.boot_low, res.boot_high = (
            finite_or_none(boot.confidence_interval.low),
            finite_or_none(boot.confidence_interval.high),
        )
        if res.boot_low is None or res.boot_high is None:
            res.boot_low = res.boot_high = None
            notes.append(NOT_COMPUTABLE + f"{boot_method} bootstrap interval undefined for these {n} values")
        if n < 10:
            notes.append(
                f"bootstrap over only {n} seeds: {math.comb(2 * n - 1, n)} distinct resamples, "
                "the interval is coarse and narrower than the t interval"
            )
    res.note = "; ".join(notes)
    return res


@dataclass
class Improvement:
    """Share of paired seeds where the method beats the baseline (ties and losses counted apart)."""

    n: int
    n_better: int
    n_worse: int
    n_ties: int
    share_better: float | None
    note: str = ""


def probability_of_improvement(diffs: Sequence[float]) -> Improvement:
    """Paired seeds with diff > 0, < 0 and == 0 (diff = method − baseline); share_better = n_better/n.

    Non-finite diffs are dropped and said; no diffs → share None. The bootstrap counterpart (share of
    replicates with Δ > 0) is ``BootstrapDelta.p_improvement``.
    """
    d, notes = finite_diffs(diffs)
    res = Improvement(int(d.size), int(np.sum(d > 0)), int(np.sum(d < 0)), int(np.sum(d == 0)), None)
    if d.size == 0:
        notes.append(NOT_COMPUTABLE + "no paired seed")
    else:
        res.share_better = res.n_better / d.size
        if res.n_ties:
            notes.append(f"{res.n_ties} tie(s) (method = baseline) counted as not better")
    res.note = "; ".join(notes)
    return res
