"""compare on the terminal: the runs found, then the verdicts, then the means; readable at 80 columns."""

from __future__ import annotations

from collections.abc import Sequence

from hdmap_ad.apps.compare.cells import fmt_mean_std
from hdmap_ad.apps.compare.decisions import collapse, margins_text, verdict_rows
from hdmap_ad.apps.compare.labels import METRIC_LABELS, scope_label
from hdmap_ad.apps.compare.result import ComparisonResult
from hdmap_ad.apps.compare.runs import Selection


def print_found(console, selection: Selection, methods: Sequence[str], baseline: str) -> None:
    """Which runs were found, used and left out (before any statistic)."""
    from rich.markup import escape

    console.print(f"[bold]compare[/]: {selection.n_found} run(s) in the experiment")
    ref = selection.reference
    if ref is not None and ref.key:
        console.print(f"  comparison group {ref.key[:6]}: {ref.source}", markup=False)
    if selection.precision is not None and selection.used:
        console.print(f"  precision: {selection.precision.describe()}", markup=False)
    for m in methods:
        seeds = list(selection.used.get(m, {}))
        console.print(
            f"  {m:<10} {len(seeds)} run(s), seeds {', '.join(map(str, seeds)) or 'none'}"
            + ("  (baseline)" if m == baseline else "")
        )
    for x in selection.left_out:
        console.print(
            f"  [yellow]left out[/] {x.run.run_name or x.run.run_id} ({x.run.run_id[:8]}): " + escape(x.reason)
        )
    for x in selection.superseded:
        console.print(
            f"  [yellow]{x.method} seed {x.seed}: {len(x.ignored) + 1} valid runs, using the latest "
            f"{x.used.run_id[:8]}[/]"
        )
    for x in selection.invalid:
        console.print(
            f"  [bold red]INVALID[/] {x.method} seed {x.seed} ({x.run.run_id[:8]}): NaN/Inf scores in "
            f"{', '.join(x.domains)}; left out of those domains' and the mean/pooled comparisons"
        )


def print_verdicts(console, result: ComparisonResult) -> None:
    """The answer first: per method its overall verdict, then each comparison's (collapsed where they
    say the same), in words; wraps cleanly at 80 columns."""
    from rich.markup import escape

    from hdmap_ad.apps.compare.labels import method_label, method_meaning

    others = [m for m in result.methods if m != result.baseline]
    console.print(
        f"[bold]Verdicts[/] vs {result.baseline} (α={result.uncertainty.get('alpha', 0.05):g}; "
        f"equivalent = |Δ| within {escape(margins_text(result))}):"
    )
    for m in others:
        v = result.verdicts.get(m)
        n = len(result.runs.get(m, {}))
        what = method_label(m) + (f": {method_meaning(m)}" if method_meaning(m) else "")
        if v is None:
            console.print(f"  [bold]{escape(m)}[/] ({escape(what)}): no valid run")
            continue
        console.print(f"  [bold]{escape(m)}[/] ({escape(what)}; {n} seed(s)): [bold]{v.verdict.upper()}[/]")
        console.print(f"    {escape(v.reason)}", style="dim")
        for where, verdict, reason in collapse(verdict_rows(result, m)):
            console.print(f"    {escape(where)}: [bold]{verdict}[/], {escape(reason)}")


def print_summary(console, result: ComparisonResult) -> None:
    """The verdicts, then one table per report metric: mean ± std per method and scope (Δ, p and the
    intervals are in the report)."""
    from rich.markup import escape
    from rich.table import Table

    print_verdicts(console, result)
    for metric in result.report_metrics:
        table = Table(title=f"{METRIC_LABELS[metric]} (%): mean ± std over seeds (ddof=1)", title_justify="left")
        table.add_column("method")
        for s in result.table_scopes:
            table.add_column(scope_label(s), justify="right")
        for m in result.methods:
            cells = [
                fmt_mean_std(result.summary[m][s][metric], metric, result.most_seeds).replace(" ± ", "±")
                for s in result.table_scopes
            ]
            table.add_row(m, *cells)
        console.print(table)
    for hint in result.hints:
        console.print(f"[bold yellow]{escape(hint.line)}[/]", soft_wrap=True)  # commands stay copyable
