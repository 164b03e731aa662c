"""Views of a ComparisonResult: the Markdown report (the experiment plan's tables, filled in), the
terminal tables (rich) and the per-seed plots."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from hdmap_ad.apps.compare.analysis import (
    MARK_LEGEND,
    METRIC_LABELS,
    NOT_PERCENT,
    PER_MAP_METRIC,
    Comparison,
    ComparisonResult,
    PlotFile,
    SeedSummary,
)
from hdmap_ad.apps.compare.runs import LeftOut, Selection
from hdmap_ad.core.files import atomic_dir, write_text
from hdmap_ad.core.method_params import method_label


# The experiment plan's names; the order is the method registry's, other methods follow alphabetically.
def scope_label(scope: str) -> str:
    if scope.startswith("domain_") and len(scope) > 7:
        return f"Domain {scope[7:]}"
    return {"mean": "Mean", "pooled": "Pooled"}.get(scope, scope)


# ------------------------------------------------------------------------------------------ cells


def fmt_value(v: float | None, metric: str) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}" if metric in NOT_PERCENT else f"{100 * v:.2f}"


def fmt_mean_std(entry: SeedSummary, metric: str, expected_n: int | None = None) -> str:
    if entry.mean is None:
        return "no data"
    text = fmt_value(entry.mean, metric)
    if entry.std is not None:
        text += f" ± {fmt_value(entry.std, metric)}"
    if entry.n < 2 or (expected_n is not None and entry.n != expected_n):
        text += f" (n={entry.n})"
    return text


def fmt_delta(v: float | None, metric: str) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.4g}" if metric in NOT_PERCENT else f"{100 * v:+.2f}"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def delta_cell(c: Comparison) -> str:
    """The paired Δ, or the unpaired difference of means labelled as such."""
    if c.pairing == "unpaired":
        return f"unpaired {fmt_delta(c.unpaired_delta, c.metric)}"
    return fmt_delta(c.paired.delta, c.metric)


def p_cell(c: Comparison) -> str:
    if c.pairing == "unpaired":
        return "n/a (not paired: no common seed)"
    if c.paired.p_ttest is None:
        return f"n/a (n={c.paired.n})" if c.paired.n < 2 else "n/a (no test, see notes)"
    return f"{fmt_p(c.paired.p_ttest)} → {fmt_p(c.paired.p_holm)} {c.significance}"


def _mark(c: Comparison) -> str:
    return c.significance if c.paired.p_holm is not None else "no p-value"


def _seeds(seeds: Sequence[int]) -> str:
    return ", ".join(map(str, seeds)) or "none"


# --------------------------------------------------------------------------------------- Markdown


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align_right_from: int = 1) -> list[str]:
    esc = [[str(x).replace("|", "\\|") for x in row] for row in rows]
    seps = ["---" if i < align_right_from else "---:" for i in range(len(header))]
    return (
        ["| " + " | ".join(header) + " |", "| " + " | ".join(seps) + " |"]
        + ["| " + " | ".join(r) + " |" for r in esc]
        + [""]
    )


def _methods_by_scope(methods: Sequence[str], scopes: Sequence[str], cell: Callable[[str, str], str]) -> list[str]:
    """A table with one row per method and one column per scope."""
    rows = [[method_label(m)] + [cell(m, s) for s in scopes] for m in methods]
    return _md_table(["Method"] + [scope_label(s) for s in scopes], rows)


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
        _mark(c),
        _seeds(c.paired.seeds),
    ]


def _details_row(c: Comparison) -> list[str]:
    """A row of a metric's `details` table: every statistic of one comparison."""
    r = c.paired
    return [
        method_label(c.method),
        scope_label(c.scope),
        str(r.n),
        _seeds(r.seeds),
        fmt_mean_std(SeedSummary(r.n, mean=r.baseline_mean, std=r.baseline_std), c.metric),
        fmt_mean_std(SeedSummary(r.n, mean=r.method_mean, std=r.method_std), c.metric),
        delta_cell(c),
        _num(r.t_stat),
        fmt_p(r.p_ttest),
        fmt_p(r.p_wilcoxon),
        fmt_p(r.p_holm),
        _num(r.d_z),
        _mark(c),
        "; ".join(n for n in c.notes if not n.startswith("seeds used")) or "none",
    ]


NOT_COMPUTABLE_CELL = "not computable"


def fmt_interval(low: float | None, high: float | None, metric: str) -> str:
    """[low, high] in points (Δ of a percent metric), or "not computable"."""
    if low is None or high is None:
        return NOT_COMPUTABLE_CELL
    return f"[{fmt_delta(low, metric)}, {fmt_delta(high, metric)}]"


def _share(v: float | None) -> str:
    return NOT_COMPUTABLE_CELL if v is None else f"{100 * v:.0f} %"


def _improvement_cell(c: Comparison) -> str:
    imp = c.improvement
    if imp is None or imp.share_better is None:
        return NOT_COMPUTABLE_CELL
    return f"{imp.n_better}/{imp.n}" + (f" ({imp.n_ties} tie{'s' if imp.n_ties > 1 else ''})" if imp.n_ties else "")


def _why(note: str) -> list[str]:
    """The "not computable: why" parts of a note (several may be joined by '; ')."""
    return [part.strip() for part in note.split("; ") if part.strip().startswith("not computable")]


def _interval_row(c: Comparison | None, scope: str) -> list[str]:
    """A row of a method's per-metric Δ table."""
    if c is None:
        return [scope_label(scope), "0"] + ["no data"] * 9
    iv, r = c.interval, c.paired
    if c.pairing == "unpaired":
        return [scope_label(scope), "0", delta_cell(c)] + ["n/a (not paired: no common seed)"] * 8
    return [
        scope_label(scope),
        str(r.n),
        delta_cell(c),
        fmt_interval(iv.t_low, iv.t_high, c.metric) if iv else NOT_COMPUTABLE_CELL,
        fmt_interval(iv.boot_low, iv.boot_high, c.metric) if iv else NOT_COMPUTABLE_CELL,
        fmt_p(r.p_ttest),
        fmt_p(r.p_wilcoxon),
        fmt_p(r.p_holm),
        _num(r.d_z),
        _mark(c),
        _improvement_cell(c),
    ]


def _delong_cell(d, metric: str) -> str:
    """Δ ± SE (p) of one DeLong test, in points."""
    if d is None:
        return "no scores"
    if d.delta is None:
        return NOT_COMPUTABLE_CELL
    if d.se is None:
        return f"{fmt_delta(d.delta, metric)} ({NOT_COMPUTABLE_CELL})"
    return f"{fmt_delta(d.delta, metric)} ± {fmt_value(d.se, metric)} (p={fmt_p(d.p)})"


def _per_seed_delong(c: Comparison, inputs: Sequence[int]) -> dict[int, object]:
    """seed -> its DeLong test (`inputs`: the seeds the pooled test was given, in its order)."""
    return dict(zip(inputs, getattr(c.delong, "per_seed", None) or []))


def _per_map_row(c: Comparison | None, scope: str, seeds: Sequence[int], inputs: Sequence[int]) -> list[str]:
    """A row of a method's DeLong / hierarchical-bootstrap table (AUROC)."""
    m = PER_MAP_METRIC
    if c is None or (c.delong is None and c.bootstrap is None):
        return [scope_label(scope)] + ["no per-map scores"] * (len(seeds) + 4)
    d, b = c.delong, c.bootstrap
    per_seed = _per_seed_delong(c, inputs)
    if scope == "mean":  # the mean's DeLong is combined from the domains' pooled tests: no per-seed test
        cells = ["per domain"] * len(seeds)
    else:
        cells = [_delong_cell(per_seed.get(s), m) if s in per_seed else "left out" for s in seeds]
    pooled = _delong_cell(d, m) if d is not None else "no scores"
    ci = fmt_interval(d.ci_low, d.ci_high, m) if d is not None else NOT_COMPUTABLE_CELL
    return (
        [scope_label(scope)]
        + cells
        + [
            pooled,
            ci,
            fmt_interval(b.low, b.high, m) if b is not None else NOT_COMPUTABLE_CELL,
            _share(b.p_improvement) if b is not None else NOT_COMPUTABLE_CELL,
        ]
    )


def _uncertainty_section(result: ComparisonResult) -> list[str]:
    """Δ with its intervals per method x metric, DeLong and the hierarchical bootstrap (AUROC), and
    the seeds needed in words (docs/design.md#stats-intervals to #stats-power)."""
    u, baseline = result.uncertainty, result.baseline
    others = [m for m in result.methods if m != baseline and result.runs[m]]
    if not others or not result.runs[baseline]:
        return []
    level = f"{100 * u.get('confidence', 0.95):g} %"
    B, seed = u.get("bootstrap_resamples"), u.get("bootstrap_seed")
    L = [
        f"## Uncertainty of Δ (vs {method_label(baseline)})",
        "",
        f"All intervals are {level} intervals of Δ = method − baseline (points).",
        f"- **t CI**: paired t interval over the seeds, mean(Δ) ± t(n−1)·sd(Δ, ddof=1)/√n. **boot CI**: percentile "
        f"bootstrap of mean(Δ) over the seeds (`scipy.stats.bootstrap`, {B} resamples, seed {seed}; coarse at few "
        "seeds, and narrower than the t interval). Both see only seed-to-seed noise on this one test set.",
        "- **P(impr.)**: paired seeds where the method beats the baseline (n better / n).",
        f"- **{METRIC_LABELS[PER_MAP_METRIC]} per map** (from each run's `{u.get('scores_artifact', 'eval/scores.csv')}`): "
        "DeLong's paired test per seed (Δ ± SE, p; same maps, correlated AUROCs) and **pooled** over the seeds "
        "(DeLong's contrast over all correlated AUROCs: test-set noise for these trained models only); for the mean "
        "over domains, SE = √(Σ SE_d²)/D (disjoint test sets). **Hierarchical bootstrap**: seeds and, within each "
        f"domain, fault and good maps resampled ({B} resamples, seed {seed}, one map draw shared by all seeds and "
        "both methods): both noise sources; **P(Δ>0)** is the share of its replicates with Δ > 0.",
        "- Which number answers which question: README.md, *Which number to trust for which question*.",
        "",
    ]
    for method in others:
        L += [f"### {method_label(method)} (`{method}`)", ""]
        for metric in result.report_metrics:
            rows = [_interval_row(result.comparison(method, s, metric), s) for s in result.table_scopes]
            L += [f"#### {METRIC_LABELS[metric]}: Δ with {level} intervals", ""]
            L += _md_table(
                ["Domain", "n", "Δ", "t CI", "boot CI", "p t-test", "p Wilcoxon", "Holm p", "d_z", "Sig.", "P(impr.)"],
                rows,
            )
        if PER_MAP_METRIC in result.report_metrics:
            L += _per_map_block(result, method, level)
        whys = sorted(
            {
                w
                for s in result.table_scopes
                for metric in result.report_metrics
                if (c := result.comparison(method, s, metric)) is not None and c.interval is not None
                for w in _why(c.interval.note)
            }
        )
        if whys:
            L += ["Not computable (intervals over seeds): " + "; ".join(whys) + ".", ""]
    L += _seeds_needed_block(result, others)
    return L


def _per_map_block(result: ComparisonResult, method: str, level: str) -> list[str]:
    m = PER_MAP_METRIC
    comps = {s: result.comparison(method, s, m) for s in result.table_scopes}
    inputs = result.uncertainty.get("per_map", {}).get(method, {}).get("seeds", {})  # scope -> seeds given
    seeds = sorted({s for by_scope in inputs.values() for s in by_scope})
    L = [f"#### {METRIC_LABELS[m]} per map: DeLong and hierarchical bootstrap", ""]
    if all(c is None or (c.delong is None and c.bootstrap is None) for c in comps.values()):
        return L + ["No per-map statistics: no paired run with per-map scores (see the notes).", ""]
    rows = [_per_map_row(comps[s], s, seeds, inputs.get(s, [])) for s in result.table_scopes]
    L += _md_table(
        ["Domain"]
        + [f"seed {s}: Δ ± SE (p)" for s in seeds]
        + ["pooled DeLong Δ ± SE (p)", f"pooled {level} CI", f"hier. bootstrap {level} CI", "P(Δ>0)"],
        rows,
    )
    notes = []
    for s, c in comps.items():
        if c is None:
            continue
        texts = list(c.per_map_notes)
        for obj in (c.delong, c.bootstrap):
            if obj is not None and obj.note and not obj.note.startswith("mean over "):  # (the mean is said above)
                texts.append(obj.note)
        for seed, r in _per_seed_delong(c, inputs.get(s, [])).items():
            if r.note:
                texts.append(f"seed {seed}: {r.note}")
        if texts:
            notes.append(f"- {scope_label(s)}: " + "; ".join(dict.fromkeys(texts)))
    return L + notes + ([""] if notes else [])


def _seeds_needed_block(result: ComparisonResult, others: Sequence[str]) -> list[str]:
    u = result.uncertainty
    L = [
        "## How many seeds",
        "",
        f"The seeds a two-sided paired t-test needs to confirm the observed Δ at α={u.get('alpha', 0.05):g} with "
        f"{100 * u.get('power', 0.8):.0f} % power, given the observed seed-to-seed sd (noncentral t). It plugs in the "
        "observed Δ and sd, both noisy at a few seeds: a guide to how many seeds to run next, not a promise.",
        "",
    ]
    for method in others:
        L += [f"**{method_label(method)} (`{method}`)**", ""]
        for metric in result.report_metrics:
            for s in result.table_scopes:
                c = result.comparison(method, s, metric)
                if c is not None and c.seeds_needed_text:
                    L.append(f"- {c.seeds_needed_text}")
        L.append("")
    return L


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
        L += [f"### {METRIC_LABELS[metric]}", ""] + _md_table(["Seed"] + [scope_label(s) for s in scopes], rows)
    if method != result.baseline:
        rows = [
            _test_row(result.comparison(method, s, metric), metric, s)
            for metric in result.report_metrics
            for s in scopes
        ]
        L += [f"### Statistical test (vs {method_label(result.baseline)})", ""]
        L += _md_table(
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
        L += _md_table(
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
    L += _md_table(
        ["Method", "Seed", "Run", "Name", "DVC experiment", "Commit", "Started", "Invalid domains"], rows, 99
    )
    if sel.left_out:
        rows = [
            [str(x.method), str(x.seed), f"`{x.run.run_id}`", x.run.run_name or "unnamed", x.reason]
            for x in sel.left_out
        ]
        L += ["### Left out", ""] + _md_table(["Method", "Seed", "Run", "Name", "Reason"], rows, 99)
    if sel.superseded:
        rows = [
            [x.method, str(x.seed), f"`{x.used.run_id}`", ", ".join(f"`{i.run_id}`" for i in x.ignored)]
            for x in sel.superseded
        ]
        L += ["### Older runs of the same method and seed (the latest is used)", ""]
        L += _md_table(["Method", "Seed", "Used", "Ignored"], rows, 99)
    return L


def render_markdown(result: ComparisonResult) -> str:
    """reports/comparison.md."""
    seeds_all = sorted(
        {s for runs in result.runs.values() for s in runs}
        | {x.seed for x in result.selection.left_out if x.seed is not None and x.method in result.methods}
    )
    L = _header(result)
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
    L += _uncertainty_section(result)
    if result.plots:
        L += (
            ["## Plots (per seed, per domain)", ""]
            + [f"![{p.metric} {p.scope}]({p.relpath})" for p in result.plots]
            + [""]
        )
    L += _runs_block(result)
    return "\n".join(L).rstrip() + "\n"


# --------------------------------------------------------------------------------------- terminal


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


def _summary_cell(result: ComparisonResult, method: str, scope: str, metric: str) -> str:
    text = fmt_mean_std(result.summary[method][scope][metric], metric, result.most_seeds).replace(" ± ", "±")
    c = result.comparison(method, scope, metric)
    if c is not None and c.pairing == "unpaired":
        text += f"\nunpaired Δ {fmt_delta(c.unpaired_delta, metric)} (no p)"
    elif c is not None:
        p = f"p={fmt_p(c.paired.p_holm)} {c.significance}" if c.paired.p_holm is not None else f"no p (n={c.paired.n})"
        text += f"\nΔ {fmt_delta(c.paired.delta, metric)} {p}"
        iv = c.interval
        if iv is not None and iv.t_low is not None and iv.t_high is not None:  # symmetric: its half-width stays narrow
            half = fmt_value((iv.t_high - iv.t_low) / 2, metric)
            text += f"\n{100 * iv.confidence:g}% CI ±{half}"
    return text


def print_summary(console, result: ComparisonResult) -> None:
    """One table per report metric: mean ± std per method and scope, with Δ and the Holm p."""
    from rich.markup import escape
    from rich.table import Table

    for metric in result.report_metrics:
        level = f"{100 * result.uncertainty.get('confidence', 0.95):g} %"
        table = Table(
            title=f"{METRIC_LABELS[metric]} (%): mean ± std (ddof=1); Δ vs {result.baseline}, Holm p, "
            f"{level} t interval of Δ over seeds (Δ ± half-width)"
        )
        table.add_column("method")
        for s in result.table_scopes:
            table.add_column(scope_label(s), justify="right")
        for m in result.methods:
            table.add_row(m, *[_summary_cell(result, m, s, metric) for s in result.table_scopes])
        console.print(table)
    for hint in result.hints:
        console.print(f"[bold yellow]{escape(hint.line)}[/]", soft_wrap=True)  # commands stay copyable


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
