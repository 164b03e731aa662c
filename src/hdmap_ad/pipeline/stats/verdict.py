"""The verdict of a comparison (docs/design.md#stats-verdict): better, worse, equivalent or inconclusive.

Lakens' four outcomes (Lakens, Scheel & Isager 2018), from a test of difference and a test of
equivalence at the same α:

| different | equivalent | verdict |
|---|---|---|
| yes | no | **better** / **worse** (by the sign of Δ): a real effect, not negligible |
| no | yes | **equivalent** |
| yes | yes | **equivalent**, said to be a real but negligible effect |
| no | no | **inconclusive**, with the seeds that would decide it |

"Different" is the two-sided paired t-test (its Holm-adjusted p, the family of the report's table)
below α; "equivalent" is the paired TOST at α with the metric's margin. Where a second noise source is
measured (AUROC: the hierarchical bootstrap over seeds × maps) a claim must also hold there: different
needs its (1 − α) interval to exclude 0 on the same side, equivalent needs its (1 − 2α) interval inside
±margin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hdmap_ad.pipeline.stats.bootstrap import BootstrapDelta
from hdmap_ad.pipeline.stats.equivalence import TostResult
from hdmap_ad.pipeline.stats.power import SeedsNeeded, describe_equivalence_seeds

BETTER, WORSE, EQUIVALENT, INCONCLUSIVE = "better", "worse", "equivalent", "inconclusive"
VERDICTS = (BETTER, WORSE, EQUIVALENT, INCONCLUSIVE)


@dataclass(frozen=True)
class Verdict:
    """One word and the reason in words a reader needs no statistics section for."""

    verdict: str
    reason: str
    different: bool | None = None  # None: no test possible
    equivalent: bool | None = None
    negligible: bool = False  # different and equivalent: real but inside the margin
    seeds_for_difference: int | None = None
    seeds_for_equivalence: int | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "different": self.different,
            "equivalent": self.equivalent,
            "negligible": self.negligible,
            "seeds_for_difference": self.seeds_for_difference,
            "seeds_for_equivalence": self.seeds_for_equivalence,
        }


def decide(
    delta: float | None,
    n: int,
    p_different: float | None,
    tost: TostResult | None,
    alpha: float,
    *,
    bootstrap: BootstrapDelta | None = None,
    need: SeedsNeeded | None = None,
    fmt=lambda v: f"{v:+.3g}",
) -> Verdict:
    """The verdict of one comparison. ``p_different``: the two-sided p of the paired t-test (Holm-adjusted
    within its family); ``tost``: the paired TOST at α with the margin; ``bootstrap``: the hierarchical
    bootstrap with the same margin and α, when there is one; ``need``: the seeds needed (for the words of
    an inconclusive verdict); ``fmt`` formats a Δ or margin in the reader's unit."""
    if delta is None or n == 0:
        return Verdict(INCONCLUSIVE, "no paired seed: run the baseline on the method's seeds")
    if n < 2:
        return Verdict(INCONCLUSIVE, f"only {n} paired seed: no test, no spread; run at least 2 more seeds")
    different = p_different is not None and p_different < alpha
    equivalent = bool(tost is not None and tost.equivalent)
    both = "seeds"
    if bootstrap is not None and bootstrap.test_low is not None and bootstrap.test_high is not None:
        both = "seeds and test maps"
        if different:
            different = bootstrap.test_low > 0 if delta > 0 else bootstrap.test_high < 0
        if equivalent:
            m = tost.margin
            equivalent = bootstrap.tost_low is not None and -m < bootstrap.tost_low and bootstrap.tost_high < m
    margin = tost.margin if tost is not None else None
    within = f"±{fmt(margin).lstrip('+')}" if margin is not None else "the margin"
    seeds_d = need.n_needed if need is not None else None
    seeds_e = need.equivalence_n_needed if need is not None else None
    if different and not equivalent:
        word = BETTER if delta > 0 else WORSE
        return Verdict(word, f"Δ {fmt(delta)}, beyond noise over {both} (n={n})", True, False, False, seeds_d, seeds_e)
    if equivalent:
        why = f"Δ {fmt(delta)} within {within} over {both} (n={n})"
        if different:
            why += "; a real but negligible difference"
        return Verdict(EQUIVALENT, why, different, True, different, seeds_d, seeds_e)
    if tost is not None and tost.p is None and tost.low is not None and tost.low == tost.high:
        # all paired differences equal (whole-map steps, few seeds): no spread for a test to measure against
        why = f"Δ {fmt(delta)} on every seed (n={n}): no seed-to-seed spread to test it against; run more seeds"
    else:
        why = f"Δ {fmt(delta)} (n={n}): needs {seeds_to_settle(delta, need, fmt)}"
    return Verdict(INCONCLUSIVE, why, different, equivalent, False, seeds_d, seeds_e)


def seeds_to_settle(delta: float, need: SeedsNeeded | None, fmt) -> str:
    """The words of an inconclusive verdict: the seeds that would show the observed Δ, and equivalence."""
    parts = []
    if need is not None:
        if need.n_needed is not None:
            parts.append(f"~{need.n_needed} seeds to show a Δ of {fmt(delta)}")
        elif need.more_than is not None:
            parts.append(f"more than {need.more_than} seeds to show a Δ of {fmt(delta)}")
        eq = describe_equivalence_seeds(need)
        if eq and (need.equivalence_n_needed is not None or need.equivalence_more_than is not None):
            parts.append(eq.replace("paired seeds", "seeds"))
    return "; ".join(parts) if parts else "more seeds"


def overall(verdicts: Mapping[str, Verdict]) -> Verdict:
    """A method's verdict over all its comparisons (``where`` -> verdict, e.g. "AUROC mean"):
    better when it is better somewhere and worse nowhere, worse when worse somewhere and better
    nowhere, equivalent when equivalent everywhere, else inconclusive (naming where it is better and
    worse when it is both)."""
    if not verdicts:
        return Verdict(INCONCLUSIVE, "nothing compared")
    by: dict[str, list[str]] = {v: [] for v in VERDICTS}
    for where, v in verdicts.items():
        by[v.verdict].append(where)

    def names(items: Sequence[str]) -> str:
        return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")

    if by[BETTER] and by[WORSE]:
        return Verdict(INCONCLUSIVE, f"mixed: better on {names(by[BETTER])}; worse on {names(by[WORSE])}")
    if by[BETTER]:
        return Verdict(BETTER, f"better on {names(by[BETTER])}; worse nowhere")
    if by[WORSE]:
        return Verdict(WORSE, f"worse on {names(by[WORSE])}; better nowhere")
    if len(by[EQUIVALENT]) == len(verdicts):
        return Verdict(EQUIVALENT, "equivalent on every domain and metric")
    return Verdict(
        INCONCLUSIVE,
        f"no difference shown; equivalent on {len(by[EQUIVALENT])} of {len(verdicts)}, "
        f"undecided on {names(by[INCONCLUSIVE])}",
    )
