"""The verdicts (docs/design.md#stats-verdict): each method × scope × metric comparison gets one of
better / worse / equivalent / inconclusive from its tests and margin, and each method one overall
verdict over the report's table (its domains and the mean, for every report metric)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from hdmap_ad.apps.compare.cells import fmt_delta
from hdmap_ad.apps.compare.labels import METRIC_LABELS, NOT_PERCENT, scope_label
from hdmap_ad.apps.compare.result import PER_MAP_METRIC, Comparison, ComparisonResult

if TYPE_CHECKING:
    from hdmap_ad.pipeline.stats.verdict import Verdict


def unit_formatter(metric: str):
    """Δ and margins in the reader's unit: points for percent metrics ('+0.12 pt')."""
    if metric in NOT_PERCENT:
        return lambda v: fmt_delta(v, metric)
    return lambda v: f"{fmt_delta(v, metric)} pt"


def attach_verdicts(comparisons: Sequence[Comparison], alpha: float) -> list[Comparison]:
    """Every paired comparison with its verdict (an unpaired one: inconclusive, and the reason)."""
    from hdmap_ad.pipeline.stats.verdict import INCONCLUSIVE, Verdict, decide

    out = []
    for c in comparisons:
        if c.pairing == "unpaired":
            v = Verdict(
                INCONCLUSIVE,
                f"unpaired Δ {unit_formatter(c.metric)(c.unpaired_delta)} (no p): no common seed, "
                "run the baseline on the method's seeds",
            )
        else:
            boot = c.bootstrap if c.metric == PER_MAP_METRIC else None
            v = decide(
                c.paired.delta,
                c.paired.n,
                c.paired.p_holm,
                c.tost,
                alpha,
                bootstrap=boot if boot is not None and boot.test_low is not None else None,
                need=c.seeds_needed,
                fmt=unit_formatter(c.metric),
            )
        out.append(replace(c, verdict=v))
    return out


def method_verdicts(
    comparisons: Sequence[Comparison], methods: Sequence[str], scopes: Sequence[str], metrics: Sequence[str]
) -> dict[str, Verdict]:
    """Each method's overall verdict over its comparisons in `scopes` × `metrics`."""
    from hdmap_ad.pipeline.stats.verdict import overall

    out = {}
    for m in methods:
        cells = {
            f"{METRIC_LABELS.get(c.metric, c.metric)} {scope_label(c.scope)}": c.verdict
            for c in comparisons
            if c.method == m and c.scope in scopes and c.metric in metrics and c.verdict is not None
        }
        if cells:
            out[m] = overall(cells)
    return out


def margins_text(result: ComparisonResult) -> str:
    """'AUROC ±0.1, TPR@FPR=1% ±1 pt, ...': the margins of the report metrics."""
    rope = result.uncertainty.get("rope_points", {})
    return ", ".join(f"{METRIC_LABELS[m]} ±{rope[m]:g}" for m in result.report_metrics if m in rope) + " pt"


def verdict_rows(result: ComparisonResult, method: str) -> list[tuple[str, str, str, str]]:
    """(metric, scope, verdict, reason) of a method's comparisons in the report's table."""
    rows = []
    for metric in result.report_metrics:
        for s in result.table_scopes:
            c = result.comparison(method, s, metric)
            if c is not None and c.verdict is not None:
                rows.append((METRIC_LABELS[metric], scope_label(s), c.verdict.verdict, c.verdict.reason))
    return rows


def collapse(rows: Sequence[tuple[str, str, str, str]]) -> list[tuple[str, str, str]]:
    """(where, verdict, reason) lines: rows that share their verdict and reason become one line naming
    how many they are (e.g. every comparison at one seed says the same thing)."""
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for metric, scope, verdict, reason in rows:
        groups.setdefault((verdict, reason), []).append((metric, scope))
    out = []
    for (verdict, reason), where in groups.items():
        if len(where) == 1:
            out.append((f"{where[0][0]} {where[0][1]}", verdict, reason))
        else:
            metrics = list(dict.fromkeys(m for m, _ in where))
            scopes = list(dict.fromkeys(s for _, s in where))
            label = (
                f"{len(where)} comparisons"
                if len(metrics) * len(scopes) != len(where)
                else f"{', '.join(metrics)} × {', '.join(scopes)}"
                if len(where) <= 4
                else f"all {len(where)}: {len(metrics)} metric(s) × {len(scopes)} scope(s)"
            )
            out.append((label, verdict, reason))
    return out
