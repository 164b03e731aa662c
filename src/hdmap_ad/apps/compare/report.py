"""Views of a ComparisonResult on disk: the Markdown report (the verdicts first, then the experiment
plan's tables, filled in) and the per-seed plots."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from hdmap_ad.apps.compare.cells import (
    delta_cell,
    fmt_mean_std,
    fmt_number,
    fmt_p,
    fmt_value,
    mark_cell,
    md_table,
    p_cell,
    seeds_cell,
)
from hdmap_ad.apps.compare.labels import METRIC_LABELS, NOT_PERCENT, method_label, scope_label
from hdmap_ad.apps.compare.report_uncertainty import uncertainty_section
from hdmap_ad.apps.compare.result import (
    MARK_LEGEND,
    Comparison,
    ComparisonResult,
    PlotFile,
    SeedSummary,
)
from hdmap_ad.apps.compare.runs import LeftOut
from hdmap_ad.core.files import atomic_dir, write_text

# --------------------------------------------------------------------------------------- Markdown


def _methods_by_scope(methods: Sequence[str], scopes: Sequence[str], cell: Callable[[str, str], str]) -> list[str]:
    """A table with one row per method and one column per scope."""
    rows = [[method_label(m)] + [cell(m, s) for s in scopes] for m in methods]
    return md_table(["Method"] + [scope_label(s) for s in scopes], rows)


def _test_row(c: Comparison | None, metric: str, scope: str) -> list[str]:
    """A row of a method's `Statistical test` table."""
    if c is None:
        return [METRIC_LABELS[metric], scope_label(scope), "no data", "no data", "no data", "no p-value", "none"]
    return [
        METRIC_LABELS[metric],
        scope_label(scope),
        delta_cell(c),
        fmt_p(c.paired.p_ttest) if c.paired.p_ttest is not None else p_cell(c),
        fmt_p(c.paired.p_holm),
        mark_cell(c),
        seeds_cell(c.paired.seeds),
    ]


def _details_row(c: Comparison) -> list[str]:
    """A row of a metric's `details` table: every statistic of one comparison."""
    r = c.paired
    return [
        method_label(c.method),
        scope_label(c.scope),
        str(r.n),
        seeds_cell(r.seeds),
        fmt_mean_std(SeedSummary(r.n, mean=r.baseline_mean, std=r.baseline_std), c.metric),
        fmt_mean_std(SeedSummary(r.n, mean=r.method_mean, std=r.method_std), c.metric),
        delta_cell(c),
        fmt_number(r.t_stat),
        fmt_p(r.p_ttest),
        fmt_p(r.p_wilcoxon),
        fmt_p(r.p_holm),
        fmt_number(r.d_z),
        mark_cell(c),
        "; ".join(n for n in c.notes if not n.startswith("seeds used")) or "none",
    ]


def _seed_cell(result: ComparisonResult, method: str, seed: int, scope: str, metric: str) -> str:
    v = result.values.get(method, {}).get(scope, {}).get(metric, {}).get(seed)
    if v is not None:
        return fmt_value(v, metric)
    if seed in result.runs[method]:
        return result.blanks.get(method, {}).get(seed, {}).get(scope, "not logged")
    return _missing_reason(method, seed, result.selection.left_out)


def _missing_reason(method: str, seed: int, left: Sequence[LeftOut]) -> str:
    reasons = list(dict.fromkeys(x.short for x in left if x.method == method and x.seed == seed))
    return f"missing ({', '.join(reasons)})" if reasons else "missing (no run)"


def _header(result: ComparisonResult) -> list[str]:
    baseline = result.baseline
    L = ["# Method comparison on HDMAP (Dinomaly)", ""]
    L += [
        f"Generated {result.generated} by `hdmap-ad compare` from MLflow experiment `{result.experiment}` "
        f"at `{result.tracking_uri}`" + (f", profile `{result.profile}`." if result.profile else ", all profiles."),
        "",
    ]
    ref = result.reference
    if ref is not None and ref.key:
        L += [
            f"Comparison group `{ref.key}` (runs pair only within one group: same settings and "
            f"data, any method and seed), chosen from {ref.source}.",
            "",
        ]
    precision = result.selection.precision
    if precision is not None:
        L += [f"Every compared run was {precision.describe()} (runs at another precision are left out).", ""]
    for hint in result.hints:
        L += [
            f"> **{hint.method} is not paired with {baseline}: no common seed.** Unpaired Δ (difference of the "
            f"means, no p-value) below. To pair them run `{hint.command}` (or `{hint.grid}`).",
            "",
        ]
    L += [
        "- Values are percent (fraction × 100, 2 decimals); Δ is method − baseline in percentage points.",
        "- Mean ± Std over seeds; **std is the sample standard deviation (ddof=1)**; `(n=k)` marks a cell with k seeds.",
        "- Per-seed and summary tables use every valid seed of a method; the tests use the seeds it shares with the "
        "baseline (listed per comparison; the details tables give the paired means).",
        "- Statistics: runs paired by seed with the baseline "
        f"`{baseline}`; paired t-test (`scipy.stats.ttest_rel`), Wilcoxon signed-rank, Cohen's d_z = mean(diff)/std(diff, ddof=1); "
        "Holm correction over all comparisons of one table (one metric: every method × every domain and the mean).",
        f"- Significance: {MARK_LEGEND}.",
        "- A method with no seed in common with the baseline gets an **unpaired Δ** (difference of the means over each "
        "side's seeds) and no p-value: with one run per side no test is defined, and a two-sample test would ignore "
        "the seed pairing the design relies on.",
        "- precision/recall/F1/accuracy (JSON only) use the Youden-J threshold chosen on each test set.",
        "",
    ]
    L += ["## Notes", ""] + ([f"- {n}" for n in result.notes] or ["- none"]) + [""]
    return L


def _method_section(result: ComparisonResult, method: str, seeds_all: Sequence[int]) -> list[str]:
    """A method's runs, its per-seed table per metric and its tests against the baseline."""
    runs, scopes = result.runs[method], result.table_scopes
    L = [f"## {method_label(method)} (`{method}`)", ""]
    if not runs:
        return L + [f"No valid run of `{method}`.", ""]
    commits = sorted({r.git_commit[:10] for r in runs.values() if r.git_commit})
    L += [
        f"- Seeds: {', '.join(map(str, runs))} ({len(runs)} run{'s' if len(runs) != 1 else ''})",
        "- Runs: "
        + ", ".join(
            f"{s}: `{r.run_id[:8]}`" + (f" ({r.dvc_exp_name})" if r.dvc_exp_name else "") for s, r in runs.items()
        ),
        f"- Code: {', '.join(f'`{c}`' for c in commits) or 'unknown commit'}",
        "",
    ]
    for metric in result.report_metrics:
        rows = [[str(seed)] + [_seed_cell(result, method, seed, s, metric) for s in scopes] for seed in seeds_all]
        rows.append(
            ["**Mean±Std**"] + [fmt_mean_std(result.summary[method][s][metric], metric, len(runs)) for s in scopes]
        )
        L += [f"### {METRIC_LABELS[metric]}", ""] + md_table(["Seed"] + [scope_label(s) for s in scopes], rows)
    if method != result.baseline:
        rows = [
            _test_row(result.comparison(method, s, metric), metric, s)
            for metric in result.report_metrics
            for s in scopes
        ]
        L += [f"### Statistical test (vs {method_label(result.baseline)})", ""]
        L += md_table(
            ["Metric", "Domain", "Δ Mean", "p-value (t-test)", "Holm p", "Significance", "Seeds used"],
            rows,
            align_right_from=2,
        )
    return L


def _significance_section(result: ComparisonResult) -> list[str]:
    baseline, scopes = result.baseline, result.table_scopes
    others = [m for m in result.methods if m != baseline]
    L = [f"## Statistical significance (vs {method_label(baseline)})", ""]
    if not others:
        return L + [f"Only the baseline `{baseline}` has valid runs: there is nothing to compare.", ""]
    if not result.runs[baseline]:
        L += [f"The baseline `{baseline}` has no valid run: no paired statistics.", ""]
    for metric in result.report_metrics:

        def cell(m: str, s: str, metric: str = metric) -> str:
            c = result.comparison(m, s, metric)
            return p_cell(c) if c is not None else "no data"

        L += [f"### {METRIC_LABELS[metric]}: p-value (paired t-test → Holm-adjusted, mark)", ""]
        L += _methods_by_scope(others, scopes, cell)
    for metric in result.report_metrics:
        rows = [_details_row(c) for m in others for s in scopes if (c := result.comparison(m, s, metric)) is not None]
        L += [f"### {METRIC_LABELS[metric]}: details", ""]
        L += md_table(
            [
                "Method",
                "Domain",
                "n",
                "Seeds used",
                "Baseline (paired)",
                "Method (paired)",
                "Δ",
                "t",
                "p t-test",
                "p Wilcoxon",
                "p Holm",
                "d_z",
                "Sig.",
                "Notes",
            ],
            rows,
            align_right_from=2,
        )
    return L


def _runs_block(result: ComparisonResult) -> list[str]:
    sel = result.selection
    rows = [
        [
            method,
            str(seed),
            f"`{r.run_id}`",
            r.run_name or "unnamed",
            r.dvc_exp_name or "none",
            (r.git_commit or "unknown")[:10],
            r.started or "unknown",
            ", ".join(r.invalid_domains) or "none",
        ]
        for method, runs in result.runs.items()
        for seed, r in runs.items()
    ]
    L = ["## Runs", ""]
    L += md_table(["Method", "Seed", "Run", "Name", "DVC experiment", "Commit", "Started", "Invalid domains"], rows, 99)
    if sel.left_out:
        rows = [
            [str(x.method), str(x.seed), f"`{x.run.run_id}`", x.run.run_name or "unnamed", x.reason]
            for x in sel.left_out
        ]
        L += ["### Left out", ""] + md_table(["Method", "Seed", "Run", "Name", "Reason"], rows, 99)
    if sel.superseded:
        rows = [
            [x.method, str(x.seed), f"`{x.used.run_id}`", ", ".join(f"`{i.run_id}`" for i in x.ignored)]
            for x in sel.superseded
        ]
        L += ["### Older runs of the same method and seed (the latest is used)", ""]
        L += md_table(["Method", "Seed", "Used", "Ignored"], rows, 99)
    return L


VERDICT_WORDS = (
    "**better** / **worse**: the difference is beyond the seed-to-seed noise (paired t-test over seeds, "
    "Holm-adjusted, at α; for AUROC also beyond the test-set noise of the seeds × maps bootstrap) and not "
    "inside the margin. **equivalent**: Δ is inside ±margin with confidence (TOST at α; for AUROC also the "
    "bootstrap's interval), so the method makes no practical difference (when Δ is also significant it is a "
    "real but negligible effect, and says so). **inconclusive**: neither is shown; the reason says how "
    "many seeds would show the observed Δ and how many would show equivalence."
)


def verdict_section(result: ComparisonResult) -> list[str]:
    """The answer first: each method's verdict, then its comparisons' (rows that say the same collapsed)."""
    from hdmap_ad.apps.compare.decisions import collapse, margins_text, verdict_rows
    from hdmap_ad.apps.compare.labels import method_legend

    others = [m for m in result.methods if m != result.baseline]
    L = [f"## Verdicts (vs {method_label(result.baseline)})", ""]
    if not others:
        return L + ["Nothing to compare: only the baseline.", ""]
    alpha = result.uncertainty.get("alpha", 0.05)
    L += [
        f"α = {alpha:g}; margins (equivalent when |Δ| is within): {margins_text(result)}. {VERDICT_WORDS}",
        "",
        f"Methods: {method_legend(result.methods)}.",
        "",
    ]
    rows = []
    for m in others:
        v = result.verdicts.get(m)
        n = len(result.runs.get(m, {}))
        rows.append([method_label(m), str(n), f"**{v.verdict}**" if v else "no valid run", v.reason if v else ""])
    L += md_table(["Method", "Seeds", "Verdict", "Why"], rows, 99)
    for m in others:
        if m not in result.verdicts:
            continue
        lines = collapse(verdict_rows(result, m))
        L += [f"**{method_label(m)}**, per metric and domain:", ""]
        L += md_table(["Where", "Verdict", "Why"], [[w, v, why] for w, v, why in lines], 99)
        probs = [_bayes_line(result, m, metric) for metric in result.report_metrics]
        L += [p for p in probs if p] + ([""] if any(probs) else [])
    return L


def _bayes_line(result: ComparisonResult, method: str, metric: str) -> str:
    """The Bayesian P(worse / equivalent / better) of the mean over domains, with the n it rests on."""
    c = result.comparison(method, "mean", metric)
    if c is None or c.bayes is None or c.bayes.p_better is None:
        return ""
    b = c.bayes
    text = (
        f"- {METRIC_LABELS[metric]}, mean over domains: P(worse) {100 * b.p_worse:.0f} %, P(equivalent) "
        f"{100 * b.p_equivalent:.0f} %, P(better) {100 * b.p_better:.0f} % (Bayesian correlated t-test over "
        f"n={b.n} seeds)"
    )
    boot = c.bootstrap.probabilities if c.bootstrap is not None else None
    if boot is not None and boot.p_better is not None:
        text += (
            f"; over seeds × maps (bootstrap, n={boot.n} seeds): {100 * boot.p_worse:.0f} / "
            f"{100 * boot.p_equivalent:.0f} / {100 * boot.p_better:.0f} %"
        )
    return text


def render_markdown(result: ComparisonResult) -> str:
    """reports/comparison.md."""
    seeds_all = sorted(
        {s for runs in result.runs.values() for s in runs}
        | {x.seed for x in result.selection.left_out if x.seed is not None and x.method in result.methods}
    )
    L = _header(result)
    L[2:2] = verdict_section(result)  # right after the title: the answer first
    for method in result.methods:
        L += _method_section(result, method, seeds_all)
    L += ["## Summary Table (All Methods)", ""]
    for metric in result.report_metrics:
        L += [f"### {METRIC_LABELS[metric]} (Mean±Std)", ""]  # "(n=k)" marks a method with fewer seeds
        L += _methods_by_scope(
            result.methods,
            result.table_scopes,
            lambda m, s, metric=metric: fmt_mean_std(result.summary[m][s][metric], metric, result.most_seeds),
        )
    L += _significance_section(result)
    L += uncertainty_section(result)
    if result.plots:
        L += (
            ["## Plots (per seed, per domain)", ""]
            + [f"![{p.metric} {p.scope}]({p.relpath})" for p in result.plots]
            + [""]
        )
    L += _runs_block(result)
    return "\n".join(L).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ plots


def write_plots(result: ComparisonResult, plots_dir: Path, report_path: Path) -> list[PlotFile]:
    """One PNG per report metric and table scope, plus the per-seed numbers as CSV (for `dvc plots`).
    The folder is replaced as a whole: complete and without plots of domains or metrics no longer
    compared."""
    from hdmap_ad.pipeline.plots import plot_seed_comparison

    plots_dir = Path(plots_dir)
    written = []
    rows = ["method,seed,scope,metric,value"]
    for method in result.methods:
        for scope, by_metric in result.values.get(method, {}).items():
            for metric, per_seed in by_metric.items():
                rows += [f"{method},{seed},{scope},{metric},{v!r}" for seed, v in sorted(per_seed.items())]
    with atomic_dir(plots_dir) as tmp:
        write_text("\n".join(rows) + "\n", tmp / "data" / "per_seed.csv")
        for metric in result.report_metrics:
            for scope in result.table_scopes:
                data = {m: result.values.get(m, {}).get(scope, {}).get(metric, {}) for m in result.methods}
                name = f"{metric}_{scope}.png"
                plot_seed_comparison(
                    data, METRIC_LABELS[metric], scope_label(scope), tmp / name, percent=metric not in NOT_PERCENT
                )
                out = plots_dir / name
                written.append(PlotFile(metric, scope, str(out), os.path.relpath(out, Path(report_path).parent)))
    return written
