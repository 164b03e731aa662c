"""Statistics across seeds against scipy and hand-computed values."""

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy.stats import ttest_rel, wilcoxon

from hdmap_ad.pipeline.stats import (
    PairedResult,
    fill_holm,
    holm_adjust,
    mean_std,
    paired_test,
    significance_mark,
)

BASE = {42: 0.971, 43: 0.965, 44: 0.980, 123: 0.958, 456: 0.975}
METH = {42: 0.982, 43: 0.970, 44: 0.981, 123: 0.969, 456: 0.990}


def test_paired_test_matches_scipy_on_full_pairs():
    r = paired_test(BASE, METH)
    seeds = [42, 43, 44, 123, 456]
    b, m = [BASE[s] for s in seeds], [METH[s] for s in seeds]
    t = ttest_rel(m, b)
    w = wilcoxon(m, b)
    assert r.seeds == seeds and r.n == 5
    assert r.t_stat == pytest.approx(t.statistic, rel=1e-12) and r.t_stat > 0  # method - baseline
    assert r.p_ttest == pytest.approx(t.pvalue, rel=1e-12)
    assert r.w_stat == pytest.approx(w.statistic) and r.p_wilcoxon == pytest.approx(w.pvalue)
    assert r.p_wilcoxon == pytest.approx(2 / 32)  # all 5 differences positive: the exact minimum
    assert r.delta == pytest.approx(np.mean(m) - np.mean(b))
    assert r.baseline_mean == pytest.approx(np.mean(b)) and r.method_mean == pytest.approx(np.mean(m))
    assert r.baseline_std == pytest.approx(np.std(b, ddof=1)) and r.method_std == pytest.approx(np.std(m, ddof=1))
    assert "seeds used: 42, 43, 44, 123, 456" in r.note
    json.dumps(dataclasses.asdict(r), allow_nan=False)


def test_missing_seeds_pair_on_the_intersection_and_note_lists_them():
    base = {42: 0.90, 43: 0.92, 44: 0.91, 123: 0.93}
    meth = {42: 0.93, 43: 0.925, 44: 0.95, 456: 0.99}
    r = paired_test(base, meth)
    assert r.seeds == [42, 43, 44] and r.n == 3
    t = ttest_rel([0.93, 0.925, 0.95], [0.90, 0.92, 0.91])
    assert r.p_ttest == pytest.approx(t.pvalue, rel=1e-12)
    assert r.baseline_mean == pytest.approx(np.mean([0.90, 0.92, 0.91]))  # seed 123 not in the paired mean
    assert "seeds used: 42, 43, 44" in r.note
    assert "123" in r.note and "456" in r.note


def test_d_z_by_hand():
    r = paired_test({1: 0.50, 2: 0.60, 3: 0.70}, {1: 0.51, 2: 0.62, 3: 0.73})
    # differences 0.01, 0.02, 0.03: mean 0.02, std (ddof=1) 0.01 -> d_z = 2
    assert r.d_z == pytest.approx(2.0)
    assert r.delta == pytest.approx(0.02)


def test_fewer_than_two_pairs_gives_no_p_value():
    r = paired_test({42: 0.9, 43: 0.8}, {42: 0.95, 44: 0.7})
    assert r.n == 1 and r.seeds == [42]
    assert r.p_ttest is None and r.p_wilcoxon is None and r.t_stat is None and r.d_z is None
    assert r.baseline_std is None and r.method_std is None
    assert r.delta == pytest.approx(0.05)
    assert "fewer than 2 paired seeds: no p-value" in r.note
    none = paired_test({42: 0.9}, {43: 0.9})
    assert none.n == 0 and none.delta is None and none.p_ttest is None and "no paired seeds" in none.note


def test_all_zero_differences_are_handled_without_nan():
    same = {42: 0.9, 43: 0.8, 44: 0.85}
    r = paired_test(same, dict(same))
    assert r.delta == 0.0
    assert r.p_ttest is None and r.t_stat is None and r.p_wilcoxon is None and r.w_stat is None and r.d_z is None
    assert "all paired differences are zero" in r.note
    json.dumps(dataclasses.asdict(r), allow_nan=False)


def test_equal_nonzero_differences_no_t_test_but_wilcoxon():
    r = paired_test({1: 0.5, 2: 0.6, 3: 0.7}, {1: 0.75, 2: 0.85, 3: 0.95})  # exact in binary: diff 0.25 each
    assert r.p_ttest is None and r.d_z is None
    assert "zero variance" in r.note
    assert r.p_wilcoxon == pytest.approx(wilcoxon([0.75, 0.85, 0.95], [0.5, 0.6, 0.7]).pvalue)


def test_zero_difference_dropped_by_wilcoxon_is_noted():
    base = {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.8}
    meth = {1: 0.55, 2: 0.6, 3: 0.78, 4: 0.81}
    r = paired_test(base, meth)
    assert r.p_wilcoxon == pytest.approx(wilcoxon(list(meth.values()), list(base.values())).pvalue)
    assert "drops 1 zero difference" in r.note


def test_non_finite_values_are_left_out_and_said():
    base = {42: 0.90, 43: float("nan"), 44: 0.91, 45: 0.95}
    meth = {42: 0.93, 43: 0.95, 44: 0.95, 45: 0.96}
    r = paired_test(base, meth)
    assert r.seeds == [42, 44, 45]
    assert "43" in r.note and "NaN" in r.note


def test_holm_by_hand():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max with 0.06 = 0.06
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # None stays None and does not count in m
    out = holm_adjust([0.01, None, 0.04, 0.03, 0.005])
    assert out[1] is None
    assert [out[i] for i in (0, 2, 3, 4)] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.6]) == [1.0, 1.0]  # 0.5*2 = 1.0, capped
    assert holm_adjust([0.3, 0.6]) == pytest.approx([0.6, 0.6])
    assert holm_adjust([]) == [] and holm_adjust([None]) == [None]
    assert holm_adjust([float("nan"), 0.02]) == [None, 0.02]
    with pytest.raises(ValueError):
        holm_adjust([1.5])


def test_holm_is_monotone_and_not_below_raw():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 0.2, size=12).tolist()
    adj = holm_adjust(p)
    order = np.argsort(p)
    assert all(adj[i] <= adj[j] for i, j in zip(order, order[1:]))
    assert all(a >= raw and a <= 1.0 for a, raw in zip(adj, p))
    assert adj[int(order[0])] == pytest.approx(min(1.0, 12 * p[int(order[0])]))


def test_fill_holm_sets_p_holm_from_t_test():
    rs = [paired_test(BASE, METH), paired_test({1: 0.5}, {1: 0.6}), paired_test(METH, BASE)]
    fill_holm(rs)
    assert rs[1].p_holm is None
    assert rs[0].p_holm == pytest.approx(min(1.0, 2 * rs[0].p_ttest))


def test_significance_marks():
    assert significance_mark(0.0009) == "***"
    assert significance_mark(0.001) == "**"
    assert significance_mark(0.0099) == "**"
    assert significance_mark(0.01) == "*"
    assert significance_mark(0.0499) == "*"
    assert significance_mark(0.05) == "n.s."
    assert significance_mark(0.7) == "n.s."
    assert significance_mark(None) == "–"
    assert significance_mark(float("nan")) == "–"


def test_mean_std_ddof1():
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(math.sqrt(5 / 3))
    assert mean_std([0.7]) == (0.7, None)
    with pytest.raises(ValueError):
        mean_std([])
    with pytest.raises(ValueError):
        mean_std([1.0, float("nan")])


def test_paired_result_defaults():
    r = PairedResult(
        seeds=[],
        n=0,
        baseline_mean=None,
        baseline_std=None,
        method_mean=None,
        method_std=None,
        delta=None,
        t_stat=None,
        p_ttest=None,
        w_stat=None,
        p_wilcoxon=None,
        d_z=None,
    )
    assert r.p_holm is None and r.note == ""


def test_unpaired_difference_of_means_without_common_seed():
    from hdmap_ad.pipeline.stats import unpaired_difference

    r = unpaired_difference({42: 0.90, 43: 0.94}, {44: 0.95, 45: float("nan")})
    assert r.delta == pytest.approx(0.95 - 0.92) and r.baseline_seeds == [42, 43] and r.method_seeds == [44]
    assert "no p-value" in r.note
    none = unpaired_difference({}, {44: 0.95})
    assert none.delta is None and none.method_mean is None
    json.dumps(dataclasses.asdict(r), allow_nan=False)
