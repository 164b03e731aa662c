"""Uncertainty of a method-vs-baseline difference: intervals, DeLong, hierarchical bootstrap, power.

Companion of ``stats.py`` (docs/design.md#7-statistics, sections 7.6 to 7.9). Conventions:

- Δ = method − baseline, per seed; runs are paired by seed, so callers pass the per-seed differences
  (``diffs``) or score arrays whose row s is the same seed for both methods.
- Labels are 1 = fault (positive), 0 = good; a higher score means more anomalous; AUROC counts a tie
  between a fault and a good map as one half (as ``sklearn.metrics.roc_auc_score`` does).
- Every result is a dataclass, JSON-serialisable with ``dataclasses.asdict`` and NaN-free: a statistic
  that is undefined is None and ``note`` says "not computable: <why>". Nothing here raises on data
  (a wrongly shaped input, a programming error, still raises ValueError).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sst

__all__ = [
    "DeltaInterval",
    "paired_delta_interval",
    "DeLongResult",
    "delong_test",
    "PooledDeLongResult",
    "delong_pooled",
    "AurocScores",
    "BootstrapDelta",
    "HierarchicalBootstrapResult",
    "hierarchical_bootstrap_auroc",
    "Improvement",
    "probability_of_improvement",
    "SeedsNeeded",
    "paired_t_power",
    "seeds_needed",
    "describe_seeds_needed",
    "time_hierarchical_bootstrap",
]

NOT_COMPUTABLE = "not computable: "


def _finite_array(values: Sequence[float]) -> tuple[np.ndarray, int]:
    """The finite values as float64 and how many non-finite ones were dropped."""
    arr = np.asarray([float(v) if v is not None else math.nan for v in values], dtype=np.float64)
    ok = np.isfinite(arr)
    return arr[ok], int(np.count_nonzero(~ok))


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return confidence


def _opt(v: float) -> float | None:
    """float, or None when not finite (the NaN-free rule)."""
    return float(v) if v is not None and math.isfinite(float(v)) else None


# --------------------------------------------------------------------------------------------------
# 1. Interval for a paired Δ over seeds
# --------------------------------------------------------------------------------------------------


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
    confidence = _check_confidence(confidence)
    if boot_method not in ("percentile", "BCa", "basic"):
        raise ValueError(f"boot_method must be percentile, BCa or basic, got {boot_method!r}")
    d, dropped = _finite_array(diffs)
    notes: list[str] = []
    if dropped:
        notes.append(f"{dropped} non-finite difference(s) left out")
    res = DeltaInterval(
        n=int(d.size),
        delta=_opt(d.mean()) if d.size else None,
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
        res.t_low, res.t_high = _opt(d.mean() - half), _opt(d.mean() + half)
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
        res.boot_low, res.boot_high = _opt(boot.confidence_interval.low), _opt(boot.confidence_interval.high)
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


# --------------------------------------------------------------------------------------------------
# 2. DeLong's paired test (fast midrank form) and its pooled form over seeds
# --------------------------------------------------------------------------------------------------


@dataclass
class DeLongResult:
    """DeLong's test of AUROC(a) − AUROC(b) for two score sets on the same maps.

    ``se`` is the standard error of ``delta`` = auc_a − auc_b; z = delta/se; ``p`` two-sided normal;
    ``ci_low``/``ci_high`` = delta ± z_{1-(1-c)/2}·se. ``a`` is the method, ``b`` the baseline.
    """

    n_pos: int
    n_neg: int
    auc_a: float | None
    auc_b: float | None
    delta: float | None
    se: float | None
    z: float | None
    p: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float
    note: str = ""


def _labels_array(labels) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 (good) or 1 (fault)")
    return y.astype(bool)


def _placements(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUROCs and DeLong placement values for k score rows (Sun & Xu 2014, midrank form).

    pos: k × m fault scores, neg: k × n good scores. With midranks T_z over all m+n maps, T_x among the
    faults and T_y among the good maps: V10_i = (T_z,i − T_x,i)/n (the share of good maps a fault map
    beats, ties one half), V01_j = 1 − (T_z,j − T_y,j)/m, AUROC = mean(V10) = mean(V01). O((m+n) log(m+n))
    per row, from three sorts.
    """
    m, n = pos.shape[1], neg.shape[1]
    tz = sst.rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # average method = midranks
    tx = sst.rankdata(pos, axis=1)
    ty = sst.rankdata(neg, axis=1)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    auc = v10.mean(axis=1)
    return auc, v10, v01


def _delong_cov(v10: np.ndarray, v01: np.ndarray) -> np.ndarray:
    """Covariance matrix of the k AUROCs: S10/m + S01/n (sample covariances, ddof=1)."""
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10, ddof=1)) if m > 1 else np.zeros((v10.shape[0],) * 2)
    s01 = np.atleast_2d(np.cov(v01, ddof=1)) if n > 1 else np.zeros((v01.shape[0],) * 2)
    return s10 / m + s01 / n


def _contrast_test(
    delta: float, var: float, scale: float, confidence: float, notes: list[str]
) -> tuple[float | None, float | None, float | None, float | None, float | None]:
    """se, z, p, ci_low, ci_high of a normal test of ``delta`` with variance ``var``.

    A variance at or below rounding level of the variances it was formed from (``scale``) is zero: the
    two score sets rank every (fault, good) pair alike, and there is no test.
    """
    if not math.isfinite(var) or var <= 1e-12 * max(scale, 1e-300):
        notes.append(
            NOT_COMPUTABLE + "zero variance of the AUROC difference (both score sets order every "
            "fault/good pair alike, e.g. identical scores)"
        )
        return None, None, None, None, None
    se = math.sqrt(var)
    z = delta / se
    p = float(2.0 * sst.norm.sf(abs(z)))
    half = float(sst.norm.ppf(0.5 + confidence / 2)) * se
    return se, z, p, delta - half, delta + half


def delong_test(labels, scores_a, scores_b, confidence: float = 0.95) -> DeLongResult:
    """DeLong, DeLong & Clarke-Pearson (1988) paired test for two correlated AUROCs on the same maps.

    Fast midrank form (Sun & Xu 2014), O(N log N); ties count one half (midranks). a = method,
    b = baseline, delta = auc_a − auc_b. Not computable (fields None, note says why): a class missing,
    a non-finite score, or zero variance of the difference (identical scores, or both perfect).
    """
    confidence = _check_confidence(confidence)
    y = _labels_array(labels)
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.shape != y.shape or b.shape != y.shape:
        raise ValueError(f"labels {y.shape}, scores_a {a.shape} and scores_b {b.shape} must have one shape")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    res = DeLongResult(n_pos, n_neg, None, None, None, None, None, None, None, None, confidence)
    notes: list[str] = []
    if n_pos == 0 or n_neg == 0:
        res.note = NOT_COMPUTABLE + f"{n_pos} fault and {n_neg} good maps, AUROC needs both"
        return res
    bad = int(np.count_nonzero(~(np.isfinite(a) & np.isfinite(b))))
    if bad:
        res.note = NOT_COMPUTABLE + f"{bad} map(s) with a NaN/Inf score"
        return res
    scores = np.stack([a, b])
    auc, v10, v01 = _placements(scores[:, y], scores[:, ~y])
    cov = _delong_cov(v10, v01)
    res.auc_a, res.auc_b = float(auc[0]), float(auc[1])
    res.delta = res.auc_a - res.auc_b
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    res.se, res.z, res.p, res.ci_low, res.ci_high = _contrast_test(
        res.delta, var, float(cov[0, 0] + cov[1, 1]), confidence, notes
    )
    if n_pos < 2 or n_neg < 2:
        notes.append("fewer than 2 maps in a class: one variance component is zero, the test is unreliable")
    res.note = "; ".join(notes)
    return res


@dataclass
class PooledDeLongResult:
    """DeLong's contrast for mean over seeds of AUROC(method) − AUROC(baseline) on one shared test set.

    ``per_seed``: the per-seed DeLong tests. ``delta`` = mean of per-seed Δ; ``se`` from the full
    DeLong covariance of all 2·S AUROCs (which are correlated because they score the same maps);
    ``se_upper`` = √(mean of per-seed variances), the bound for perfectly correlated seeds, for reference.
    Conditional on the trained seeds: the seed-to-seed noise is not in ``se`` (docs/design.md#stats-delong).
    """

    seeds: list[int]
    n_pos: int
    n_neg: int
    per_seed: list[DeLongResult]
    auc_method_mean: float | None
    auc_baseline_mean: float | None
    delta: float | None
    se: float | None
    se_upper: float | None
    z: float | None
    p: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float
    note: str = ""


def delong_pooled(
    labels, scores_method, scores_baseline, seeds: Sequence[int] | None = None, confidence: float = 0.95
) -> PooledDeLongResult:
    """Pooled DeLong over seeds: scores_* are (n_seeds, n_maps), row s = seed s for both methods.

    Every seed scores the SAME maps, so the per-seed Δ are not independent and their DeLong variances
    cannot be added as if they were. The contrast c = (+1/S per method seed, −1/S per baseline seed)
    over all 2·S AUROCs is tested with DeLong's own covariance of correlated AUROCs (DeLong et al. 1988
    test any contrast L·θ): var = cᵀ(S10/m + S01/n)c, i.e. the variance of the seed-averaged placement
    differences. This is exact for the shared test set, is never larger than the mean of the per-seed
    variances (``se_upper``, the perfectly-correlated bound) and keeps the estimand (mean per-seed Δ)
    unlike DeLong on seed-averaged scores (the AUROC of an ensemble, a different quantity). It measures
    test-set sampling noise for these trained models only; seed-to-seed noise is in the t interval and
    both are in the hierarchical bootstrap. Seeds with a non-finite score are left out and said.
    """
    confidence = _check_confidence(confidence)
    y = _labels_array(labels)
    sm = np.atleast_2d(np.asarray(scores_method, dtype=np.float64))
    sb = np.atleast_2d(np.asarray(scores_baseline, dtype=np.float64))
    if sm.shape != sb.shape or sm.shape[1] != y.size:
        raise ValueError(f"scores_method {sm.shape} and scores_baseline {sb.shape} must both be (n_seeds, {y.size})")
    seed_ids = list(range(sm.shape[0])) if seeds is None else [int(s) for s in seeds]
    if len(seed_ids) != sm.shape[0]:
        raise ValueError(f"{len(seed_ids)} seeds for {sm.shape[0]} score rows")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    notes: list[str] = []
    per_seed = [delong_test(y.astype(int), sm[i], sb[i], confidence) for i in range(sm.shape[0])]
    ok = np.all(np.isfinite(sm), axis=1) & np.all(np.isfinite(sb), axis=1)
    if not ok.all():
        notes.append("seed(s) " + ", ".join(str(s) for s, k in zip(seed_ids, ok) if not k) + " left out: NaN/Inf score")
    used = [s for s, k in zip(seed_ids, ok) if k]
    res = PooledDeLongResult(
        used, n_pos, n_neg, per_seed, None, None, None, None, None, None, None, None, None, confidence
    )
    if n_pos == 0 or n_neg == 0:
        notes.append(NOT_COMPUTABLE + f"{n_pos} fault and {n_neg} good maps, AUROC needs both")
    elif not used:
        notes.append(NOT_COMPUTABLE + "no seed with finite scores")
    else:
        k = len(used)
        scores = np.concatenate([sm[ok], sb[ok]])  # rows 0..k-1 method, k..2k-1 baseline
        auc, v10, v01 = _placements(scores[:, y], scores[:, ~y])
        cov = _delong_cov(v10, v01)
        c = np.concatenate([np.full(k, 1.0 / k), np.full(k, -1.0 / k)])
        res.auc_method_mean, res.auc_baseline_mean = float(auc[:k].mean()), float(auc[k:].mean())
        res.delta = float(np.mean(auc[:k] - auc[k:]))  # = c·auc, without rounding residue for equal AUCs
        var = float(c @ cov @ c)
        per_var = np.diag(cov)[:k] + np.diag(cov)[k:] - 2.0 * np.diag(cov, k)
        res.se_upper = _opt(math.sqrt(max(float(per_var.mean()), 0.0)))
        res.se, res.z, res.p, res.ci_low, res.ci_high = _contrast_test(
            res.delta, var, float(np.diag(cov).mean()), confidence, notes
        )
        if k == 1:
            notes.append("one seed: the pooled test is that seed's DeLong test")
    res.note = "; ".join(notes)
    return res


# --------------------------------------------------------------------------------------------------
# 3. Hierarchical (seed × map) bootstrap of Δ AUROC
# --------------------------------------------------------------------------------------------------


@dataclass
class AurocScores:
    """One domain's test maps scored by every paired seed of both methods.

    labels: (n_maps,) 0 good / 1 fault; method, baseline: (n_seeds, n_maps), row s = the same seed.
    """

    labels: np.ndarray
    method: np.ndarray
    baseline: np.ndarray


@dataclass
class BootstrapDelta:
    """Δ AUROC (mean over seeds) with its hierarchical-bootstrap percentile interval.

    ``p_improvement``: share of replicates with Δ > 0; ``share_ties``: share with Δ exactly 0.
    """

    scope: str
    delta: float | None
    low: float | None
    high: float | None
    p_improvement: float | None
    share_ties: float | None
    note: str = ""


@dataclass
class HierarchicalBootstrapResult:
    """Per-domain and mean-over-domains results of one hierarchical bootstrap (shared seed resamples)."""

    n_seeds: int
    n_resamples: int
    confidence: float
    seed: int
    method: str
    domains: dict[str, BootstrapDelta] = field(default_factory=dict)
    mean: BootstrapDelta | None = None
    note: str = ""


class PreparedScores:
    """Per domain: for each (method, seed) row the presort needed by the weighted-AUROC kernel."""

    def __init__(self, scores: AurocScores):
        y = _labels_array(scores.labels)
        sm = np.atleast_2d(np.asarray(scores.method, dtype=np.float64))
        sb = np.atleast_2d(np.asarray(scores.baseline, dtype=np.float64))
        if sm.shape != sb.shape or sm.shape[1] != y.size:
            raise ValueError(f"method {sm.shape} and baseline {sb.shape} scores must both be (n_seeds, {y.size})")
        self.n_seeds = sm.shape[0]
        self.n_pos, self.n_neg = int(y.sum()), int((~y).sum())
        self.finite = bool(np.all(np.isfinite(sm)) and np.all(np.isfinite(sb)))
        self.identical = bool(np.array_equal(sm, sb))
        # rows 0..S-1 method, S..2S-1 baseline
        rows = np.concatenate([sm, sb])
        self.neg_order: list[np.ndarray] = []
        self.k_lo: list[np.ndarray] = []
        self.k_hi: list[np.ndarray | None] = []
        if self.finite and self.n_pos and self.n_neg:
            for r in rows:
                pos, neg = r[y], r[~y]
                order = np.argsort(neg, kind="stable")
                sneg = neg[order]
                self.neg_order.append(order.astype(np.intp))
                # number of good maps scored below / at most each fault map: the weighted count of good maps
                # a fault map beats is C[k_lo] + (C[k_hi] - C[k_lo]) / 2 with C the cumulative weight.
                self.k_lo.append(np.searchsorted(sneg, pos, side="left").astype(np.intp))
                hi = np.searchsorted(sneg, pos, side="right").astype(np.intp)
                self.k_hi.append(None if np.array_equal(hi, self.k_lo[-1]) else hi)


def _twice_weighted_auc_numerators(prep: PreparedScores, pos_w: np.ndarray, neg_w: np.ndarray) -> np.ndarray:
    """2·Σ_i Σ_j w_i w_j ([s_i > s_j] + ½[s_i = s_j]) per replicate and row: (B, 2·n_seeds) int64.

    pos_w (B, n_pos) and neg_w (B, n_neg) are integer map weights (resampling counts). Per row: one
    gather of the good-map weights into the row's presorted order, one cumulative sum, one gather per
    fault map (two where the row has ties): O(n) per replicate and row, in exact integers (so a Δ of
    exactly 0 is detected exactly). int32 while 2·n_pos·n_neg fits, which halves the memory traffic.
    """
    b = pos_w.shape[0]
    small = 2 * prep.n_pos * prep.n_neg < 2**31 - 1
    dt = np.int32 if small else np.int64
    pos_w, neg_w = pos_w.astype(dt, copy=False), neg_w.astype(dt, copy=False)
    out = np.empty((b, len(prep.neg_order)), dtype=np.int64)
    cum = np.zeros((b, prep.n_neg + 1), dtype=dt)
    for r, (order, lo, hi) in enumerate(zip(prep.neg_order, prep.k_lo, prep.k_hi)):
        np.cumsum(np.take(neg_w, order, axis=1), axis=1, dtype=dt, out=cum[:, 1:])
        beat = np.take(cum, lo, axis=1)
        if hi is None:  # no tie between a fault and a good map in this row: C[k_hi] = C[k_lo]
            out[:, r] = np.einsum("ij,ij->i", pos_w, beat) * 2
        else:
            beat += np.take(cum, hi, axis=1)
            out[:, r] = np.einsum("ij,ij->i", pos_w, beat)  # exact in dt: at most 2·n_pos·n_neg
    return out


def resample_counts(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    """(b, n) int64 counts of n draws with replacement from n items per row: Multinomial(n, 1/n each).

    Drawn as n uniform indices per row and counted (several times faster than Generator.multinomial,
    same distribution). Indices come from one float64 per draw, so the stream is consumed identically
    whatever the chunking (bounded-integer draws buffer 32-bit halves per call and would not be).
    """
    idx = (rng.random((b, n)) * n).astype(np.int64)
    np.minimum(idx, n - 1, out=idx)  # u·n can round up to n for u just below 1
    idx += (np.arange(b, dtype=np.int64) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)


def domain_replicate_deltas(
    prep: PreparedScores, seed_w: np.ndarray, pos_w: np.ndarray, neg_w: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Replicate Δ AUROC (float, (B,)) and its exact sign ((B,) int) for one domain.

    Δ_r = Σ_s seed_w[r, s]·(AUC_method,s − AUC_baseline,s) / S under the map weights of replicate r,
    the same map weights for every seed and both methods.
    """
    num = _twice_weighted_auc_numerators(prep, pos_w, neg_w)
    s = prep.n_seeds
    diff = num[:, :s] - num[:, s:]  # exact: 2·n_pos·n_neg·(AUC_m − AUC_b) per seed
    total = np.einsum("ij,ij->i", seed_w, diff, dtype=np.int64)
    delta = total / (2.0 * prep.n_pos * prep.n_neg * s)
    return delta, np.sign(total)


def hierarchical_bootstrap_auroc(
    domains: Mapping[str, AurocScores],
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
    chunk_size: int = 128,
) -> HierarchicalBootstrapResult:
    """Bootstrap of Δ AUROC over seeds and test maps: per domain and for the mean over domains.

    Each replicate draws (1) S seeds with replacement (multinomial counts, shared by all domains since a
    seed's model serves every domain) and (2) per domain, the fault maps and the good maps with
    replacement within their class (multinomial counts), ONE map draw shared by every seed and both
    methods. Seeds and maps are crossed (every seed scores every map), so the map draw must be shared:
    the test-set noise is common to all seeds and does not average out over them; drawing maps anew per
    seed would divide it by ~S and make the interval too narrow. Resampling both crossed factors
    independently is the "pigeonhole" bootstrap (Owen 2007), known to be slightly conservative (it
    counts the seed × map interaction twice). Pairing: within a replicate both methods get the same seeds
    and maps. Interval: percentile at ``confidence``. Point Δ: mean over seeds of AUROC_method −
    AUROC_baseline on the data as given. Mean scope: mean over domains of the per-domain Δ, per replicate.

    Weighted AUROC: the map counts are weights; per (method, seed) one presort of the good maps, then per
    replicate one cumulative sum of good-map weights and two gathers (ties count half), batched over
    ``chunk_size`` replicates to bound memory (a few arrays of chunk_size·n_maps integers; small chunks stay in cache).
    Reproducible: a given ``seed``, inputs and domain order give the same result for any chunk_size.
    Fewer than 2 seeds, a class missing, a non-finite score or identical scores: that scope is
    "not computable" (its interval None).
    """
    confidence = _check_confidence(confidence)
    if n_resamples < 1 or chunk_size < 1:
        raise ValueError(f"n_resamples ({n_resamples}) and chunk_size ({chunk_size}) must be positive")
    preps = {name: PreparedScores(sc) for name, sc in domains.items()}
    n_seeds = {p.n_seeds for p in preps.values()}
    if len(n_seeds) > 1:
        raise ValueError(f"every domain needs the same seeds, got row counts {sorted(n_seeds)}")
    s = n_seeds.pop() if n_seeds else 0
    res = HierarchicalBootstrapResult(
        n_seeds=s,
        n_resamples=int(n_resamples),
        confidence=confidence,
        seed=int(seed),
        method="hierarchical bootstrap (seeds × maps stratified "
        "by label, one map draw shared by all seeds), percentile interval",
    )
    alpha = (1.0 - confidence) / 2.0
    ok: dict[str, bool] = {}
    for name, p in preps.items():
        why = None
        if p.n_pos == 0 or p.n_neg == 0:
            why = f"{p.n_pos} fault and {p.n_neg} good maps, AUROC needs both"
        elif not p.finite:
            why = "a NaN/Inf score"
        point = None
        if why is None:
            num = _twice_weighted_auc_numerators(p, np.ones((1, p.n_pos), np.int64), np.ones((1, p.n_neg), np.int64))
            point = float((num[0, :s] - num[0, s:]).mean() / (2.0 * p.n_pos * p.n_neg))
            if s < 2:
                why = f"{s} seed(s), the seed level cannot be resampled"
            elif p.identical:
                why = "method and baseline scores are identical, every resample gives Δ = 0"
        res.domains[name] = BootstrapDelta(name, point, None, None, None, None, NOT_COMPUTABLE + why if why else "")
        ok[name] = why is None
        if p.identical and why is not None and p.finite and s >= 2 and p.n_pos and p.n_neg:
            res.domains[name].p_improvement, res.domains[name].share_ties = 0.0, 1.0
    if not preps:
        res.note = NOT_COMPUTABLE + "no domain"
        return res
    live = [n for n in preps if ok[n]]
    if not live:
        res.mean = BootstrapDelta(
            "mean", None, None, None, None, None, NOT_COMPUTABLE + "no domain with a computable bootstrap"
        )
        return res

    # Independent streams: the seed draw and each domain's fault/good draws, so a chunk's draws do not
    # depend on the chunk size (each stream is consumed row by row, in replicate order).
    streams = np.random.SeedSequence(int(seed)).spawn(1 + 2 * len(preps))
    seed_rng = np.random.default_rng(streams[0])
    map_rngs = {
        n: (np.random.default_rng(streams[1 + 2 * i]), np.random.default_rng(streams[2 + 2 * i]))
        for i, n in enumerate(preps)
    }
    deltas = {n: np.empty(n_resamples) for n in live}
    signs = {n: np.empty(n_resamples, dtype=np.int8) for n in live}
    for start in range(0, n_resamples, chunk_size):
        b = min(chunk_size, n_resamples - start)
        seed_w = resample_counts(seed_rng, b, s)
        for n in live:
            p = preps[n]
            rp, rn = map_rngs[n]
            pos_w, neg_w = resample_counts(rp, b, p.n_pos), resample_counts(rn, b, p.n_neg)
            d, sg = domain_replicate_deltas(p, seed_w, pos_w, neg_w)
            deltas[n][start : start + b] = d
            signs[n][start : start + b] = sg

    def summarise(scope: str, point: float | None, d: np.ndarray, sg: np.ndarray | None, note: str) -> BootstrapDelta:
        lo, hi = np.quantile(d, [alpha, 1.0 - alpha])
        pos = float(np.mean(sg > 0)) if sg is not None else float(np.mean(d > 0))
        tie = float(np.mean(sg == 0)) if sg is not None else float(np.mean(d == 0))
        return BootstrapDelta(scope, point, _opt(lo), _opt(hi), pos, tie, note)

    for n in live:
        res.domains[n] = summarise(n, res.domains[n].delta, deltas[n], signs[n], "")
    left = [n for n in preps if not ok[n]]
    mean_d = np.mean([deltas[n] for n in live], axis=0)
    point = float(np.mean([res.domains[n].delta for n in live]))
    note = "mean over " + ", ".join(live) + (f"; left out (not computable): {', '.join(left)}" if left else "")
    res.mean = summarise("mean", point, mean_d, None, note)
    if s < 10:
        res.note = (
            f"{s} seeds: the seed level has only {math.comb(2 * s - 1, s)} distinct resamples, so the "
            "seed part of the interval is coarse"
        )
    return res


def time_hierarchical_bootstrap(
    n_domains: int = 4,
    n_seeds: int = 5,
    n_good: int = 1000,
    n_fault: int = 1000,
    n_resamples: int = 10000,
    chunk_size: int = 128,
    seed: int = 0,
    ties: bool = True,
) -> dict[str, float | int | bool | None]:
    """Time ``hierarchical_bootstrap_auroc`` on synthetic scores of the given size (for the bench).

    Returns wall and CPU seconds (CPU time is the fairer figure on a shared machine), the sizes and the
    mean Δ found. With ``ties`` the scores are rounded to 3 decimals, so the slower tie path is timed.
    """
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_good, int), np.ones(n_fault, int)]
    doms = {}
    for k in range(n_domains):
        base = rng.normal(size=(n_seeds, labels.size)) + 2.0 * labels
        meth = base + 0.3 * rng.normal(size=base.shape) + 0.1 * labels
        if ties:
            base, meth = np.round(base, 3), np.round(meth, 3)
        doms[f"domain_{k}"] = AurocScores(labels, meth, base)
    t0, c0 = time.perf_counter(), time.process_time()
    out = hierarchical_bootstrap_auroc(doms, n_resamples=n_resamples, seed=seed, chunk_size=chunk_size)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "n_domains": n_domains,
        "n_seeds": n_seeds,
        "n_maps": int(labels.size),
        "n_resamples": n_resamples,
        "chunk_size": chunk_size,
        "ties": ties,
        "mean_delta": out.mean.delta if out.mean is not None else None,
    }


# --------------------------------------------------------------------------------------------------
# 4. Probability of improvement over paired seeds
# --------------------------------------------------------------------------------------------------


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
    d, dropped = _finite_array(diffs)
    res = Improvement(int(d.size), int(np.sum(d > 0)), int(np.sum(d < 0)), int(np.sum(d == 0)), None)
    notes = [f"{dropped} non-finite difference(s) left out"] if dropped else []
    if d.size == 0:
        notes.append(NOT_COMPUTABLE + "no paired seed")
    else:
        res.share_better = res.n_better / d.size
        if res.n_ties:
            notes.append(f"{res.n_ties} tie(s) (method = baseline) counted as not better")
    res.note = "; ".join(notes)
    return res


# --------------------------------------------------------------------------------------------------
# 5. Seeds needed for a paired t-test
# --------------------------------------------------------------------------------------------------


@dataclass
class SeedsNeeded:
    """Smallest n of paired seeds for the two-sided paired t-test to reach ``power`` at ``alpha``.

    ``n_needed`` None with ``more_than`` = max_seeds when even max_seeds is not enough. ``power_now`` is
    the power at the observed number of seeds. Plug-in: the observed Δ and sd stand for the true ones,
    and both are noisy at 5 seeds, so n_needed is a rough guide.
    """

    observed_n: int
    delta: float | None
    sd: float | None
    d_z: float | None
    alpha: float
    power: float
    n_needed: int | None
    achieved_power: float | None
    power_now: float | None
    more_than: int | None
    note: str = ""


def paired_t_power(n, d_z: float, alpha: float = 0.05) -> np.ndarray:
    """Power of the two-sided one-sample/paired t-test with n pairs at effect size d_z = Δ/sd.

    T ~ noncentral t(df = n − 1, nc = d_z·√n); power = P(T > t_crit) + P(T < −t_crit),
    t_crit = t_{1−α/2, n−1}. Vectorised over n (n ≥ 2).
    """
    n = np.asarray(n, dtype=np.float64)
    df = n - 1.0
    crit = sst.t.ppf(1.0 - alpha / 2.0, df)
    nc = d_z * np.sqrt(n)
    return sst.nct.sf(crit, df, nc) + sst.nct.cdf(-crit, df, nc)


def seeds_needed(diffs: Sequence[float], alpha: float = 0.05, power: float = 0.8, max_seeds: int = 1000) -> SeedsNeeded:
    """Seeds needed to detect the observed mean(diffs) given the observed sd(diffs, ddof=1).

    Smallest n ≥ 2 with paired_t_power(n, d_z, alpha) ≥ power, d_z = mean/sd, searched up to max_seeds.
    Not computable: fewer than 2 finite diffs, sd = 0 or Δ = 0.
    """
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"alpha ({alpha}) and power ({power}) must be in (0, 1)")
    if max_seeds < 2:
        raise ValueError(f"max_seeds must be at least 2, got {max_seeds}")
    d, dropped = _finite_array(diffs)
    notes = [f"{dropped} non-finite difference(s) left out"] if dropped else []
    res = SeedsNeeded(
        int(d.size), _opt(d.mean()) if d.size else None, None, None, float(alpha), float(power), None, None, None, None
    )
    if d.size < 2:
        notes.append(NOT_COMPUTABLE + f"{d.size} paired seed(s), the sd of the differences needs at least 2")
    else:
        sd = float(np.std(d, ddof=1))
        res.sd = sd
        if sd == 0.0:
            notes.append(NOT_COMPUTABLE + "all paired differences are equal (sd = 0)")
        elif float(d.mean()) == 0.0:
            notes.append(NOT_COMPUTABLE + "the observed Δ is 0, no sample size detects it")
        else:
            d_z = float(d.mean()) / sd
            res.d_z = d_z
            ns = np.arange(2, int(max_seeds) + 1)
            pw = paired_t_power(ns, d_z, alpha)
            res.power_now = _opt(paired_t_power(d.size, d_z, alpha))
            hit = np.nonzero(pw >= power)[0]
            if hit.size:
                res.n_needed = int(ns[hit[0]])
                res.achieved_power = float(pw[hit[0]])
            else:
                res.more_than = int(max_seeds)
                notes.append(f"more than {max_seeds} seeds needed")
    res.note = "; ".join(notes)
    return res


def describe_seeds_needed(res: SeedsNeeded, scope: str, scale: float = 100.0, unit: str = "pt") -> str:
    """One sentence for the report, e.g. 'to confirm a +0.40 pt gain on domain_C at α=0.05 (80 % power)
    you need ~12 paired seeds (power now 31 % with 5)'."""
    if res.delta is None or (res.n_needed is None and res.more_than is None):
        why = res.note.split(NOT_COMPUTABLE, 1)[-1] if NOT_COMPUTABLE in res.note else res.note
        return f"seeds needed on {scope}: not computable ({why})"
    word = "gain" if res.delta > 0 else "loss"
    head = (
        f"to confirm a {scale * res.delta:+.2f} {unit} {word} on {scope} at α={res.alpha:g} "
        f"({100 * res.power:.0f} % power) you need "
    )
    if res.n_needed is None:
        return head + f"more than {res.more_than} paired seeds"
    now = f" (power now {100 * res.power_now:.0f} % with {res.observed_n})" if res.power_now is not None else ""
    return head + f"~{res.n_needed} paired seeds{now}"
