"""Is Δ practically zero? The paired TOST over seeds and the Bayesian correlated t-test with a region
of practical equivalence (docs/design.md#stats-equivalence).

A margin m > 0 (same unit as Δ) defines "practically equivalent": |Δ| ≤ m. Δ = method − baseline per
paired seed, higher = better.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sst

from hdmap_ad.pipeline.stats.common import NOT_COMPUTABLE, all_equal, finite_diffs, finite_or_none


def _check(margin: float, alpha: float) -> None:
    if not (math.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a positive number, got {margin}")
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")


@dataclass
class TostResult:
    """Two one-sided paired t-tests (Schuirmann 1987): H0 Δ ≤ −m (``p_lower``) and H0 Δ ≥ +m (``p_upper``).

    ``p`` = max of the two; ``equivalent`` when p < α, i.e. when the (1 − 2α) t interval
    [``low``, ``high``] lies inside (−m, +m).
    """

    n: int
    delta: float | None
    margin: float
    alpha: float
    t_lower: float | None = None
    p_lower: float | None = None
    t_upper: float | None = None
    p_upper: float | None = None
    p: float | None = None
    low: float | None = None
    high: float | None = None
    equivalent: bool | None = None
    note: str = ""


def tost_paired(diffs: Sequence[float], margin: float, alpha: float = 0.05) -> TostResult:
    """Paired TOST of the mean of ``diffs`` against ±margin at level α (df = n − 1, sd with ddof=1).

    Fewer than 2 finite diffs: not computable. All diffs equal (sd 0): the tests are degenerate; the
    mean is then known exactly on these seeds and ``equivalent`` is |Δ| < m, with no p-value.
    """
    _check(margin, alpha)
    d, notes = finite_diffs(diffs)
    res = TostResult(int(d.size), finite_or_none(d.mean()) if d.size else None, float(margin), float(alpha))
    if d.size < 2:
        notes.append(NOT_COMPUTABLE + f"{d.size} paired seed(s), TOST needs at least 2")
    else:
        n, mean, sd = d.size, float(d.mean()), float(np.std(d, ddof=1))
        if all_equal(d):
            res.low = res.high = mean
            res.equivalent = abs(mean) < margin
            notes.append("all paired differences are equal (sd = 0): no p-value, the interval is the point")
        else:
            se, df = sd / math.sqrt(n), n - 1
            res.t_lower, res.t_upper = (mean + margin) / se, (mean - margin) / se
            res.p_lower = float(sst.t.sf(res.t_lower, df))
            res.p_upper = float(sst.t.cdf(res.t_upper, df))
            res.p = max(res.p_lower, res.p_upper)
            half = float(sst.t.ppf(1.0 - alpha, df)) * se
            res.low, res.high = mean - half, mean + half
            res.equivalent = res.p < alpha
    res.note = "; ".join(notes)
    return res


@dataclass
class BayesProbabilities:
    """P(worse) = P(Δ < −m), P(equivalent) = P(|Δ| ≤ m), P(better) = P(Δ > m) of one posterior (or
    bootstrap) distribution of the mean Δ; ``n`` the seeds it rests on."""

    n: int
    margin: float
    p_worse: float | None = None
    p_equivalent: float | None = None
    p_better: float | None = None
    method: str = ""
    note: str = ""


def bayes_correlated_t(diffs: Sequence[float], margin: float, rho: float = 0.0) -> BayesProbabilities:
    """The Bayesian correlated t-test (Benavoli et al. 2017, JMLR 18(77); Corani & Benavoli 2015).

    With the non-informative prior the posterior of the mean Δ is Student t with n − 1 degrees of
    freedom, location mean(Δ) and scale sd(Δ)·√(1/n + ρ/(1 − ρ)) (sd with ddof=1). ρ is the correlation
    between the measurements: 0 for seeds that share no training data (our case; ρ = 1/k for k-fold
    cross-validation, baycomp's setting). All diffs equal: a point mass at the mean.
    """
    if not (math.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a positive number, got {margin}")
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho must be in [0, 1), got {rho}")
    d, notes = finite_diffs(diffs)
    res = BayesProbabilities(
        int(d.size), float(margin), method=f"Bayesian correlated t-test over seeds (ρ = {rho:g}, flat prior)"
    )
    if d.size < 2:
        notes.append(NOT_COMPUTABLE + f"{d.size} paired seed(s), the posterior needs at least 2")
    else:
        n, mean, sd = d.size, float(d.mean()), float(np.std(d, ddof=1))
        if all_equal(d):
            res.p_worse, res.p_better = float(mean < -margin), float(mean > margin)
            notes.append("all paired differences are equal (sd = 0): a point mass at the mean")
        else:
            scale = sd * math.sqrt(1.0 / n + rho / (1.0 - rho))
            res.p_worse = float(sst.t.cdf(-margin, n - 1, loc=mean, scale=scale))
            res.p_better = float(sst.t.sf(margin, n - 1, loc=mean, scale=scale))
        res.p_equivalent = max(0.0, 1.0 - res.p_worse - res.p_better)
    res.note = "; ".join(notes)
    return res


def distribution_probabilities(samples: np.ndarray, margin: float, method: str, n: int) -> BayesProbabilities:
    """The three probabilities as shares of a sample of Δ (e.g. the hierarchical bootstrap's replicates)."""
    s = np.asarray(samples, dtype=np.float64)
    worse, better = float(np.mean(s < -margin)), float(np.mean(s > margin))
    return BayesProbabilities(n, float(margin), worse, max(0.0, 1.0 - worse - better), better, method)
