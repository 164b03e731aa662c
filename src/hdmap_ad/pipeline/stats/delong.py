"""DeLong's paired test of two correlated AUROCs on the same maps, and its pooled form over seeds
(docs/design.md#stats-delong)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sst

from hdmap_ad.pipeline.stats.common import NOT_COMPUTABLE, check_confidence, finite_or_none, labels_array


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
    confidence = check_confidence(confidence)
    y = labels_array(labels)
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
    confidence = check_confidence(confidence)
    y = labels_array(labels)
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
        res.se_upper = finite_or_none(math.sqrt(max(float(per_var.mean()), 0.0)))
        res.se, res.z, res.p, res.ci_low, res.ci_high = _contrast_test(
            res.delta, var, float(np.diag(cov).mean()), confidence, notes
        )
        if k == 1:
            notes.append("one seed: the pooled test is that seed's DeLong test")
    res.note = "; ".join(notes)
    return res
