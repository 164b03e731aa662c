"""Hierarchical (seeds × maps) bootstrap of Δ AUROC (docs/design.md#stats-bootstrap)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from hdmap_ad.pipeline.stats.common import NOT_COMPUTABLE, check_confidence, finite_or_none, labels_array
from hdmap_ad.pipeline.stats.equivalence import BayesProbabilities, distribution_probabilities


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
    # with a margin (docs/design.md#stats-equivalence): the (1 − α) and (1 − 2α) percentile intervals that
    # decide "different" and "equivalent", and P(worse), P(equivalent), P(better) as shares of replicates
    alpha: float | None = None
    test_low: float | None = None
    test_high: float | None = None
    tost_low: float | None = None
    tost_high: float | None = None
    probabilities: BayesProbabilities | None = None


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
        y = labels_array(scores.labels)
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


def twice_weighted_auc_numerators(prep: PreparedScores, pos_w: np.ndarray, neg_w: np.ndarray) -> np.ndarray:
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
    num = twice_weighted_auc_numerators(prep, pos_w, neg_w)
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
    margin: float | None = None,
    alpha: float = 0.05,
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
    With a ``margin`` each computable scope also gets its (1 − α) and (1 − 2α) percentile intervals and
    P(worse), P(equivalent), P(better) from the replicates (the inputs of the verdict).
    Fewer than 2 seeds, a class missing, a non-finite score or identical scores: that scope is
    "not computable" (its interval None).
    """
    confidence = check_confidence(confidence)
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
    if margin is not None and not (math.isfinite(margin) and margin > 0 and 0 < alpha < 0.5):
        raise ValueError(f"margin ({margin}) must be positive and alpha ({alpha}) in (0, 0.5)")
    tail = (1.0 - confidence) / 2.0
    ok: dict[str, bool] = {}
    for name, p in preps.items():
        why = None
        if p.n_pos == 0 or p.n_neg == 0:
            why = f"{p.n_pos} fault and {p.n_neg} good maps, AUROC needs both"
        elif not p.finite:
            why = "a NaN/Inf score"
        point = None
        if why is None:
            num = twice_weighted_auc_numerators(p, np.ones((1, p.n_pos), np.int64), np.ones((1, p.n_neg), np.int64))
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
        lo, hi = np.quantile(d, [tail, 1.0 - tail])
        pos = float(np.mean(sg > 0)) if sg is not None else float(np.mean(d > 0))
        tie = float(np.mean(sg == 0)) if sg is not None else float(np.mean(d == 0))
        out = BootstrapDelta(scope, point, finite_or_none(lo), finite_or_none(hi), pos, tie, note)
        if margin is not None:
            out.alpha = float(alpha)
            out.test_low, out.test_high, out.tost_low, out.tost_high = (
                float(q) for q in np.quantile(d, [alpha / 2, 1 - alpha / 2, alpha, 1 - alpha])
            )
            out.probabilities = distribution_probabilities(d, margin, "hierarchical bootstrap replicates", s)
        return out

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
