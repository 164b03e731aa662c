"""From the selected runs to one typed result: per-seed values, mean ± std per method x scope x
metric, and every method tested against the baseline (docs/design.md#7-statistics).

A run whose evaluation found NaN/Inf scores in a domain (`invalid_domains` tag) is left out of that
domain's comparisons and of the mean and pooled ones (a mean over fewer domains is not comparable).

Each Δ also gets its uncertainty (docs/design.md#stats-intervals to #stats-power): the t and bootstrap
intervals over the paired seeds, P(improvement) over seeds and the seeds needed, for every metric; and
for AUROC, from the runs' per-map scores (`permap`), DeLong per seed and pooled and the hierarchical
bootstrap over seeds × maps.

`ComparisonResult.to_json()` is reports/comparison.json and `ComparisonResult.metrics_json()` is
metrics/compare.json; the report renders from the same object.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hdmap_ad.apps.compare.labels import METRIC_LABELS, NOT_PERCENT
from hdmap_ad.apps.compare.result import (
    PER_MAP_METRIC,
    PER_MAP_SCOPES_NOTE,
    SUMMARY_SCOPES,
    Blanks,
    Comparison,
    ComparisonResult,
    SeedSummary,
    Values,
)
from hdmap_ad.apps.compare.runs import Selection
from hdmap_ad.apps.compare.settings import KNOWN_METRICS, Settings

if TYPE_CHECKING:  # (scipy is imported only when statistics are computed: the CLI starts faster)
    from collections.abc import Callable

    from hdmap_ad.apps.compare.permap import PerMap
    from hdmap_ad.apps.compare.scores import RunScores


def order_scopes(found: set[str], domains: Sequence[str]) -> list[str]:
    """The params' domains in their order, other scopes alphabetically, then mean and pooled."""
    listed = [d for d in domains if d in found]
    others = sorted(s for s in found if s not in domains and s not in SUMMARY_SCOPES)
    return listed + others + [s for s in SUMMARY_SCOPES if s in found]


def parse_metric_key(key: str) -> tuple[str, str] | None:
    """`test_<metric>/<scope>` (e.g. `test_tpr_at_fpr_1/domain_A`) -> (metric, scope); None for other keys."""
    name, sep, scope = key.partition("/")
    if not sep or not scope or "/" in scope or not name.startswith("test_"):
        return None
    metric = name[len("test_") :]
    return (metric, scope) if metric in KNOWN_METRICS else None


def per_seed_values(selection: Selection) -> tuple[Values, Blanks, list[str], list[str]]:
    """values[method][scope][metric][seed] (finite numbers only), why[method][seed][scope] for blanks,
    the scopes found and the metrics found."""
    values: Values = {}
    why: Blanks = {}
    scopes, metrics = set(), set()
    for method, by_seed in selection.used.items():
        for seed, run in by_seed.items():
            # the mean and pooled numbers of a run with an invalid domain are not comparable (a list: the
            # details JSON lists them in a fixed order)
            excluded = [*run.invalid_domains, *SUMMARY_SCOPES] if run.invalid_domains else []
            for key, value in run.metrics.items():
                parsed = parse_metric_key(key)
                if parsed is None:
                    continue
                metric, scope = parsed
                scopes.add(scope)
                metrics.add(metric)
                if scope in excluded:
                    continue
                if value is None or not math.isfinite(float(value)):
                    continue
                values.setdefault(method, {}).setdefault(scope, {}).setdefault(metric, {})[seed] = float(value)
            for scope in excluded:
                scopes.add(scope)
                why.setdefault(method, {}).setdefault(seed, {})[scope] = (
                    "invalid" if scope in run.invalid_domains else f"invalid ({', '.join(run.invalid_domains)})"
                )
    metric_list = [m for m in KNOWN_METRICS if m in metrics]
    return values, why, sorted(scopes), metric_list


def compare_methods(
    values: Values,
    why: Blanks,
    baseline: str,
    methods: Sequence[str],
    scopes: Sequence[str],
    metrics: Sequence[str],
    selection: Selection,
    settings: Settings | None = None,
) -> list[Comparison]:
    """paired_test for each method x scope x metric vs the baseline; Holm within each metric's table
    (all methods x domains + mean) and, separately, within each metric's pooled comparisons; and the
    seed-level uncertainty of each Δ (`seed_uncertainty`)."""
    from hdmap_ad.pipeline.stats.paired import fill_holm, paired_test, unpaired_difference

    settings = settings or Settings()

    out: list[Comparison] = []
    base_vals = values.get(baseline, {})
    for metric in metrics:
        families: dict[str, list[Comparison]] = {}
        for method in methods:
            if method == baseline:
                continue
            for scope in scopes:
                b = base_vals.get(scope, {}).get(metric, {})
                m = values.get(method, {}).get(scope, {}).get(metric, {})
                if not b and not m and not any(metric in values.get(x, {}).get(scope, {}) for x in values):
                    continue  # not defined for this scope (e.g. the threshold of the mean): nothing to test
                res = paired_test(b, m)
                unpaired = unpaired_difference(b, m) if res.n == 0 else None
                notes = [n for n in res.note.split("; ") if n] + _blank_notes(method, baseline, scope, why, selection)
                if unpaired is not None and unpaired.note:
                    notes.append(unpaired.note)
                family = f"{metric}:pooled" if scope == "pooled" else f"{metric}:table"
                diffs = [m[s] - b[s] for s in res.seeds]
                families.setdefault(family, []).append(
                    Comparison(
                        method,
                        scope,
                        metric,
                        family,
                        res,
                        unpaired,
                        tuple(notes),
                        **seed_uncertainty(diffs, scope, metric, settings),
                    )
                )
        for items in families.values():
            fill_holm([c.paired for c in items], which="p_ttest")
            out += items
    return out


def seed_uncertainty(diffs: Sequence[float], scope: str, metric: str, settings: Settings) -> dict[str, Any]:
    """The Comparison fields computed from the per-seed differences (method − baseline) alone."""
    from hdmap_ad.pipeline.stats.equivalence import bayes_correlated_t, tost_paired
    from hdmap_ad.pipeline.stats.intervals import paired_delta_interval, probability_of_improvement
    from hdmap_ad.pipeline.stats.power import describe_seeds_needed, seeds_needed

    margin = settings.margin(metric)
    need = seeds_needed(diffs, alpha=settings.alpha, power=settings.power, margin=margin)
    pct, label = metric not in NOT_PERCENT, METRIC_LABELS.get(metric, metric)
    where = "the mean over domains" if scope == "mean" else scope
    return {
        "interval": paired_delta_interval(
            diffs, settings.confidence, settings.bootstrap_resamples, settings.bootstrap_seed
        ),
        "improvement": probability_of_improvement(diffs),
        "margin": margin,
        "tost": tost_paired(diffs, margin, settings.alpha) if margin is not None else None,
        "bayes": bayes_correlated_t(diffs, margin) if margin is not None else None,
        "seeds_needed": need,
        # "to confirm a +0.40 pt AUROC gain on domain_C at α=0.05 (80 % power) you need ~N paired seeds"
        "seeds_needed_text": describe_seeds_needed(
            need,
            where if need.n_needed or need.more_than else f"{where} ({label})",  # (its unit names it)
            100.0 if pct else 1.0,
            f"pt {label}" if pct else label,
        ),
    }


def attach_per_map(comparisons: Sequence[Comparison], per_map: PerMap) -> list[Comparison]:
    """The AUROC comparisons with their DeLong and hierarchical-bootstrap results (other ones as they are)."""
    from dataclasses import replace

    out = []
    for c in comparisons:
        if c.metric == PER_MAP_METRIC and c.method in per_map.delong:
            c = replace(
                c,
                delong=per_map.delong[c.method].get(c.scope),
                bootstrap=per_map.bootstrap.get(c.method, {}).get(c.scope),
                per_map_notes=list(per_map.scope_notes.get((c.method, c.scope), ())),
            )
        out.append(c)
    return out


def _blank_notes(method: str, baseline: str, scope: str, why: Blanks, selection: Selection) -> list[str]:
    notes = []
    for who in (baseline, method):
        bad = [s for s, scopes in why.get(who, {}).items() if scope in scopes]
        if bad:
            notes.append(
                f"{who} seed(s) {', '.join(map(str, sorted(bad)))} left out: "
                + (
                    "domain invalid (NaN/Inf scores)"
                    if scope not in SUMMARY_SCOPES
                    else "a domain was invalid (NaN/Inf scores)"
                )
            )
        gone = sorted(
            {
                x.seed
                for x in selection.left_out
                if x.method == who and x.seed is not None and x.seed not in selection.used.get(who, {})
            }
        )
        invalid, elsewhere = [], {}
        for s in gone:
            reasons = [x for x in selection.left_out if x.method == who and x.seed == s]
            if all(x.differs is not None for x in reasons):  # valid, only in another comparison group
                elsewhere[s] = "; ".join(
                    dict.fromkeys(", ".join(x.differs) or "no logged setting differs" for x in reasons)
                )
            else:
                invalid.append(s)
        if invalid:
            notes.append(f"{who} seed(s) {', '.join(map(str, invalid))} have no valid run (see left_out)")
        for s, what in elsewhere.items():
            notes.append(f"{who} seed {s}: its run is in another comparison group ({what})")
    return notes


def summarise_values(
    values: Values, methods: Sequence[str], scopes: Sequence[str], metrics: Sequence[str]
) -> dict[str, dict[str, dict[str, SeedSummary]]]:
    from hdmap_ad.pipeline.stats.common import mean_std

    out: dict[str, dict[str, dict[str, SeedSummary]]] = {}
    for method in methods:
        for scope in scopes:
            for metric in metrics:
                per_seed = values.get(method, {}).get(scope, {}).get(metric, {})
                entry = SeedSummary(len(per_seed), tuple(sorted(per_seed)))
                if per_seed:
                    entry = SeedSummary(entry.n, entry.seeds, *mean_std(list(per_seed.values())))
                out.setdefault(method, {}).setdefault(scope, {})[metric] = entry
    return out


def build_notes(
    selection: Selection, baseline: str, methods: Sequence[str], comparisons: Sequence[Comparison]
) -> list[str]:
    """What the reader must know about the runs: where the group came from, what is missing, left out,
    superseded, unpaired or mixed."""
    notes: list[str] = []
    ref = selection.reference
    if ref is not None and ref.fallback:
        notes.append(f"comparison group {ref.key[:6] if ref.key else 'none'} taken from {ref.source}")
    if baseline not in selection.used:
        notes.append(f"the baseline `{baseline}` has no valid run: no paired statistics")
    if len([m for m in methods if m in selection.used]) < 2:
        notes.append("fewer than two methods with valid runs: no comparison is possible")
    for m in methods:
        if m not in selection.used and m != baseline:
            notes.append(f"method `{m}` was asked for but has no valid run")
    for x in selection.invalid:
        notes.append(
            f"**{x.method} seed {x.seed}** (run `{x.run.run_id}`): NaN/Inf scores in "
            f"{', '.join(x.domains)} → left out of those domains and of the mean and pooled comparisons"
        )
    for x in selection.left_out:
        r = x.run
        notes.append(
            f"left out {r.run_name or r.run_id} (`{r.run_id[:8]}`, method {r.method}, seed {r.seed}): {x.reason}"
        )
    for x in selection.superseded:
        notes.append(
            f"{x.method} seed {x.seed}: {len(x.ignored) + 1} valid runs; the latest "
            f"(`{x.used.run_id[:8]}`, started {x.used.started}) is used, ignored: "
            f"{', '.join(i.run_id[:8] for i in x.ignored)}"
        )
    for m, n in selection.not_selected.items():
        notes.append(f"{n} valid run(s) of `{m}` not compared (not in the selected methods)")
    few: dict[str, set[str]] = {}
    for c in comparisons:
        if c.paired.n < 2 and c.method in selection.used and baseline in selection.used and c.pairing != "unpaired":
            few.setdefault(c.method, set()).add(f"{c.scope}: {c.paired.n}")
    for m, where in few.items():
        notes.append(
            f"{m} vs {baseline}: fewer than 2 paired seeds → no p-value (paired seeds per scope: "
            f"{', '.join(sorted(where))})"
        )
    base_seeds = set(selection.used.get(baseline, {}))
    for m in methods:
        if m == baseline or m not in selection.used:
            continue
        seeds = set(selection.used[m])
        if seeds != base_seeds and seeds & base_seeds:  # (no common seed at all: see the "not paired" line)
            notes.append(
                f"{m}: paired on seeds {', '.join(map(str, sorted(seeds & base_seeds))) or 'none'} "
                f"(only {m}: {', '.join(map(str, sorted(seeds - base_seeds))) or 'none'}; "
                f"only {baseline}: {', '.join(map(str, sorted(base_seeds - seeds))) or 'none'})"
            )
    commits = sorted({(r.git_commit or "")[:10] for by in selection.used.values() for r in by.values()} - {""})
    if len(commits) > 1:
        notes.append(f"the compared runs come from {len(commits)} commits: {', '.join(commits)}")
    return notes


def analyse(
    selection: Selection,
    settings: Settings,
    methods: Sequence[str],
    *,
    profile: str | None,
    experiment_id: str,
    tracking_uri: str,
    scores: Callable[[str], RunScores] | None = None,
) -> ComparisonResult:
    """The typed result for the selected runs: `methods` listed (baseline first), `profile` the one
    selected by (None: any). `scores(run_id)`: a run's per-map scores (None: no DeLong, no bootstrap)."""
    from hdmap_ad.apps.compare.decisions import attach_verdicts, method_verdicts
    from hdmap_ad.apps.compare.permap import per_map_statistics
    from hdmap_ad.apps.compare.runs import pairing_hints
    from hdmap_ad.apps.compare.scores import SCORES_ARTIFACT

    values, why, found_scopes, metrics = per_seed_values(selection)
    metrics = [m for m in KNOWN_METRICS if m in set(metrics) | set(settings.metrics)]
    # the domains the runs report; with no run at all, the params' domains (so the empty tables look as planned)
    scopes = order_scopes(
        set(found_scopes) | {"mean"} | (set() if found_scopes else set(settings.domains)), settings.domains
    )
    comparisons = compare_methods(values, why, settings.baseline, methods, scopes, metrics, selection, settings)
    uncertainty: dict[str, Any] = {
        "confidence": settings.confidence,
        "bootstrap_resamples": settings.bootstrap_resamples,
        "bootstrap_seed": settings.bootstrap_seed,
        "alpha": settings.alpha,
        "power": settings.power,
        "scores_artifact": SCORES_ARTIFACT,
        "per_map_scopes": PER_MAP_SCOPES_NOTE,
        "per_map": {},
    }
    per_map_notes: list[str] = []
    if scores is not None and PER_MAP_METRIC in metrics:
        domains = [s for s in scopes if s not in SUMMARY_SCOPES]
        per_map = per_map_statistics(
            selection,
            scores,
            settings.baseline,
            methods,
            domains,
            confidence=settings.confidence,
            n_resamples=settings.bootstrap_resamples,
            seed=settings.bootstrap_seed,
            margin=settings.margin(PER_MAP_METRIC),
            alpha=settings.alpha,
        )
        comparisons = attach_per_map(comparisons, per_map)
        uncertainty["per_map"] = per_map.runs
        per_map_notes = per_map.notes
    comparisons = attach_verdicts(comparisons, settings.alpha)
    table_scopes = [s for s in scopes if s != "pooled"]
    verdicts = method_verdicts(comparisons, methods, table_scopes, settings.metrics)
    uncertainty["rope_points"] = dict(settings.rope)
    hints = pairing_hints(selection, settings.baseline, methods)
    notes = [h.line for h in hints] + build_notes(selection, settings.baseline, methods, comparisons) + per_map_notes
    return ComparisonResult(
        generated=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        experiment=settings.experiment,
        experiment_id=experiment_id,
        tracking_uri=tracking_uri,
        profile=profile,
        baseline=settings.baseline,
        methods=list(methods),
        scopes=scopes,
        metrics=metrics,
        report_metrics=list(settings.metrics),
        selection=selection,
        values=values,
        blanks=why,
        summary=summarise_values(values, methods, scopes, metrics),
        comparisons=comparisons,
        hints=hints,
        notes=notes,
        uncertainty=uncertainty,
        verdicts=verdicts,
    )
