"""Uncertainty statistics (pipeline/stats/: intervals, DeLong, bootstrap, power) against independent references: scipy, sklearn,
slow direct O(n²) formulas written here, a published worked example, and seeded simulations."""

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy import stats as sst
from sklearn.metrics import roc_auc_score

from hdmap_ad.pipeline.stats import (
    AurocScores,
    PreparedScores,
    delong_pooled,
    delong_test,
    describe_seeds_needed,
    domain_replicate_deltas,
    hierarchical_bootstrap_auroc,
    paired_delta_interval,
    paired_t_power,
    probability_of_improvement,
    resample_counts,
    seeds_needed,
    twice_weighted_auc_numerators,
)


def _auc(y, s) -> float:
    """Direct Mann-Whitney AUROC, ties one half (faster than roc_auc_score inside simulation loops)."""
    y = np.asarray(y).astype(bool)
    x, z = s[y], s[~y]
    return float(((x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])).mean())


def _json_ok(obj) -> None:
    json.dumps(dataclasses.asdict(obj), allow_nan=False)


# ------------------------------------------------------------------ paired Δ interval over seeds


def test_t_interval_matches_scipy_ttest_rel_interval():
    base = np.array([0.971, 0.965, 0.980, 0.958, 0.975])
    meth = np.array([0.982, 0.970, 0.981, 0.969, 0.990])
    for conf in (0.95, 0.9):
        r = paired_delta_interval(meth - base, confidence=conf, n_resamples=2000, seed=3)
        ref = sst.ttest_rel(meth, base).confidence_interval(conf)
        assert r.t_low == pytest.approx(ref.low, rel=1e-12) and r.t_high == pytest.approx(ref.high, rel=1e-12)
        assert r.delta == pytest.approx(np.mean(meth - base))
        boot = sst.bootstrap(
            ((meth - base),),
            np.mean,
            n_resamples=2000,
            confidence_level=conf,
            method="percentile",
            rng=np.random.default_rng(3),
        )
        assert r.boot_low == pytest.approx(boot.confidence_interval.low)
        assert r.boot_high == pytest.approx(boot.confidence_interval.high)
        # percentile interval of a mean lies within the data's range and is narrower than t at n = 5
        assert (meth - base).min() <= r.boot_low < r.boot_high <= (meth - base).max()
        assert r.boot_high - r.boot_low < r.t_high - r.t_low
        assert r.confidence == conf and r.n == 5
        _json_ok(r)
    again = paired_delta_interval(meth - base, confidence=0.9, n_resamples=2000, seed=3)
    assert dataclasses.asdict(again) == dataclasses.asdict(r)  # seeded: reproducible


def test_interval_degenerate_cases_are_not_computable():
    one = paired_delta_interval([0.01])
    assert one.delta == pytest.approx(0.01) and one.t_low is None and one.boot_low is None
    assert "not computable" in one.note and "at least 2" in one.note
    equal = paired_delta_interval([0.25, 0.25, 0.25])
    assert equal.t_low is None and equal.boot_high is None and "zero variance" in equal.note
    none = paired_delta_interval([])
    assert none.delta is None and "not computable" in none.note
    nan = paired_delta_interval([0.01, float("nan"), 0.03, None])
    assert nan.n == 2 and "2 non-finite" in nan.note and nan.t_low is not None
    bca = paired_delta_interval([0.01, 0.02, 0.02], boot_method="BCa", n_resamples=500)
    for r in (one, equal, none, nan, bca):
        _json_ok(r)
    assert (bca.boot_low is None) == ("not computable" in bca.note)


def test_t_interval_coverage_and_why_seed_only_intervals_are_not_enough():
    """Per-seed Δ_s = Δ + T + ε_s: T is the test-set effect shared by every seed, ε the seed noise.

    The t interval over seeds targets Δ + T (the mean over seeds on this test set) and covers it in 95 %
    of repetitions; against the population Δ it under-covers, because it never sees T. 400 repetitions:
    Monte-Carlo SE of a 95 % coverage is 1.1 %, band ±3 SE = [0.917, 0.983].
    """
    rng = np.random.default_rng(7)
    reps, n, true = 400, 5, 0.004
    t_shared = rng.normal(0, 0.003, size=reps)
    eps = rng.normal(0, 0.003 * math.sqrt(n), size=(reps, n))
    hit_cond = hit_pop = 0
    for k in range(reps):
        r = paired_delta_interval(true + t_shared[k] + eps[k], n_resamples=50, seed=k)
        hit_cond += r.t_low <= true + t_shared[k] <= r.t_high
        hit_pop += r.t_low <= true <= r.t_high
    assert 0.917 <= hit_cond / reps <= 0.983
    # T as large as the seed noise of the mean: the error has twice the variance the interval assumes, so
    # coverage of Δ is P(|t_4| < t_4,0.975/√2) = 0.879 instead of 0.95 (band ±3 Monte-Carlo SE of 1.6 %)
    expected = 2 * sst.t.cdf(sst.t.ppf(0.975, n - 1) / math.sqrt(2), n - 1) - 1
    assert hit_pop / reps == pytest.approx(expected, abs=0.05) and hit_pop / reps < 0.92


# ------------------------------------------------------------------ DeLong


def _slow_delong(y, a, b):
    """Direct O(m·n) structural components (DeLong et al. 1988): ψ = 1, ½, 0 for >, =, <."""
    y = np.asarray(y).astype(bool)
    out = []
    for s in (a, b):
        x, z = np.asarray(s, float)[y], np.asarray(s, float)[~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        out.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    (auc_a, v10a, v01a), (auc_b, v10b, v01b) = out
    m, n = v10a.size, v01a.size
    s10 = np.cov(np.vstack([v10a, v10b]))
    s01 = np.cov(np.vstack([v01a, v01b]))
    cov = s10 / m + s01 / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    return auc_a, auc_b, math.sqrt(var)


@pytest.mark.parametrize("m,n,levels", [(30, 45, None), (200, 150, 7), (5, 3, 3), (400, 600, None)])
def test_delong_matches_slow_structural_components_and_sklearn(m, n, levels):
    rng = np.random.default_rng(m * 1000 + n)
    y = np.r_[np.ones(m, int), np.zeros(n, int)]
    rng.shuffle(y)
    a = rng.normal(size=m + n) + 1.0 * y
    b = 0.6 * a + rng.normal(size=m + n) + 0.5 * y
    if levels:  # heavy ties, within and across classes
        a, b = np.round(a * levels / 4), np.round(b * levels / 4)
    r = delong_test(y, a, b)
    auc_a, auc_b, se = _slow_delong(y, a, b)
    assert r.auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert r.auc_b == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert r.auc_a == pytest.approx(auc_a, abs=1e-12) and r.auc_b == pytest.approx(auc_b, abs=1e-12)
    assert r.se == pytest.approx(se, abs=1e-9)
    assert r.z == pytest.approx((auc_a - auc_b) / se, abs=1e-9)
    assert r.p == pytest.approx(2 * sst.norm.sf(abs(r.z)), abs=1e-12)
    assert r.ci_low == pytest.approx(r.delta - 1.959963984540054 * se, abs=1e-9)
    assert (r.n_pos, r.n_neg) == (m, n)
    _json_ok(r)


# aSAH data set (113 patients after aneurysmal subarachnoid haemorrhage; Turck et al. 2010, Intensive
# Care Med 36:107) as distributed with the R package pROC, whose documented DeLong example is
# roc.test(roc(outcome, wfns), roc(outcome, s100b)): Z = 2.20898359144091, p = 0.0271757822291882,
# 95 % CI of the AUC difference 0.0104061769564846 .. 0.174214419249478, AUCs 0.8237 and 0.7314.
ASAH_POOR = (
    "00001101001011001011101000000000100110110000000001100010001010011101101111000110100000010000000000001111110001000"
)
ASAH_WFNS = (
    "11113254125255125225211112121134214541425511241125521251222151125214524414121421232421451154221113125225552445111"
)
ASAH_S100B_HUNDREDTHS = """\
13 14 10 4 13 10 47 16 18 10 12 10 44 71 4 8 49 4 7 33 9 9 7 11 7 17 7 11 13 19 5 16 41 14 34 35 48
9 96 25 50 46 16 7 43 45 11 8 9 86 52 8 6 13 207 10 14 15 7 6 77 5 9 30 3 9 4 23 70 9 27 71 8 26 8
16 9 13 10 8 11 33 11 28 7 10 32 22 7 5 24 38 10 15 8 14 10 7 4 19 56 14 58 32 82 74 15 47 17 44 15
50 48"""


def test_delong_reproduces_the_published_proc_asah_example():
    y = np.array([int(c) for c in ASAH_POOR])
    wfns = np.array([int(c) for c in ASAH_WFNS], float)
    s100b = np.array([int(v) for v in ASAH_S100B_HUNDREDTHS.split()]) / 100
    assert y.size == wfns.size == s100b.size == 113 and y.sum() == 41
    r = delong_test(y, wfns, s100b)
    assert r.auc_a == pytest.approx(0.8236789, abs=5e-8) and r.auc_b == pytest.approx(0.7313686, abs=5e-8)
    assert r.z == pytest.approx(2.20898359144091, abs=1e-9)
    assert r.p == pytest.approx(0.0271757822291882, abs=1e-12)
    assert r.ci_low == pytest.approx(0.0104061769564846, abs=1e-9)
    assert r.ci_high == pytest.approx(0.174214419249478, abs=1e-9)
    swapped = delong_test(y, s100b, wfns)
    assert swapped.z == pytest.approx(-r.z) and swapped.p == pytest.approx(r.p)


def test_delong_degenerate_cases_are_not_computable():
    y = np.r_[np.ones(10, int), np.zeros(12, int)]
    s = np.random.default_rng(0).normal(size=22)
    same = delong_test(y, s, s.copy())
    assert same.delta == 0.0 and same.se is None and same.z is None and same.p is None
    assert "not computable" in same.note and "zero variance" in same.note
    perfect = delong_test(y, y + 0.1 * s, y * 2.0)  # both separate perfectly: AUC 1 and 1, no variance
    assert perfect.auc_a == perfect.auc_b == 1.0 and perfect.p is None and "not computable" in perfect.note
    one_class = delong_test(np.ones(5, int), s[:5], s[5:10])
    assert one_class.auc_a is None and "not computable" in one_class.note
    nan = delong_test(y, np.where(np.arange(22) == 3, np.nan, s), s)
    assert nan.auc_a is None and "NaN" in nan.note
    for r in (same, perfect, one_class, nan):
        _json_ok(r)


def test_pooled_delong_is_the_contrast_over_all_seeds():
    rng = np.random.default_rng(11)
    m, n, seeds = 40, 50, 4
    y = np.r_[np.ones(m, int), np.zeros(n, int)]
    shared = rng.normal(size=m + n) + y  # the test set's own difficulty, common to all seeds
    sm = shared + 0.5 * rng.normal(size=(seeds, m + n)) + 0.3 * y
    sb = shared + 0.5 * rng.normal(size=(seeds, m + n))
    r = delong_pooled(y, sm, sb, seeds=[42, 43, 44, 45])
    # slow reference: per-seed O(m·n) placements, averaged contrast, its variance
    v10 = np.zeros(m)
    v01 = np.zeros(n)
    deltas = []
    for s in range(seeds):
        for sign, row in ((1, sm[s]), (-1, sb[s])):
            x, z = row[:m], row[m:]
            psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
            v10 += sign * psi.mean(axis=1) / seeds
            v01 += sign * psi.mean(axis=0) / seeds
        deltas.append(roc_auc_score(y, sm[s]) - roc_auc_score(y, sb[s]))
    se = math.sqrt(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)
    assert r.delta == pytest.approx(np.mean(deltas), abs=1e-12)
    assert r.se == pytest.approx(se, abs=1e-9)
    assert r.p == pytest.approx(2 * sst.norm.sf(abs(r.delta / se)), abs=1e-12)
    assert [p.delta for p in r.per_seed] == pytest.approx(deltas, abs=1e-12)
    per_se = np.array([p.se for p in r.per_seed])
    assert r.se_upper == pytest.approx(math.sqrt(np.mean(per_se**2)), abs=1e-12)
    assert r.se <= r.se_upper + 1e-15
    assert r.seeds == [42, 43, 44, 45]
    _json_ok(r)
    # identical seeds: the contrast is that seed's own test (no spurious 1/S shrinkage of the variance)
    rep = delong_pooled(y, np.repeat(sm[:1], 3, axis=0), np.repeat(sb[:1], 3, axis=0))
    assert rep.se == pytest.approx(r.per_seed[0].se, abs=1e-12)
    one = delong_pooled(y, sm[:1], sb[:1])
    assert one.se == pytest.approx(r.per_seed[0].se, abs=1e-12) and "one seed" in one.note


def test_pooled_delong_degenerate_and_bad_seeds():
    y = np.r_[np.ones(6, int), np.zeros(6, int)]
    s = np.random.default_rng(1).normal(size=(3, 12))
    same = delong_pooled(y, s, s.copy())
    assert same.delta == 0.0 and same.p is None and "not computable" in same.note
    bad = s.copy()
    bad[1, 4] = np.inf
    left = delong_pooled(y, bad, s + 0.1 * y, seeds=[7, 8, 9])
    assert left.seeds == [7, 9] and "8 left out" in left.note and left.se is not None
    assert left.per_seed[1].auc_a is None
    _json_ok(left)
    _json_ok(same)


# ------------------------------------------------------------------ hierarchical bootstrap


def test_weighted_auc_kernel_matches_sklearn_on_expanded_resamples():
    rng = np.random.default_rng(5)
    m, n, seeds = 23, 31, 2
    y = np.r_[np.ones(m, int), np.zeros(n, int)]
    sm = np.round(rng.normal(size=(seeds, m + n)) + y, 1)  # ties within and across classes
    sb = rng.normal(size=(seeds, m + n)) + 0.5 * y  # no ties
    prep = PreparedScores(AurocScores(y, sm, sb))
    assert prep.k_hi[0] is not None and prep.k_hi[seeds] is None  # both kernel paths are exercised
    pos_w, neg_w = resample_counts(rng, 6, m), resample_counts(rng, 6, n)
    num = twice_weighted_auc_numerators(prep, pos_w, neg_w)
    rows = np.concatenate([sm, sb])
    for b in range(6):
        w = np.r_[pos_w[b], neg_w[b]]
        for r in range(2 * seeds):
            ref = roc_auc_score(np.repeat(y, w), np.repeat(rows[r], w))
            assert num[b, r] / (2 * m * n) == pytest.approx(ref, abs=1e-12)
    seed_w = np.array([[2, 0], [1, 1], [0, 2], [1, 1], [2, 0], [0, 2]])
    delta, sign = domain_replicate_deltas(prep, seed_w, pos_w, neg_w)
    for b in range(6):
        w = np.r_[pos_w[b], neg_w[b]]
        per = [
            roc_auc_score(np.repeat(y, w), np.repeat(sm[s], w)) - roc_auc_score(np.repeat(y, w), np.repeat(sb[s], w))
            for s in range(seeds)
        ]
        assert delta[b] == pytest.approx(np.dot(seed_w[b], per) / seeds, abs=1e-12)
        assert sign[b] == np.sign(round(delta[b], 12))


def test_resample_counts_are_multinomial():
    counts = resample_counts(np.random.default_rng(0), 4000, 50)
    assert counts.shape == (4000, 50) and np.all(counts.sum(axis=1) == 50)
    # Multinomial(n, 1/n): each cell mean 1 and variance (1 − 1/n), cells negatively correlated −1/n
    assert counts.mean() == pytest.approx(1.0, abs=1e-12)
    assert counts.var(axis=0).mean() == pytest.approx(1 - 1 / 50, rel=0.03)
    assert np.corrcoef(counts[:, 0], counts[:, 1])[0, 1] == pytest.approx(-1 / 49, abs=0.03)


def _synthetic_domain(rng, seeds, m, n, gain=0.3):
    y = np.r_[np.ones(m, int), np.zeros(n, int)]
    shared = rng.normal(size=m + n)
    sb = shared + y + 0.7 * rng.normal(size=(seeds, m + n))
    sm = shared + (1 + gain) * y + 0.7 * rng.normal(size=(seeds, m + n))
    return AurocScores(y, sm, sb)


def test_hierarchical_bootstrap_point_reproducibility_and_chunk_invariance():
    rng = np.random.default_rng(3)
    doms = {"a": _synthetic_domain(rng, 4, 30, 40), "b": _synthetic_domain(rng, 4, 25, 25, gain=-0.2)}
    r1 = hierarchical_bootstrap_auroc(doms, n_resamples=300, seed=9, chunk_size=7)
    r2 = hierarchical_bootstrap_auroc(doms, n_resamples=300, seed=9, chunk_size=1000)
    assert dataclasses.asdict(r1) == dataclasses.asdict(r2)
    r3 = hierarchical_bootstrap_auroc(doms, n_resamples=300, seed=10)
    assert r3.domains["a"].low != r1.domains["a"].low
    for name, d in doms.items():
        ref = np.mean([roc_auc_score(d.labels, d.method[s]) - roc_auc_score(d.labels, d.baseline[s]) for s in range(4)])
        b = r1.domains[name]
        assert b.delta == pytest.approx(ref, abs=1e-12)
        assert b.low < b.delta < b.high and 0.0 <= b.p_improvement <= 1.0 and b.share_ties is not None
    assert r1.mean.delta == pytest.approx((r1.domains["a"].delta + r1.domains["b"].delta) / 2, abs=1e-12)
    assert r1.domains["a"].p_improvement > 0.5 > r1.domains["b"].p_improvement
    assert r1.n_seeds == 4 and r1.n_resamples == 300 and "distinct resamples" in r1.note
    _json_ok(r1)


def test_hierarchical_bootstrap_spread_matches_a_slow_direct_resampler():
    """Independent direct implementation: index resampling + sklearn, one shared map draw per replicate."""
    rng = np.random.default_rng(21)
    seeds, m, n = 3, 30, 30
    d = _synthetic_domain(rng, seeds, m, n)
    fast = hierarchical_bootstrap_auroc({"d": d}, n_resamples=3000, seed=1).domains["d"]
    slow_rng = np.random.default_rng(2)
    pos, neg = np.arange(m), np.arange(m, m + n)
    reps = []
    for _ in range(800):
        ss = slow_rng.integers(0, seeds, size=seeds)
        idx = np.r_[slow_rng.choice(pos, m), slow_rng.choice(neg, n)]
        yy = d.labels[idx]
        reps.append(np.mean([_auc(yy, d.method[s, idx]) - _auc(yy, d.baseline[s, idx]) for s in ss]))
    lo, hi = np.quantile(reps, [0.025, 0.975])
    # Monte-Carlo error of 2.5 % quantiles from 800 draws is a few % of the width: 15 % tolerance
    assert fast.high - fast.low == pytest.approx(hi - lo, rel=0.15)
    assert fast.p_improvement == pytest.approx(np.mean(np.array(reps) > 0), abs=0.05)


def test_hierarchical_bootstrap_degenerate_cases_are_not_computable():
    rng = np.random.default_rng(0)
    d = _synthetic_domain(rng, 3, 10, 10)
    same = hierarchical_bootstrap_auroc({"d": AurocScores(d.labels, d.baseline, d.baseline.copy())}, n_resamples=50)
    b = same.domains["d"]
    assert b.delta == 0.0 and b.low is None and b.high is None and "not computable" in b.note
    assert b.p_improvement == 0.0 and b.share_ties == 1.0
    assert same.mean.low is None and "not computable" in same.mean.note
    one = hierarchical_bootstrap_auroc({"d": AurocScores(d.labels, d.method[:1], d.baseline[:1])}, n_resamples=50)
    assert one.domains["d"].low is None and "1 seed(s)" in one.domains["d"].note
    assert one.domains["d"].delta == pytest.approx(
        roc_auc_score(d.labels, d.method[0]) - roc_auc_score(d.labels, d.baseline[0])
    )
    nan_scores = d.method.copy()
    nan_scores[0, 0] = np.nan
    mixed = hierarchical_bootstrap_auroc(
        {"bad": AurocScores(d.labels, nan_scores, d.baseline), "good": d}, n_resamples=50
    )
    assert mixed.domains["bad"].delta is None and "NaN" in mixed.domains["bad"].note
    assert mixed.domains["good"].low is not None and "left out (not computable): bad" in mixed.mean.note
    one_class = hierarchical_bootstrap_auroc({"d": AurocScores(np.ones(20, int), d.method, d.baseline)}, n_resamples=50)
    assert "not computable" in one_class.domains["d"].note
    for r in (same, one, mixed, one_class):
        _json_ok(r)
    with pytest.raises(ValueError):
        hierarchical_bootstrap_auroc({"a": d, "b": AurocScores(d.labels, d.method[:2], d.baseline[:2])})


def test_hierarchical_bootstrap_coverage_with_seed_and_shared_test_set_noise():
    """Known population Δ, seed noise and test-set noise of the same order (as on the real data).

    Binormal scores: fault = μ_k + u_s,k + a_i + α_i,k + e, good = b_j + β_j,k + e, where a, b are map
    effects shared by all seeds and both methods, α, β map × method effects shared by all seeds (the
    test-set noise of Δ), u the seed effect, e the per-run noise. Population AUROC of a run is
    Φ((μ_k + u)/c), c² = 2·Var(map + map×method + e), so over seeds E[AUROC_k] = Φ(μ_k/√(c² + Var u)).
    300 repetitions at 5 seeds × 60 + 60 maps, 200 resamples each. Band [0.90, 0.99]: Monte-Carlo SE of
    a 95 % coverage is 1.3 % (±3 SE = [0.91, 0.99]), widened below by one point because with 5 seeds the
    percentile bootstrap is known to under-cover the seed part a little (plug-in variance ×(n−1)/n,
    normal-like quantiles), while the crossed ("pigeonhole") resampling over-covers the seed × map part a
    little (other generator seeds gave 0.947 to 0.973). The seed-only t interval on the same data must
    cover clearly less (about 0.80: it misses the test-set noise).
    """
    rng = np.random.default_rng(1)
    seeds, m, reps = 5, 60, 300
    mu = {"method": 1.3, "baseline": 1.2}
    sd_map, sd_map_method, sd_run, sd_seed, sd_seed_method = 0.6, 0.4, 0.3, 0.2, 0.1
    c2 = 2 * (sd_map**2 + sd_map_method**2 + sd_run**2)
    spread = math.sqrt(c2 + sd_seed**2 + sd_seed_method**2)
    true = sst.norm.cdf(mu["method"] / spread) - sst.norm.cdf(mu["baseline"] / spread)
    y = np.r_[np.ones(m, int), np.zeros(m, int)]
    hit = hit_t = 0
    for k in range(reps):
        maps = rng.normal(0, sd_map, size=2 * m)
        u = rng.normal(0, sd_seed, size=seeds)
        scores = {}
        for name in ("method", "baseline"):
            sep = mu[name] + u + rng.normal(0, sd_seed_method, size=seeds)
            scores[name] = (
                sep[:, None] * y
                + maps
                + rng.normal(0, sd_map_method, size=2 * m)
                + rng.normal(0, sd_run, size=(seeds, 2 * m))
            )
        res = hierarchical_bootstrap_auroc(
            {"d": AurocScores(y, scores["method"], scores["baseline"])}, n_resamples=200, seed=k
        ).domains["d"]
        hit += res.low <= true <= res.high
        diffs = [_auc(y, scores["method"][s]) - _auc(y, scores["baseline"][s]) for s in range(seeds)]
        t = paired_delta_interval(diffs, n_resamples=10)
        hit_t += t.t_low <= true <= t.t_high
    assert 0.90 <= hit / reps <= 0.99, hit / reps
    assert hit_t / reps < 0.88, hit_t / reps  # about 0.80 in this regime


# ------------------------------------------------------------------ probability of improvement


def test_probability_of_improvement_counts_ties_apart():
    r = probability_of_improvement([0.01, -0.02, 0.0, 0.03, float("nan")])
    assert (r.n, r.n_better, r.n_worse, r.n_ties) == (4, 2, 1, 1)
    assert r.share_better == pytest.approx(0.5)
    assert "1 tie" in r.note and "1 non-finite" in r.note
    empty = probability_of_improvement([])
    assert empty.share_better is None and "not computable" in empty.note
    _json_ok(r)


# ------------------------------------------------------------------ seeds needed


def _diffs_with(d_z: float, n: int = 6) -> np.ndarray:
    """n values with mean d_z and sample sd exactly 1."""
    z = np.linspace(-1, 1, n)
    z = (z - z.mean()) / z.std(ddof=1)
    return d_z + z


@pytest.mark.parametrize("d_z,expected", [(0.5, 34), (1.0, 10), (-0.5, 34)])
def test_seeds_needed_matches_g_power(d_z, expected):
    r = seeds_needed(_diffs_with(d_z))
    assert r.d_z == pytest.approx(d_z) and r.n_needed == expected
    assert r.achieved_power >= 0.8 > float(paired_t_power(expected - 1, d_z))
    assert r.power_now == pytest.approx(float(paired_t_power(6, d_z)))
    _json_ok(r)


def test_power_matches_a_monte_carlo_t_test():
    rng = np.random.default_rng(123)
    d_z = 1.0
    n_needed = seeds_needed(_diffs_with(d_z)).n_needed
    sims = 40000
    for n in (n_needed - 1, n_needed):
        x = rng.normal(d_z, 1.0, size=(sims, n))
        p = sst.ttest_1samp(x, 0.0, axis=1).pvalue
        mc = np.mean(p < 0.05)
        # Monte-Carlo SE = √(0.8·0.2/40000) = 0.002: 4 SE tolerance
        assert mc == pytest.approx(float(paired_t_power(n, d_z)), abs=0.008)


def test_seeds_needed_not_computable_and_cap():
    assert "not computable" in seeds_needed([0.01]).note
    assert "sd = 0" in seeds_needed([0.02, 0.02, 0.02]).note
    zero = seeds_needed([0.01, -0.01, 0.0])
    assert zero.n_needed is None and "Δ is 0" in zero.note
    tiny = seeds_needed(_diffs_with(0.05), max_seeds=1000)
    assert tiny.n_needed is None and tiny.more_than == 1000 and "more than 1000" in tiny.note
    for r in (zero, tiny):
        _json_ok(r)
    text = describe_seeds_needed(seeds_needed(0.004 * _diffs_with(1.0)), "domain_C")
    assert text.startswith("to confirm a +0.40 pt gain on domain_C at α=0.05 (80 % power) you need ~10 paired seeds")
    assert "more than 1000" in describe_seeds_needed(tiny, "mean")
    assert "not computable" in describe_seeds_needed(zero, "mean")
