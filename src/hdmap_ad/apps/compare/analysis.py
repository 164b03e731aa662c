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
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any

from hdmap_ad.apps.compare.runs import PairingHint, Reference, RunRecord, Selection
from hdmap_ad.apps.compare.settings import KNOWN_METRICS, Settings

if TYPE_CHECKING:  # (scipy is imported only when statistics are computed: the CLI starts faster)
    from collections.abc import Callable

    from hdmap_ad.apps.compare.permap import DomainMeanDeLong, PerMap
    from hdmap_ad.apps.compare.scores import RunScores
    from hdmap_ad.pipeline.stats.bootstrap import BootstrapDelta
    from hdmap_ad.pipeline.stats.delong import PooledDeLongResult
    from hdmap_ad.pipeline.stats.intervals import DeltaInterval, Improvement
    from hdmap_ad.pipeline.stats.paired import PairedResult, UnpairedResult
    from hdmap_ad.pipeline.stats.power import SeedsNeeded

NOT_PERCENT = {"threshold"}  # metrics that are not fractions (shown and summarised as they are)
METRIC_LABELS = {
    "auroc": "AUROC",
    "ap": "AP",
    "f1_max": "F1-max",
    "tpr_at_fpr_1": "TPR@FPR=1%",
    "tpr_at_fpr_5": "TPR@FPR=5%",
    "precision": "Precision",
    "recall": "Recall",
    "f1": "F1",
    "accuracy": "Accuracy",
    "threshold": "Threshold",
    "pixel_auroc": "pixel AUROC",
    "aux_domain_accuracy": "aux domain accuracy",
}
SUMMARY_SCOPES = ("mean", "pooled")
MARK_LEGEND = "*** p<0.001, ** p<0.01, * p<0.05, n.s. not significant (marks use the Holm-adjusted p)"
STD_NOTE = "std over seeds with ddof=1 (sample standard deviation)"
TESTS_NOTE = (
    "paired t-test scipy.stats.ttest_rel(method, baseline); Wilcoxon signed-rank scipy.stats.wilcoxon; "
    "d_z = mean(method - baseline) / std(method - baseline, ddof=1); with no common seed only the "
    "unpaired difference of means (unpaired_delta), no p-value"
)
HOLM_NOTE = (
    "Holm over one family per metric: all methods x (domains + mean) ('<metric>:table'); the pooled "
    "comparisons form a second family per metric ('<metric>:pooled')"
)
PER_MAP_METRIC = "auroc"  # the one metric DeLong and the hierarchical bootstrap cover
PER_MAP_SCOPES_NOTE = "DeLong and the hierarchical bootstrap: AUROC, per domain and the mean over domains"

# method -> scope -> metric -> seed -> value (finite numbers only)
Values = dict[str, dict[str, dict[str, dict[int, float]]]]
# method -> seed -> scope -> why the value is blank
Blanks = dict[str, dict[int, dict[str, str]]]


@dataclass(frozen=True)
class SeedSummary:
    """Mean and sample std (ddof=1) over the seeds with a value; mean None without any."""

    n: int
    seeds: tuple[int, ...] = ()
    mean: float | None = None
    std: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "seeds": list(self.seeds), "mean": self.mean, "std": self.std}


@dataclass(frozen=True)
class Comparison:
    """One method against the baseline on one scope and metric.

    `paired`: the paired tests over the common seeds (p_holm filled within `holm_family`);
    `unpaired`: the difference of means, computed only when no seed is common. Further statistics go
    in new fields after `notes` (with defaults): `to_json` writes every such field under its name.
    """

    method: str
    scope: str
    metric: str
    holm_family: str
    paired: PairedResult
    unpaired: UnpairedResult | None = None
    notes: tuple[str, ...] = ()
    # over the paired seeds (every metric): t and bootstrap intervals of Δ, P(improvement), seeds needed
    interval: DeltaInterval | None = None
    improvement: Improvement | None = None
    seeds_needed: SeedsNeeded | None = None
    seeds_needed_text: str = ""
    # from the per-map scores (AUROC; domains and the mean): DeLong and the hierarchical bootstrap
    delong: PooledDeLongResult | DomainMeanDeLong | None = None
    bootstrap: BootstrapDelta | None = None
    per_map_notes: list[str] = field(default_factory=list)

    @property
    def pairing(self) -> str:
        """ "paired": Δ and the tests over common seeds; "unpaired": no common seed, only the difference
        of the means (no p-value); "none": a side has no value at all."""
        if self.paired.n:
            return "paired"
        return "unpaired" if self.unpaired is not None and self.unpaired.delta is not None else "none"

    @property
    def unpaired_delta(self) -> float | None:
        return self.unpaired.delta if self.pairing == "unpaired" else None

    @property
    def significance(self) -> str:
        from hdmap_ad.pipeline.stats.paired import significance_mark

        return significance_mark(self.paired.p_holm)

    @property
    def significance_raw(self) -> str:
        from hdmap_ad.pipeline.stats.paired import significance_mark

        return significance_mark(self.paired.p_ttest)

    def to_json(self) -> dict[str, Any]:
        out = {
            **asdict(self.paired),
            "method": self.method,
            "scope": self.scope,
            "metric": self.metric,
            "holm_family": self.holm_family,
            "pairing": self.pairing,
            "unpaired_delta": self.unpaired_delta,
            "unpaired": asdict(self.unpaired) if self.pairing == "unpaired" else None,
            "significance": self.significance,
            "significance_raw": self.significance_raw,
            "notes": list(self.notes),
        }
        for f in fields(self)[len(_COMPARISON_CORE) :]:
            value = getattr(self, f.name)
            out[f.name] = (
                value.to_json() if hasattr(value, "to_json") else (asdict(value) if is_dataclass(value) else value)
            )
        return out


_COMPARISON_CORE = ("method", "scope", "metric", "holm_family", "paired", "unpaired", "notes")


@dataclass(frozen=True)
class PlotFile:
    metric: str
    scope: str
    path: str
    relpath: str  # from the report's folder, for its image links


@dataclass
class ComparisonResult:
    """Everything compare found and computed; the outputs are views of it."""

    generated: str
    experiment: str
    experiment_id: str
    tracking_uri: str
    profile: str | None
    baseline: str
    methods: list[str]  # the baseline first, then the asked-for or found methods
    scopes: list[str]  # domains, other scopes, mean, pooled (those found)
    metrics: list[str]  # every metric compared (found or asked for)
    report_metrics: list[str]  # the ones the tables show (compare.metrics)
    selection: Selection
    values: Values
    blanks: Blanks
    summary: dict[str, dict[str, dict[str, SeedSummary]]]  # method -> scope -> metric
    comparisons: list[Comparison]
    hints: list[PairingHint]
    notes: list[str]
    plots: list[PlotFile] = field(default_factory=list)
    compare_run_id: str | None = None  # the MLflow run it was logged to (not in the JSON files)
    uncertainty: dict[str, Any] = field(default_factory=dict)  # settings and per-method per-map inputs

    def __post_init__(self) -> None:
        self._index = {(c.method, c.scope, c.metric): c for c in self.comparisons}

    @property
    def reference(self) -> Reference | None:
        return self.selection.reference

    @property
    def table_scopes(self) -> list[str]:
        """The scopes of the report's tables and metrics/compare.json (pooled is in the JSON details only)."""
        return [s for s in self.scopes if s != "pooled"]

    @property
    def runs(self) -> dict[str, dict[int, RunRecord]]:
        """method -> seed -> run used, for every listed method (empty when it has no valid run)."""
        return {m: self.selection.used.get(m, {}) for m in self.methods}

    @property
    def most_seeds(self) -> int:
        """The most seeds of any method: a cell with fewer is marked `(n=k)`."""
        return max([len(r) for r in self.runs.values()] or [0])

    def comparison(self, method: str, scope: str, metric: str) -> Comparison | None:
        return self._index.get((method, scope, metric))

    def to_json(self) -> dict[str, Any]:
        """reports/comparison.json: runs, left-out runs, notes, every statistic."""
        sel, ref = self.selection, self.reference
        return {
            "generated": self.generated,
            "experiment": self.experiment,
            "experiment_id": self.experiment_id,
            "tracking_uri": self.tracking_uri,
            "profile": self.profile,
            "reference": ref.to_json() if ref is not None else None,
            "precision": sel.precision.to_json() if sel.precision is not None else None,
            "baseline": self.baseline,
            "methods": self.methods,
            "scopes": self.scopes,
            "table_scopes": self.table_scopes,
            "metrics": self.metrics,
            "report_metrics": self.report_metrics,
            "std_note": STD_NOTE,
            "tests": TESTS_NOTE,
            "holm": HOLM_NOTE,
            "significance_legend": MARK_LEGEND,
            "n_runs_found": sel.n_found,
            "runs": {
                m: {str(s): {**r.brief(), "invalid_domains": r.invalid_domains} for s, r in by_seed.items()}
                for m, by_seed in self.runs.items()
            },
            "left_out": [x.to_json() for x in sel.left_out],
            "superseded": [x.to_json() for x in sel.superseded],
            "invalid": [x.to_json() for x in sel.invalid],
            "not_selected": sel.not_selected,
            "unpaired": [h.to_json() for h in self.hints],
            "values": {
                m: {
                    sc: {mt: {str(s): v for s, v in per.items()} for mt, per in by_scope.items()}
                    for sc, by_scope in self.values[m].items()
                }
                for m in self.methods
                if m in self.values
            },
            "blanks": {m: {str(s): d for s, d in by_seed.items()} for m, by_seed in self.blanks.items()},
            "summary": {
                m: {s: {mt: e.to_json() for mt, e in by_metric.items()} for s, by_metric in by_scope.items()}
                for m, by_scope in self.summary.items()
            },
            "comparisons": [c.to_json() for c in self.comparisons],
            "notes": self.notes,
            "plots": [asdict(p) for p in self.plots],
            "uncertainty": self.uncertainty,
        }

    def metrics_json(self) -> dict[str, Any]:
        """metrics/compare.json: method -> scope (domains, mean) -> report metric -> mean over seeds
        (percent), n seeds, Δ vs the baseline (points; paired over n_paired seeds, or labelled unpaired)
        and the Holm p. Only numbers computed from the runs' values: the same runs give the same file."""
        out: dict[str, Any] = {}
        for m in self.methods:
            for s in self.table_scopes:
                for metric in self.report_metrics:
                    out.setdefault(m, {}).setdefault(s, {})[metric] = self._headline(m, s, metric)
        return out

    def _headline(self, method: str, scope: str, metric: str) -> dict[str, Any]:
        pct = metric not in NOT_PERCENT
        scale, mean_key, delta_key = (100.0, "mean_pct", "delta_pts") if pct else (1.0, "mean", "delta")
        entry = self.summary[method][scope][metric]
        e: dict[str, Any] = {"n": entry.n}
        if entry.mean is not None:
            e[mean_key] = _round(scale * entry.mean)
        c = self.comparison(method, scope, metric)
        if c is not None:
            e["n_paired"] = c.paired.n
            if c.paired.delta is not None:
                e[delta_key] = _round(scale * c.paired.delta)
            if c.unpaired_delta is not None:
                e[f"{delta_key}_unpaired"] = _round(scale * c.unpaired_delta)
            if c.paired.p_holm is not None:
                e["p_holm"] = float(f"{c.paired.p_holm:.4g}")
            if metric == PER_MAP_METRIC and scope == "mean":  # the headline Δ's intervals, and only its
                for key, v in (
                    ("t_low", c.interval and c.interval.t_low),
                    ("t_high", c.interval and c.interval.t_high),
                    ("hboot_low", c.bootstrap and c.bootstrap.low),
                    ("hboot_high", c.bootstrap and c.bootstrap.high),
                ):
                    if v is not None:
                        e[f"{delta_key}_{key}"] = _round(scale * v)
        return e


def _round(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(float(v), digits)


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
    from hdmap_ad.pipeline.stats.intervals import paired_delta_interval, probability_of_improvement
    from hdmap_ad.pipeline.stats.power import describe_seeds_needed, seeds_needed

    need = seeds_needed(diffs, alpha=settings.alpha, power=settings.power)
    pct, label = metric not in NOT_PERCENT, METRIC_LABELS.get(metric, metric)
    where = "the mean over domains" if scope == "mean" else scope
    return {
        "interval": paired_delta_interval(
            diffs, settings.confidence, settings.bootstrap_resamples, settings.bootstrap_seed
        ),
        "improvement": probability_of_improvement(diffs),
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
        if gone:
            notes.append(f"{who} seed(s) {', '.join(map(str, gone))} have no valid run (see left_out)")
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
        )
        comparisons = attach_per_map(comparisons, per_map)
        uncertainty["per_map"] = per_map.runs
        per_map_notes = per_map.notes
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
    )
