"""Statistics across seeds: runs are paired by seed (docs/design.md#7-statistics).

One module per question: `paired` (is there a difference: t-test, Wilcoxon, d_z, Holm), `intervals`
(how large: t and bootstrap intervals over seeds, P(improvement)), `delong` and `bootstrap` (the
test-set noise of Δ AUROC from the per-map scores), `equivalence` (is it practically zero: TOST,
Bayesian probabilities with a margin), `power` (how many seeds would tell) and `verdict` (the answer
in one word). `common` holds the NaN-free rule every result follows: an undefined statistic is None
with a note "not computable: <why>".
"""

# Loaded on first use (PEP 562): the CLI imports compare to build its help and must not pay for scipy.
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "AurocScores": "bootstrap",
    "BayesProbabilities": "equivalence",
    "BootstrapDelta": "bootstrap",
    "DeLongResult": "delong",
    "DeltaInterval": "intervals",
    "HierarchicalBootstrapResult": "bootstrap",
    "Improvement": "intervals",
    "NOT_COMPUTABLE": "common",
    "PairedResult": "paired",
    "PooledDeLongResult": "delong",
    "PreparedScores": "bootstrap",
    "STD_NOTE": "common",
    "SeedsNeeded": "power",
    "TostResult": "equivalence",
    "UnpairedResult": "paired",
    "VERDICTS": "verdict",
    "Verdict": "verdict",
    "bayes_correlated_t": "equivalence",
    "decide": "verdict",
    "delong_pooled": "delong",
    "delong_test": "delong",
    "describe_equivalence_seeds": "power",
    "describe_seeds_needed": "power",
    "distribution_probabilities": "equivalence",
    "domain_replicate_deltas": "bootstrap",
    "fill_holm": "paired",
    "finite_or_none": "common",
    "hierarchical_bootstrap_auroc": "bootstrap",
    "holm_adjust": "paired",
    "mean_std": "common",
    "overall": "verdict",
    "paired_delta_interval": "intervals",
    "paired_t_power": "power",
    "paired_test": "paired",
    "probability_of_improvement": "intervals",
    "resample_counts": "bootstrap",
    "twice_weighted_auc_numerators": "bootstrap",
    "seeds_needed": "power",
    "significance_mark": "paired",
    "smallest_n": "power",
    "tost_paired": "equivalence",
    "tost_power": "power",
    "unpaired_difference": "paired",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
