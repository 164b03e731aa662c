"""The report's uncertainty sections: Δ with its intervals per method × metric, DeLong and the
hierarchical bootstrap (AUROC), and the seeds needed in words (docs/design.md#stats-intervals to
#stats-power)."""

from __future__ import annotations

from collections.abc import Sequence

from hdmap_ad.apps.compare.cells import (
    NOT_COMPUTABLE_CELL,
    delta_cell,
    fmt_delta,
    fmt_interval,
    fmt_number,
    fmt_p,
    fmt_value,
    improvement_cell,
    mark_cell,
    md_table,
    not_computable_parts,
    share_cell,
)
from hdmap_ad.apps.compare.labels import METRIC_LABELS, method_label, scope_label
from hdmap_ad.apps.compare.result import PER_MAP_METRIC, Comparison, ComparisonResult


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
        fmt_number(r.d_z),
        mark_cell(c),
        improvement_cell(c),
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
            share_cell(b.p_improvement) if b is not None else NOT_COMPUTABLE_CELL,
        ]
    )


def uncertainty_section(result: ComparisonResult) -> list[str]:
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
            L += md_table(
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
                for w in not_computable_parts(c.interval.note)
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
    L += md_table(
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
