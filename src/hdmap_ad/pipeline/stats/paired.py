"""Paired tests over seeds (docs/design.md#stats-tests): t-test, Wilcoxon signed-rank, Cohen's d_z and
Holm's correction; and the unpaired difference of means for a method that shares no seed with the
baseline (docs/design.md#stats-unpaired)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sst

from hdmap_ad.pipeline.stats.common import all_equal, finite_or_none, mean_std


@dataclass
class PairedResult:
    seeds: list[int]
    n: int
    baseline_mean: float | None
    baseline_std: float | None
    method_mean: float | None
    method_std: float | None
    delta: float | None
    t_stat: float | None
    p_ttest: float | None
    w_stat: float | None
    p_wilcoxon: float | None
    d_z: float | None
    p_holm: float | None = None
    note: str = ""


def paired_test(baseline: Mapping[int, float], method: Mapping[int, float]) -> PairedResult:
    """Paired comparison method vs baseline on the seeds both have (with a finite value).

    t-test: scipy.stats.ttest_rel(method, baseline); Wilcoxon signed-rank: scipy.stats.wilcoxon on the same
    pairs (zero differences dropped, the default); d_z = mean(diff) / std(diff, ddof=1), diff = method - baseline.
    Means and stds are over the paired seeds only.
    """
    notes: list[str] = []
    dropped = sorted(set(baseline) ^ set(method))
    seeds = sorted(set(baseline) & set(method))
    bad = [s for s in seeds if not (finite_or_none(baseline[s]) is not None and finite_or_none(method[s]) is not None)]
    if bad:
        notes.append(f"seed(s) {', '.join(map(str, bad))} left out: NaN/Inf/missing value")
        seeds = [s for s in seeds if s not in bad]
    notes.insert(0, f"seeds used: {', '.join(map(str, seeds)) or 'none'}")
    if dropped:
        notes.append(f"unpaired seed(s) left out: {', '.join(map(str, dropped))}")
    n = len(seeds)
    b = np.array([float(baseline[s]) for s in seeds])
    m = np.array([float(method[s]) for s in seeds])
    res = PairedResult(
        seeds=[int(s) for s in seeds],
        n=n,
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
    if n == 0:
        notes.append("no paired seeds: nothing to compare")
        res.note = "; ".join(notes)
        return res
    res.baseline_mean, res.baseline_std = mean_std(b)
    res.method_mean, res.method_std = mean_std(m)
    res.delta = res.method_mean - res.baseline_mean
    if n < 2:
        notes.append("fewer than 2 paired seeds: no p-value")
        res.note = "; ".join(notes)
        return res

    diff = m - b
    sd = float(np.std(diff, ddof=1))
    if np.all(diff == 0):
        notes.append("all paired differences are zero: no test")
    elif all_equal(diff):
        notes.append("all paired differences are equal: t-test and d_z undefined (zero variance)")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            t = sst.ttest_rel(m, b)
        res.t_stat, res.p_ttest = finite_or_none(t.statistic), finite_or_none(t.pvalue)
        res.d_z = float(np.mean(diff) / sd)
    if not np.all(diff == 0):
        nonzero = int(np.count_nonzero(diff))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (RuntimeWarning, UserWarning))
            w = sst.wilcoxon(m, b)
        res.w_stat, res.p_wilcoxon = finite_or_none(w.statistic), finite_or_none(w.pvalue)
        if nonzero < n:
            notes.append(f"Wilcoxon drops {n - nonzero} zero difference(s)")
        if nonzero <= 5:
            notes.append(f"with {nonzero} nonzero pairs the smallest two-sided Wilcoxon p is {2 / 2**nonzero:.4g}")
    res.note = "; ".join(notes)
    return res


@dataclass
class UnpairedResult:
    """Difference of the means of two groups of seeds that share no seed.

    No p-value on purpose: with the usual one run per side a two-sample test is undefined, and with
    more it would be a different test (ignoring the seed pairing the design relies on) beside the paired
    tests of the same table and their Holm family. The fix is a paired run, not another test.
    """

    baseline_seeds: list[int]
    method_seeds: list[int]
    baseline_mean: float | None
    method_mean: float | None
    delta: float | None
    note: str = ""


def unpaired_difference(baseline: Mapping[int, float], method: Mapping[int, float]) -> UnpairedResult:
    """mean(method) - mean(baseline) over each side's finite values (all its seeds); None when a side has none."""
    b = {int(s): float(v) for s, v in baseline.items() if finite_or_none(v) is not None}
    m = {int(s): float(v) for s, v in method.items() if finite_or_none(v) is not None}
    res = UnpairedResult(sorted(b), sorted(m), None, None, None)
    if not b or not m:
        res.note = "unpaired: a side has no value"
        return res
    res.baseline_mean, res.method_mean = mean_std(list(b.values()))[0], mean_std(list(m.values()))[0]
    res.delta = res.method_mean - res.baseline_mean
    res.note = (
        f"unpaired difference of means (no common seed; method seeds {', '.join(map(str, sorted(m)))}, "
        f"baseline seeds {', '.join(map(str, sorted(b)))}): no p-value"
    )
    return res


def holm_adjust(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values, in the input order.

    With the m available p-values sorted ascending, p_adj(i) = min(1, max_{j<=i} (m - j + 1) * p(j)).
    None (or NaN) stays None and does not count in m.
    """
    idx = [i for i, p in enumerate(pvalues) if finite_or_none(p) is not None]
    for i in idx:
        if not 0.0 <= float(pvalues[i]) <= 1.0:
            raise ValueError(f"p-value out of [0, 1]: {pvalues[i]}")
    out: list[float | None] = [None] * len(pvalues)
    order = sorted(idx, key=lambda i: float(pvalues[i]))
    m = len(order)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out


def fill_holm(results: Sequence[PairedResult], which: str = "p_ttest") -> list[PairedResult]:
    """Holm-correct one family (e.g. all comparisons of a table) in place, from p_ttest or p_wilcoxon."""
    if which not in ("p_ttest", "p_wilcoxon"):
        raise ValueError(f"which must be p_ttest or p_wilcoxon, got {which!r}")
    for r, p in zip(results, holm_adjust([getattr(r, which) for r in results])):
        r.p_holm = p
    return list(results)


def significance_mark(p: float | None) -> str:
    """'***' p<0.001, '**' p<0.01, '*' p<0.05, 'n.s.' otherwise, '–' when there is no p-value."""
    if finite_or_none(p) is None:
        return "–"
    p = float(p)
    if p < 0.001:
        return "***"
    if p < 0.01:
        return "**"
    if p < 0.05:
        return "*"
    return "n.s."
