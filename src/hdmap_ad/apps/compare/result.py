"""The typed result of a comparison and its JSON views: `ComparisonResult.to_json()` is
reports/comparison.json and `ComparisonResult.metrics_json()` is metrics/compare.json; the report and
the terminal render from the same object."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any

from hdmap_ad.apps.compare.runs import PairingHint, Reference, RunRecord, Selection

if TYPE_CHECKING:  # (scipy is imported only when statistics are computed: the CLI starts faster)
    from hdmap_ad.apps.compare.permap import DomainMeanDeLong
    from hdmap_ad.pipeline.stats.bootstrap import BootstrapDelta
    from hdmap_ad.pipeline.stats.delong import PooledDeLongResult
    from hdmap_ad.pipeline.stats.equivalence import BayesProbabilities, TostResult
    from hdmap_ad.pipeline.stats.intervals import DeltaInterval, Improvement
    from hdmap_ad.pipeline.stats.paired import PairedResult, UnpairedResult
    from hdmap_ad.pipeline.stats.power import SeedsNeeded
    from hdmap_ad.pipeline.stats.verdict import Verdict

from hdmap_ad.apps.compare.labels import NOT_PERCENT

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
    # the decision (docs/design.md#stats-verdict): margin (the metric's unit), TOST and the Bayesian
    # probabilities over seeds, and the verdict
    margin: float | None = None
    tost: TostResult | None = None
    bayes: BayesProbabilities | None = None
    verdict: Verdict | None = None

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
    verdicts: dict[str, Verdict] = field(default_factory=dict)  # method -> its overall verdict

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
            "verdicts": {m: v.to_json() for m, v in self.verdicts.items()},
        }

    def metrics_json(self) -> dict[str, Any]:
        """metrics/compare.json: method -> scope (domains, mean) -> report metric -> mean over seeds
        (percent), n seeds, Δ vs the baseline (points; paired over n_paired seeds, or labelled unpaired)
        the Holm p and the verdict (and each method's overall verdict). Only numbers and verdicts computed from the runs' values: the same runs give the same file."""
        out: dict[str, Any] = {}
        for m in self.methods:
            if m in self.verdicts:  # the method's overall verdict, beside its scopes
                out.setdefault(m, {})["verdict"] = self.verdicts[m].verdict
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
            if c.verdict is not None:
                e["verdict"] = c.verdict.verdict
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
