"""The compare stage: read the evaluated runs from MLflow, pair them by seed, test every method against the baseline.

Outputs (each written atomically, and only when there is at least one valid run):
`metrics/compare.json` (what `dvc metrics diff` compares: per method x scope x report metric the mean
over seeds in percent, the number of seeds, Δ vs the baseline in points and the Holm p; nothing that
depends on the machine or the time), `reports/comparison.json` (everything else: runs, left-out runs,
notes, every statistic), `reports/comparison.md` (the experiment plan's tables, filled in), PNG plots
under `reports/plots/`, a summary on the terminal, and one MLflow run named `compare` (tag
`kind=compare`) in the experiment `<mlflow.experiment>-compare`, apart from the training runs.

Which runs count: FINISHED runs tagged `evaluated=true` with `method` and `seed` tags, of the active
profile, whose `comparison_key` tag equals the reference group's (the workspace's params and prepared
data; without prepared data, the newest baseline run's group). Everything else is listed with the
reason it was left out; a run of another group names the settings that differ. A run whose
evaluation found NaN/Inf scores in a domain (`invalid_domains` tag) is left out of that domain's
comparisons and of the mean and pooled ones (a mean over fewer domains is not comparable). When
several valid runs share (method, seed) the latest one is used and the others are named.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


from hdmap_ad.core.config import HDMAP_DOMAINS, HEADLINE_METRICS
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.paths import COMPARE_FILE as JSON_FILE
from hdmap_ad.core.paths import REPORT_FILE
from hdmap_ad.core.paths import REPORT_PLOTS_DIR as PLOTS_DIR
from hdmap_ad.core.files import atomic_dir, write_json, write_text

COMPARE_KIND = "compare"

# What evaluation.py logs as test_<metric>/<scope> (fractions in [0, 1] except threshold).
# The metrics each run logs to MLflow (the rest of an evaluation is in its eval_details.json artifact)
KNOWN_METRICS = HEADLINE_METRICS
NOT_PERCENT = {"threshold"}
METRIC_LABELS = {"auroc": "AUROC", "ap": "AP", "f1_max": "F1-max", "tpr_at_fpr_1": "TPR@FPR=1%",
                 "tpr_at_fpr_5": "TPR@FPR=5%", "precision": "Precision", "recall": "Recall", "f1": "F1",
                 "accuracy": "Accuracy", "threshold": "Threshold", "pixel_auroc": "pixel AUROC",
                 "aux_domain_accuracy": "aux domain accuracy"}
# The experiment plan's names; the order is the method registry's, other methods follow alphabetically.
METHOD_LABELS = {"baseline": "Baseline", "gem": "Method 1 (GEM)", "focal": "Method 3 (Focal)",
                 "aux": "Method 5-A (Aux)", "scale": "Method 6-A (Scale)", "topk": "TopK"}
SUMMARY_SCOPES = ("mean", "pooled")
STATUS_REASONS = {
    "FAILED": "failed (status FAILED)",
    "KILLED": "killed (status KILLED)",
    "RUNNING": "unfinished (status RUNNING: still running, or its process died)",
    "SCHEDULED": "unfinished (status SCHEDULED)",
}
MARK_LEGEND = "*** p<0.001, ** p<0.01, * p<0.05, n.s. not significant (marks use the Holm-adjusted p)"
# Params that may differ between runs of one comparison group (what comparison_key leaves out): the
# method and its section, the seed, the data paths, run-time train settings, other stages' sections,
# and what training logs beside the config.
IGNORED_SECTIONS = ("method", "seed", "profile", "mlflow", "evaluate", "compare", "synth")
IGNORED_PARAMS = ("data.root", "data.prepared", "n_train_maps", "device", "feature_cache", "fingerprint")


def known_methods() -> tuple[str, ...]:
    """The registered methods in registry order (the experiment plan's order)."""
    from hdmap_ad.core.methods import REGISTRY

    return tuple(REGISTRY)


# ----------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Settings:
    """The few parameters compare reads (params.yaml sections `compare`, `mlflow`, `data`, `profile`)."""

    baseline: str = "baseline"
    metrics: tuple[str, ...] = ("auroc", "tpr_at_fpr_1", "tpr_at_fpr_5")
    methods: tuple[str, ...] | None = None       # None: every method found
    experiment: str = "hdmap-dinomaly"
    tracking_uri: str | None = None
    domains: tuple[str, ...] = HDMAP_DOMAINS
    profile: str | None = "quick"                # only runs tagged with this profile; None: any
    # The params file (and --set overrides) whose comparison group is compared; None: the newest baseline run's.
    params_path: str | None = None
    overrides: tuple[str, ...] = ()


def load_settings(path: Path | str = "params.yaml", overrides: Sequence[str] = ()) -> Settings:
    """What compare needs from params.yaml, through the one params loader (profile merged, `--set`
    applied, everything validated; no torch is imported)."""
    from hdmap_ad.core.config import load_params

    params = load_params(path, list(overrides))
    cp = params.compare
    unknown = [m for m in cp.metrics if m not in KNOWN_METRICS]
    if unknown:
        raise HdmapError(f"{path}: compare.metrics: unknown metric(s) {unknown} (known: {', '.join(KNOWN_METRICS)})")
    return Settings(baseline=cp.baseline, metrics=tuple(cp.metrics), methods=tuple(cp.methods) if cp.methods else None,
                    experiment=params.mlflow.experiment, tracking_uri=params.mlflow.tracking_uri,
                    domains=tuple(params.data.domains), profile=params.profile, params_path=str(path),
                    overrides=tuple(overrides))


# ---------------------------------------------------------------------------------------- the runs

@dataclass
class RunRecord:
    run_id: str
    run_name: str
    method: str | None
    seed: int | None
    status: str
    start_time: int
    end_time: int | None
    tags: dict[str, str]
    metrics: dict[str, float]
    invalid_domains: list[str] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)

    @property
    def comparison_key(self) -> str | None:
        return self.tags.get("comparison_key") or None

    def brief(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_name": self.run_name, "method": self.method, "seed": self.seed,
                "status": self.status, "start_time": _iso(self.start_time),
                "dvc_exp_name": self.tags.get("dvc_exp_name"), "git_commit": self.tags.get("git_commit"),
                "profile": self.tags.get("profile"), "comparison_key": self.comparison_key}


@dataclass(frozen=True)
class Reference:
    """The comparison group compared: runs pair only when their `comparison_key` equals `key`."""

    key: str | None                  # None: not known yet (choose the newest baseline run's group)
    params: Mapping[str, str]        # its flattened config as training logs it (names what differs)
    manifest: str | None             # its prepared-data content digest
    source: str                      # how it was chosen, for the report
    fallback: str = ""               # why the workspace's group could not be used ("" when it was)


@dataclass
class Selection:
    """Which runs were used, and what was left out and why."""

    used: dict[str, dict[int, RunRecord]]          # method -> seed -> run
    left_out: list[dict[str, Any]]                  # run brief + reason
    superseded: list[dict[str, Any]]                # method, seed, used run, older valid runs ignored
    invalid: list[dict[str, Any]]                   # method, seed, run_id, domains
    not_selected: dict[str, int]                    # method -> valid runs not asked for
    n_found: int
    reference: Reference | None = None


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.timezone.utc).isoformat(timespec="seconds")


def _to_record(run) -> RunRecord:
    tags = dict(run.data.tags)
    seed: int | None
    try:
        seed = int(tags["seed"]) if "seed" in tags else None
    except ValueError:
        seed = None
    invalid = [d.strip() for d in tags.get("invalid_domains", "").split(",") if d.strip()]
    return RunRecord(run_id=run.info.run_id, run_name=run.info.run_name or "", method=tags.get("method") or None,
                     seed=seed, status=run.info.status, start_time=int(run.info.start_time or 0),
                     end_time=run.info.end_time, tags=tags, metrics=dict(run.data.metrics), invalid_domains=invalid,
                     params={k: str(v) for k, v in run.data.params.items()})


def fetch_runs(client, experiment_id: str) -> list[RunRecord]:
    """Every active (not deleted) run of the experiment except compare runs, all pages."""
    from mlflow.entities import ViewType

    records, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string="", run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=1000, page_token=token)
        records += [_to_record(r) for r in page if r.data.tags.get("kind") != COMPARE_KIND]
        token = page.token
        if not token:
            return records


def workspace_reference(params_path: str | Path | None, overrides: Sequence[str] = ()) -> Reference:
    """The comparison group the workspace describes: its params and its prepared data's content digest.

    Without them (no params file, params that do not load, no prepared data) the returned reference has
    key None and says why; select_runs then uses the newest baseline run's group.
    """
    from hdmap_ad.core.config import flatten, load_params
    from hdmap_ad.pipeline.data import PreparedData

    if params_path is None:
        return Reference(None, {}, None, "", "no params file given")
    try:
        params = load_params(params_path, list(overrides))
    except HdmapError as err:
        return Reference(None, {}, None, "", f"the workspace params could not be read ({err})")
    try:
        manifest = PreparedData.load(Path(params.data.prepared)).data_digest()
    except HdmapError:
        return Reference(None, {}, None, "", f"no prepared data at {params.data.prepared} to identify the data")
    flat = {k: str(v)[:6000] for k, v in flatten(params.resolved()).items()}  # as training.py logs them
    return Reference(params.comparison_key(manifest), flat, manifest,
                     f"the workspace ({params_path} and {params.data.prepared}, data {manifest[:8]})")


def _ignored_param(key: str, method_sections: set[str]) -> bool:
    from hdmap_ad.core.config import RUNTIME_TRAIN_KEYS

    top = key.split(".", 1)[0]
    return (top in IGNORED_SECTIONS or top in method_sections or key in IGNORED_PARAMS
            or key in {f"train.{k}" for k in RUNTIME_TRAIN_KEYS})


def _short(value: str | None, limit: int = 40) -> str:
    if value is None:
        return "(not logged)"
    return value if len(value) <= limit else value[:limit - 1] + "…"


def differing_settings(run: RunRecord, ref: Reference, method_sections: set[str], limit: int = 6) -> list[str]:
    """'train.steps 20 ≠ 150', ..., 'data (digest 1a2b… ≠ 9c8d…)': the run's logged settings that
    differ from the reference group's (only those the comparison key covers)."""
    keys = sorted(k for k in set(run.params) | set(ref.params) if not _ignored_param(k, method_sections))
    diffs = [f"{k} {_short(run.params.get(k))} ≠ {_short(ref.params.get(k))}" for k in keys
             if run.params.get(k) != ref.params.get(k)]
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"{len(diffs) - limit} more"]
    mine = run.tags.get("data_digest")
    if mine != ref.manifest:
        diffs.append(f"data (digest {(mine or 'unknown')[:4]}… ≠ {(ref.manifest or 'unknown')[:4]}…)")
    return diffs


def _reference_from_runs(pool: Sequence[RunRecord], baseline: str, why: str) -> Reference | None:
    """The newest baseline run's group (else the newest valid run's), when the workspace gives none."""
    if not pool:
        return None
    bases = [r for r in pool if r.method == baseline]
    newest = max(bases or pool, key=lambda r: (r.start_time, r.end_time or 0))
    what = f"the newest {baseline} run" if bases else f"the newest valid run (no {baseline} run)"
    return Reference(newest.comparison_key, dict(newest.params), newest.tags.get("data_digest"),
                     f"{what} {newest.run_name or newest.run_id} (`{newest.run_id[:8]}`), because {why}", why)


def select_runs(runs: Sequence[RunRecord], profile: str | None = None, methods: Sequence[str] | None = None,
                reference: Reference | None = None, baseline: str = "baseline") -> Selection:
    """Keep FINISHED, evaluated runs of the profile (and methods) in the reference comparison group;
    the latest per (method, seed). A reference without a key means: the newest baseline run's group."""
    left_out: list[dict[str, Any]] = []
    pool: list[RunRecord] = []
    not_selected: dict[str, int] = {}

    def leave(r: RunRecord, reason: str, short: str, **extra: Any) -> None:
        left_out.append({**r.brief(), "reason": reason, "short": short, **extra})

    for r in sorted(runs, key=lambda r: (r.start_time, r.end_time or 0)):  # oldest first: lists read in time order
        reason = short = None
        if r.method is None or r.seed is None:
            reason, short = "no `method`/`seed` tag (not a training run of this project)", "no tags"
        elif r.status != "FINISHED":
            reason = STATUS_REASONS.get(r.status, f"not finished (status {r.status})")
            short = reason.split(" (")[0]
        elif r.tags.get("evaluated") != "true":
            reason, short = "not evaluated (trained only: the evaluate stage did not log to it)", "not evaluated"
        elif profile is not None and r.tags.get("profile") not in (None, profile):
            reason = f"profile {r.tags.get('profile')!r}, not {profile!r} (compare --profile all to mix)"
            short = f"profile {r.tags.get('profile')}"
        elif r.comparison_key is None:
            reason = ("no `comparison_key` tag (logged by an older version): its settings and data cannot be "
                      "matched to the others; train it again to compare it")
            short = "no comparison_key"
        if reason:
            leave(r, reason, short)
            continue
        if methods is not None and r.method not in methods and r.method != baseline:
            not_selected[r.method] = not_selected.get(r.method, 0) + 1
            continue
        pool.append(r)

    if reference is None or reference.key is None:
        why = reference.fallback if reference is not None else "no workspace group was given"
        reference = _reference_from_runs(pool, baseline, why)
    candidates: dict[tuple[str, int], list[RunRecord]] = {}
    sections = set(METHOD_LABELS) | set(known_methods()) | {r.method for r in runs if r.method}
    for r in pool:
        if reference is not None and r.comparison_key != reference.key:
            diffs = differing_settings(r, reference, sections)
            what = ", ".join(diffs) if diffs else "no logged setting differs (the key also covers code defaults)"
            leave(r, f"other settings: {what} (comparison_key {r.comparison_key[:6]} ≠ {reference.key[:6]})",
                  "other settings", differs=diffs)
            continue
        candidates.setdefault((r.method, r.seed), []).append(r)

    used: dict[str, dict[int, RunRecord]] = {}
    superseded, invalid = [], []
    for (method, seed), group in candidates.items():
        group.sort(key=lambda r: (r.start_time, r.end_time or 0), reverse=True)
        chosen = group[0]
        used.setdefault(method, {})[seed] = chosen
        if len(group) > 1:
            superseded.append({"method": method, "seed": seed, "used": chosen.run_id, "used_start": _iso(chosen.start_time),
                               "ignored": [r.run_id for r in group[1:]]})
        if chosen.invalid_domains:
            invalid.append({"method": method, "seed": seed, "run_id": chosen.run_id, "domains": chosen.invalid_domains})
    used = {m: dict(sorted(used[m].items())) for m in order_methods(used, baseline)}
    left_out.sort(key=lambda x: (str(x["method"]), x["seed"] if x["seed"] is not None else -1))
    superseded.sort(key=lambda x: (x["method"], x["seed"]))
    invalid.sort(key=lambda x: (x["method"], x["seed"]))
    return Selection(used, left_out, superseded, invalid, not_selected, len(runs), reference)


def order_methods(methods, baseline: str = "baseline") -> list[str]:
    names = list(dict.fromkeys(methods))
    registry = known_methods()
    known = [m for m in registry if m in names]
    rest = sorted(m for m in names if m not in registry)
    ordered = known + rest
    if baseline in ordered:
        ordered.remove(baseline)
        ordered.insert(0, baseline)
    return ordered


def order_scopes(found: set[str], domains: Sequence[str]) -> list[str]:
    listed = [d for d in domains if d in found]
    others = sorted(s for s in found if s not in domains and s not in SUMMARY_SCOPES)
    return listed + others + [s for s in SUMMARY_SCOPES if s in found]


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def scope_label(scope: str) -> str:
    if scope.startswith("domain_") and len(scope) > 7:
        return f"Domain {scope[7:]}"
    return {"mean": "Mean", "pooled": "Pooled"}.get(scope, scope)


# -------------------------------------------------------------------------------------- the numbers

def parse_metric_key(key: str) -> tuple[str, str] | None:
    """`test_<metric>/<scope>` (e.g. `test_tpr_at_fpr_1/domain_A`) -> (metric, scope); None for other keys."""
    name, sep, scope = key.partition("/")
    if not sep or not scope or "/" in scope or not name.startswith("test_"):
        return None
    metric = name[len("test_"):]
    return (metric, scope) if metric in KNOWN_METRICS else None


def per_seed_values(selection: Selection) -> tuple[dict, dict, list[str], list[str]]:
    """values[method][scope][metric][seed] (finite numbers only), why[method][seed][scope] for blanks,
    the scopes found and the metrics found."""
    values: dict[str, dict[str, dict[str, dict[int, float]]]] = {}
    why: dict[str, dict[int, dict[str, str]]] = {}
    scopes, metrics = set(), set()
    for method, by_seed in selection.used.items():
        for seed, run in by_seed.items():
            excluded = set(run.invalid_domains)
            if excluded:  # the mean and pooled numbers of a run with an invalid domain are not comparable
                excluded |= set(SUMMARY_SCOPES)
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
                    "invalid" if scope in run.invalid_domains else f"invalid ({', '.join(run.invalid_domains)})")
    metric_list = [m for m in KNOWN_METRICS if m in metrics]
    return values, why, sorted(scopes), metric_list


def _comparison(method: str, scope: str, metric: str, family: str, res, extra_notes: list[str],
                unpaired=None) -> dict[str, Any]:
    from hdmap_ad.pipeline.stats import significance_mark

    d = asdict(res)
    notes = [n for n in (res.note.split("; ") if res.note else []) if n] + extra_notes
    if unpaired is not None and unpaired.note:
        notes.append(unpaired.note)
    # "paired": Δ and the tests over common seeds; "unpaired": no common seed, only the difference of the
    # means (`unpaired_delta`, no p-value); "none": a side has no value at all
    pairing = "paired" if res.n else ("unpaired" if unpaired is not None and unpaired.delta is not None else "none")
    d.update(method=method, scope=scope, metric=metric, holm_family=family, pairing=pairing,
             unpaired_delta=unpaired.delta if pairing == "unpaired" else None,
             unpaired=asdict(unpaired) if pairing == "unpaired" else None,
             significance=significance_mark(res.p_holm), significance_raw=significance_mark(res.p_ttest),
             notes=notes)
    return d


def analyse(values: Mapping, why: Mapping, baseline: str, methods: Sequence[str], scopes: Sequence[str],
            metrics: Sequence[str], selection: Selection) -> list[dict[str, Any]]:
    """paired_test for each method x scope x metric vs the baseline; Holm within each metric's table
    (all methods x domains + mean) and, separately, within each metric's pooled comparisons."""
    from hdmap_ad.pipeline.stats import fill_holm, paired_test, unpaired_difference

    out: list[dict[str, Any]] = []
    base_vals = values.get(baseline, {})
    for metric in metrics:
        families: dict[str, list[tuple[str, str, Any, list[str]]]] = {}
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
                notes = _blank_notes(method, baseline, scope, why, selection)
                family = f"{metric}:pooled" if scope == "pooled" else f"{metric}:table"
                families.setdefault(family, []).append((method, scope, res, notes, unpaired))
        for family, items in families.items():
            fill_holm([it[2] for it in items], which="p_ttest")
            out += [_comparison(method, scope, metric, family, res, notes, unpaired)
                    for method, scope, res, notes, unpaired in items]
    return out


def _blank_notes(method: str, baseline: str, scope: str, why: Mapping, selection: Selection) -> list[str]:
    notes = []
    for who in (baseline, method):
        bad = [s for s, scopes in why.get(who, {}).items() if scope in scopes]
        if bad:
            notes.append(f"{who} seed(s) {', '.join(map(str, sorted(bad)))} left out: "
                         + ("domain invalid (NaN/Inf scores)" if scope not in SUMMARY_SCOPES
                            else "a domain was invalid (NaN/Inf scores)"))
        gone = sorted({x["seed"] for x in selection.left_out if x["method"] == who and x["seed"] is not None
                       and x["seed"] not in selection.used.get(who, {})})
        if gone:
            notes.append(f"{who} seed(s) {', '.join(map(str, gone))} have no valid run (see left_out)")
    return notes


def summarise_values(values: Mapping, methods: Sequence[str], scopes: Sequence[str], metrics: Sequence[str]) -> dict:
    from hdmap_ad.pipeline.stats import mean_std

    out: dict[str, Any] = {}
    for method in methods:
        for scope in scopes:
            for metric in metrics:
                per_seed = values.get(method, {}).get(scope, {}).get(metric, {})
                entry: dict[str, Any] = {"n": len(per_seed), "seeds": sorted(per_seed), "mean": None, "std": None}
                if per_seed:
                    entry["mean"], entry["std"] = mean_std(list(per_seed.values()))
                out.setdefault(method, {}).setdefault(scope, {})[metric] = entry
    return out


# ------------------------------------------------------------------------------------------ text

def fmt_value(v: float | None, metric: str) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}" if metric in NOT_PERCENT else f"{100 * v:.2f}"


def fmt_mean_std(entry: Mapping[str, Any], metric: str, expected_n: int | None = None) -> str:
    if entry["mean"] is None:
        return "no data"
    text = fmt_value(entry["mean"], metric)
    if entry["std"] is not None:
        text += f" ± {fmt_value(entry['std'], metric)}"
    if entry["n"] < 2 or (expected_n is not None and entry["n"] != expected_n):
        text += f" (n={entry['n']})"
    return text


def fmt_delta(v: float | None, metric: str) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.4g}" if metric in NOT_PERCENT else f"{100 * v:+.2f}"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def delta_cell(c: Mapping[str, Any], metric: str) -> str:
    """The paired Δ, or the unpaired difference of means labelled as such."""
    if c.get("pairing") == "unpaired":
        return f"unpaired {fmt_delta(c['unpaired_delta'], metric)}"
    return fmt_delta(c["delta"], metric)


def p_cell(c: Mapping[str, Any]) -> str:
    if c.get("pairing") == "unpaired":
        return "n/a (not paired: no common seed)"
    if c["p_ttest"] is None:
        return f"n/a (n={c['n']})" if c["n"] < 2 else "n/a (no test, see notes)"
    return f"{fmt_p(c['p_ttest'])} → {fmt_p(c['p_holm'])} {c['significance']}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align_right_from: int = 1) -> list[str]:
    esc = [[str(x).replace("|", "\\|") for x in row] for row in rows]
    seps = ["---" if i < align_right_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(seps) + " |"] + ["| " + " | ".join(r) + " |" for r in esc]


def render_markdown(result: Mapping[str, Any]) -> str:
    baseline = result["baseline"]
    methods, scopes, listed = result["methods"], result["table_scopes"], result["report_metrics"]
    summary, values = result["summary"], result["values"]
    comps = {(c["method"], c["scope"], c["metric"]): c for c in result["comparisons"]}
    why = result["blanks"]
    left = result["left_out"]
    seeds_all = sorted({int(s) for m in result["runs"].values() for s in m} | {x["seed"] for x in left
                       if x["seed"] is not None and x["method"] in methods})
    headers = ["Seed"] + [scope_label(s) for s in scopes]
    L: list[str] = []
    L += ["# Method comparison on HDMAP (Dinomaly)", ""]
    L += [f"Generated {result['generated']} by `hdmap-ad compare` from MLflow experiment `{result['experiment']}` "
          f"at `{result['tracking_uri']}`" + (f", profile `{result['profile']}`." if result["profile"] else ", all profiles."), ""]
    ref = result.get("reference") or {}
    if ref.get("comparison_key"):
        L += [f"Comparison group `{ref['comparison_key']}` (runs pair only within one group: same settings and "
              f"data, any method and seed), chosen from {ref['source']}.", ""]
    for line in result.get("unpaired", []):
        L += [f"> **{line['method']} is not paired with {baseline}: no common seed.** Unpaired Δ (difference of the "
              f"means, no p-value) below. To pair them run `{line['command']}` (or `{line['grid']}`).", ""]
    L += ["- Values are percent (fraction × 100, 2 decimals); Δ is method − baseline in percentage points.",
          f"- Mean ± Std over seeds; **std is the sample standard deviation (ddof=1)**; `(n=k)` marks a cell with k seeds.",
          "- Per-seed and summary tables use every valid seed of a method; the tests use the seeds it shares with the "
          "baseline (listed per comparison; the details tables give the paired means).",
          "- Statistics: runs paired by seed with the baseline "
          f"`{baseline}`; paired t-test (`scipy.stats.ttest_rel`), Wilcoxon signed-rank, Cohen's d_z = mean(diff)/std(diff, ddof=1); "
          "Holm correction over all comparisons of one table (one metric: every method × every domain and the mean).",
          f"- Significance: {MARK_LEGEND}.",
          "- A method with no seed in common with the baseline gets an **unpaired Δ** (difference of the means over each "
          "side's seeds) and no p-value: with one run per side no test is defined, and a two-sample test would ignore "
          "the seed pairing the design relies on.",
          "- precision/recall/F1/accuracy (JSON only) use the Youden-J threshold chosen on each test set.", ""]
    L += _notes_block(result)

    for method in methods:
        runs = result["runs"].get(method, {})
        L += [f"## {method_label(method)} (`{method}`)", ""]
        if not runs:
            L += [f"No valid run of `{method}`.", ""]
            continue
        commits = sorted({r["git_commit"][:10] for r in runs.values() if r.get("git_commit")})
        L += [f"- Seeds: {', '.join(map(str, runs))} ({len(runs)} run{'s' if len(runs) != 1 else ''})",
              f"- Runs: " + ", ".join(f"{s}: `{r['run_id'][:8]}`" + (f" ({r['dvc_exp_name']})" if r.get("dvc_exp_name") else "")
                                     for s, r in runs.items()),
              f"- Code: {', '.join(f'`{c}`' for c in commits) or 'unknown commit'}", ""]
        for metric in listed:
            L += [f"### {METRIC_LABELS[metric]}", ""]
            rows = []
            for seed in seeds_all:
                cells = [str(seed)]
                for scope in scopes:
                    v = values.get(method, {}).get(scope, {}).get(metric, {}).get(str(seed))
                    if v is not None:
                        cells.append(fmt_value(v, metric))
                    elif str(seed) in runs:
                        cells.append(why.get(method, {}).get(str(seed), {}).get(scope, "not logged"))
                    else:
                        cells.append(_missing_reason(method, seed, left))
                rows.append(cells)
            n_runs = len(runs)
            rows.append(["**Mean±Std**"] + [fmt_mean_std(summary[method][scope][metric], metric, n_runs) for scope in scopes])
            L += _md_table(headers, rows) + [""]
        if method != baseline:
            L += [f"### Statistical test (vs {method_label(baseline)})", ""]
            rows = []
            for metric in listed:
                for scope in scopes:
                    c = comps.get((method, scope, metric))
                    if c is None:
                        rows.append([METRIC_LABELS[metric], scope_label(scope), "no data", "no data", "no data", "no p-value", "none"])
                        continue
                    rows.append([METRIC_LABELS[metric], scope_label(scope), delta_cell(c, metric),
                                 fmt_p(c["p_ttest"]) if c["p_ttest"] is not None else p_cell(c),
                                 fmt_p(c["p_holm"]), c["significance"] if c["p_holm"] is not None else "no p-value",
                                 ", ".join(map(str, c["seeds"])) or "none"])
            L += _md_table(["Metric", "Domain", "Δ Mean", "p-value (t-test)", "Holm p", "Significance", "Seeds used"],
                           rows, align_right_from=2) + [""]

    L += ["## Summary Table (All Methods)", ""]
    for metric in listed:
        L += [f"### {METRIC_LABELS[metric]} (Mean±Std)", ""]
        most = max([len(r) for r in result["runs"].values()] or [0])  # "(n=k)" marks a method with fewer seeds
        rows = [[method_label(m)] + [fmt_mean_std(summary[m][s][metric], metric, most) for s in scopes] for m in methods]
        L += _md_table(["Method"] + [scope_label(s) for s in scopes], rows) + [""]

    others = [m for m in methods if m != baseline]
    L += [f"## Statistical significance (vs {method_label(baseline)})", ""]
    if not others:
        L += [f"Only the baseline `{baseline}` has valid runs: there is nothing to compare.", ""]
    elif baseline not in result["runs"]:
        L += [f"The baseline `{baseline}` has no valid run: no paired statistics.", ""]
    for metric in listed if others else []:
        L += [f"### {METRIC_LABELS[metric]}: p-value (paired t-test → Holm-adjusted, mark)", ""]
        rows = [[method_label(m)] + [p_cell(comps[(m, s, metric)]) if (m, s, metric) in comps else "no data" for s in scopes]
                for m in others]
        L += _md_table(["Method"] + [scope_label(s) for s in scopes], rows) + [""]
    for metric in listed if others else []:
        L += [f"### {METRIC_LABELS[metric]}: details", ""]
        rows = []
        for m in others:
            for s in scopes:
                c = comps.get((m, s, metric))
                if c is None:
                    continue
                rows.append([method_label(m), scope_label(s), str(c["n"]), ", ".join(map(str, c["seeds"])) or "none",
                             fmt_mean_std({"mean": c["baseline_mean"], "std": c["baseline_std"], "n": c["n"]}, metric),
                             fmt_mean_std({"mean": c["method_mean"], "std": c["method_std"], "n": c["n"]}, metric),
                             delta_cell(c, metric), _num(c["t_stat"]), fmt_p(c["p_ttest"]), fmt_p(c["p_wilcoxon"]),
                             fmt_p(c["p_holm"]), _num(c["d_z"]), c["significance"] if c["p_holm"] is not None else "no p-value",
                             "; ".join(n for n in c["notes"] if not n.startswith("seeds used")) or "none"])
        L += _md_table(["Method", "Domain", "n", "Seeds used", "Baseline (paired)", "Method (paired)", "Δ", "t",
                        "p t-test", "p Wilcoxon", "p Holm", "d_z", "Sig.", "Notes"], rows, align_right_from=2) + [""]

    if result["plots"]:
        L += ["## Plots (per seed, per domain)", ""]
        for p in result["plots"]:
            L += [f"![{p['metric']} {p['scope']}]({p['relpath']})"]
        L += [""]
    L += _runs_block(result)
    return "\n".join(L).rstrip() + "\n"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _missing_reason(method: str, seed: int, left: Sequence[Mapping[str, Any]]) -> str:
    reasons = list(dict.fromkeys(x["short"] for x in left if x["method"] == method and x["seed"] == seed))
    return f"missing ({', '.join(reasons)})" if reasons else "missing (no run)"


def _notes_block(result: Mapping[str, Any]) -> list[str]:
    L = ["## Notes", ""]
    notes = result["notes"]
    L += [f"- {n}" for n in notes] if notes else ["- none"]
    return L + [""]


def _runs_block(result: Mapping[str, Any]) -> list[str]:
    L = ["## Runs", ""]
    rows = []
    for method, runs in result["runs"].items():
        for seed, r in runs.items():
            rows.append([method, str(seed), f"`{r['run_id']}`", r["run_name"] or "unnamed", r.get("dvc_exp_name") or "none",
                         (r.get("git_commit") or "unknown")[:10], r.get("start_time") or "unknown",
                         ", ".join(r.get("invalid_domains") or []) or "none"])
    L += _md_table(["Method", "Seed", "Run", "Name", "DVC experiment", "Commit", "Started", "Invalid domains"], rows, 99) + [""]
    if result["left_out"]:
        L += ["### Left out", ""]
        rows = [[str(x["method"]), str(x["seed"]), f"`{x['run_id']}`", x["run_name"] or "unnamed", x["reason"]]
                for x in result["left_out"]]
        L += _md_table(["Method", "Seed", "Run", "Name", "Reason"], rows, 99) + [""]
    if result["superseded"]:
        L += ["### Older runs of the same method and seed (the latest is used)", ""]
        rows = [[x["method"], str(x["seed"]), f"`{x['used']}`", ", ".join(f"`{i}`" for i in x["ignored"])] for x in result["superseded"]]
        L += _md_table(["Method", "Seed", "Used", "Ignored"], rows, 99) + [""]
    return L


# ------------------------------------------------------------------------------------ the command

def _sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for other stores and in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def collect(settings: Settings, methods: Sequence[str] | None = None, profile: str | None = "",
            client=None, reference: Reference | None = None) -> tuple[Selection, str, str]:
    """Find the experiment and select its runs; returns (selection, experiment id, tracking uri).
    `reference` None: the group of the workspace's params and prepared data (settings.params_path)."""
    import mlflow

    from hdmap_ad.pipeline import tracking

    uri = tracking.tracking_uri(settings.tracking_uri)
    db = _sqlite_file(uri)
    # MLflow silently creates an empty database for a missing sqlite path: a lost store would pass as "no runs"
    if db is not None and not db.is_file():
        raise HdmapError(f"MLflow store {uri}: {db} does not exist (deleted or moved?); restore it, or point "
                         "MLFLOW_TRACKING_URI / mlflow.tracking_uri at the store (nothing written)")
    mlflow.set_tracking_uri(uri)
    try:
        client = client or mlflow.MlflowClient()
        exp = client.get_experiment_by_name(settings.experiment)
        if exp is None or exp.lifecycle_stage == "deleted":
            raise HdmapError(f"MLflow experiment {settings.experiment!r} not found in {uri}: no runs to compare "
                             "(train and evaluate first, or set mlflow.experiment / MLFLOW_TRACKING_URI)")
        runs = fetch_runs(client, exp.experiment_id)
    except HdmapError:
        raise
    except Exception as err:  # sqlalchemy / MlflowException / connection errors: the store is unusable
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise HdmapError(f"MLflow store {uri}: cannot be read ({first})") from None
    if reference is None:
        reference = workspace_reference(settings.params_path, settings.overrides)
    chosen_profile = settings.profile if profile == "" else profile
    selection = select_runs(runs, chosen_profile, methods or settings.methods, reference, settings.baseline)
    return selection, exp.experiment_id, uri


def pairing_hints(selection: Selection, baseline: str, methods: Sequence[str]) -> list[dict[str, Any]]:
    """Each compared method that shares no seed with the baseline, with the commands that would pair it."""
    base = set(selection.used.get(baseline, {}))
    hints = []
    for m in methods:
        mine = set(selection.used.get(m, {}))
        if m == baseline or not mine or mine & base:
            continue
        missing = sorted(mine - base)
        seeds = ",".join(map(str, missing))
        command = (f"dvc exp run -S method={shlex.quote(baseline)} -S seed={seeds}" if len(missing) == 1 else
                   f"dvc exp run --queue -S method={shlex.quote(baseline)} -S seed={seeds} && dvc queue start")
        grid = (f"hdmap-ad grid --methods {shlex.quote(f'{baseline},{m}')} "
                f"--seeds {','.join(map(str, sorted(mine | base)))}")
        hints.append({"method": m, "method_seeds": sorted(mine), "baseline_seeds": sorted(base),
                      "command": command, "grid": grid,
                      "line": f"{m}: not paired: no common seed — run `{command}` (or `{grid}`); seeds: {m} "
                              f"{', '.join(map(str, sorted(mine)))}, {baseline} {', '.join(map(str, sorted(base))) or 'none'}"})
    return hints


def _round(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(float(v), digits)


def metrics_summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """What `metrics/compare.json` holds: method -> scope (domains, mean) -> report metric -> mean over
    seeds (percent), n seeds, Δ vs the baseline (points; paired over n_paired seeds, or labelled unpaired)
    and the Holm p. Only numbers computed from the runs' values: the same runs give the same file."""
    comps = {(c["method"], c["scope"], c["metric"]): c for c in result["comparisons"]}
    out: dict[str, Any] = {}
    for m in result["methods"]:
        for s in result["table_scopes"]:
            for metric in result["report_metrics"]:
                pct = metric not in NOT_PERCENT
                scale, mean_key, delta_key = (100.0, "mean_pct", "delta_pts") if pct else (1.0, "mean", "delta")
                entry = result["summary"][m][s][metric]
                e: dict[str, Any] = {"n": entry["n"]}
                if entry["mean"] is not None:
                    e[mean_key] = _round(scale * entry["mean"])
                c = comps.get((m, s, metric))
                if c is not None:
                    e["n_paired"] = c["n"]
                    if c["delta"] is not None:
                        e[delta_key] = _round(scale * c["delta"])
                    if c.get("unpaired_delta") is not None:
                        e[f"{delta_key}_unpaired"] = _round(scale * c["unpaired_delta"])
                    if c["p_holm"] is not None:
                        e["p_holm"] = float(f"{c['p_holm']:.4g}")
                out.setdefault(m, {}).setdefault(s, {})[metric] = e
    return out


def details_path_for(report_path: Path) -> Path:
    """reports/comparison.json beside reports/comparison.md."""
    return Path(report_path).with_suffix(".json")


def run_compare(settings: Settings, *, methods: Sequence[str] | None = None, profile: str | None = "",
                json_path: Path = JSON_FILE, report_path: Path = REPORT_FILE, plots_dir: Path | None = PLOTS_DIR,
                log_run: bool = True, console=None, reference: Reference | None = None) -> dict[str, Any]:
    """The whole compare stage. `profile=""` means the params' profile, None any profile.

    Raises HdmapError, writing nothing, when the store is missing or unreadable or has no valid run."""
    from rich.console import Console

    console = console or Console()
    methods = list(methods) if methods else (list(settings.methods) if settings.methods else None)
    selection, experiment_id, uri = collect(settings, methods, profile, reference=reference)
    baseline = settings.baseline
    # The baseline is always listed (its tables say so when it has no runs); then the asked-for or found methods.
    method_list = order_methods(list(methods or selection.used) + [baseline], baseline)
    print_found(console, selection, method_list, baseline)
    if not selection.used:
        ref = selection.reference
        group = f" in comparison group {ref.key[:6]} ({ref.source})" if ref is not None and ref.key else ""
        raise HdmapError(f"MLflow experiment {settings.experiment!r} at {uri}: no valid run to compare{group}; "
                         f"{selection.n_found} run(s) found, {len(selection.left_out)} left out (listed above); "
                         f"{json_path} and {report_path} left as they were")
    values, why, scopes, metrics = per_seed_values(selection)
    for m in settings.metrics:
        if m not in metrics:
            metrics.append(m)
    metrics = [m for m in KNOWN_METRICS if m in metrics]
    # the domains the runs report; with no run at all, the params' domains (so the empty tables look as planned)
    scopes = order_scopes(set(scopes) | {"mean"} | (set() if scopes else set(settings.domains)), settings.domains)
    table_scopes = [s for s in scopes if s != "pooled"]
    comparisons = analyse(values, why, baseline, method_list, scopes, metrics, selection)
    summary = summarise_values(values, method_list, scopes, metrics)
    hints = pairing_hints(selection, baseline, method_list)
    notes = [h["line"] for h in hints] + build_notes(selection, settings, baseline, method_list, comparisons, uri)
    ref = selection.reference

    result: dict[str, Any] = {
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "experiment": settings.experiment, "experiment_id": experiment_id, "tracking_uri": uri,
        "profile": settings.profile if profile == "" else profile,
        "reference": {"comparison_key": ref.key, "source": ref.source, "data_digest": ref.manifest,
                      "fallback": ref.fallback or None} if ref is not None else None,
        "baseline": baseline, "methods": method_list, "scopes": scopes, "table_scopes": table_scopes,
        "metrics": metrics, "report_metrics": list(settings.metrics),
        "std_note": "std over seeds with ddof=1 (sample standard deviation)",
        "tests": "paired t-test scipy.stats.ttest_rel(method, baseline); Wilcoxon signed-rank scipy.stats.wilcoxon; "
                 "d_z = mean(method - baseline) / std(method - baseline, ddof=1); with no common seed only the "
                 "unpaired difference of means (unpaired_delta), no p-value",
        "holm": "Holm over one family per metric: all methods x (domains + mean) ('<metric>:table'); the pooled "
                "comparisons form a second family per metric ('<metric>:pooled')",
        "significance_legend": MARK_LEGEND,
        "n_runs_found": selection.n_found,
        "runs": {m: {str(s): {**r.brief(), "invalid_domains": r.invalid_domains} for s, r in selection.used.get(m, {}).items()}
                 for m in method_list},
        "left_out": selection.left_out, "superseded": selection.superseded, "invalid": selection.invalid,
        "not_selected": selection.not_selected, "unpaired": hints,
        "values": {m: {sc: {mt: {str(s): v for s, v in per.items()} for mt, per in by_scope.items()}
                       for sc, by_scope in values.get(m, {}).items()} for m in method_list if m in values},
        "blanks": {m: {str(s): d for s, d in by_seed.items()} for m, by_seed in why.items()},
        "summary": summary, "comparisons": comparisons, "notes": notes, "plots": [],
    }

    details_path = details_path_for(Path(report_path))
    if plots_dir is not None:
        result["plots"] = write_plots(values, method_list, table_scopes, list(settings.metrics), Path(plots_dir), Path(report_path))
    write_json(result, details_path)
    write_json(metrics_summary(result), Path(json_path))
    write_text(render_markdown(result), Path(report_path))
    print_summary(console, result)
    console.print(f"wrote {json_path}, {report_path}, {details_path}"
                  + (f", {len(result['plots'])} plots under {plots_dir}" if plots_dir else ""))
    if log_run:
        run_id, exp_name = log_compare_run(settings, result, Path(json_path), Path(report_path), details_path,
                                           Path(plots_dir) if plots_dir is not None else None)
        result["compare_run_id"] = run_id
        console.print(f"MLflow run `compare` {run_id} (experiment {exp_name!r})")
    return result


def build_notes(selection: Selection, settings: Settings, baseline: str, methods: Sequence[str],
                comparisons: Sequence[Mapping[str, Any]], uri: str) -> list[str]:
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
        notes.append(f"**{x['method']} seed {x['seed']}** (run `{x['run_id']}`): NaN/Inf scores in "
                     f"{', '.join(x['domains'])} → left out of those domains and of the mean and pooled comparisons")
    for x in selection.left_out:
        notes.append(f"left out {x['run_name'] or x['run_id']} (`{x['run_id'][:8]}`, method {x['method']}, seed {x['seed']}): {x['reason']}")
    for x in selection.superseded:
        notes.append(f"{x['method']} seed {x['seed']}: {len(x['ignored']) + 1} valid runs; the latest "
                     f"(`{x['used'][:8]}`, started {x['used_start']}) is used, ignored: {', '.join(i[:8] for i in x['ignored'])}")
    for m, n in selection.not_selected.items():
        notes.append(f"{n} valid run(s) of `{m}` not compared (not in the selected methods)")
    few: dict[str, set[str]] = {}
    for c in comparisons:
        if c["n"] < 2 and c["method"] in selection.used and baseline in selection.used and c["pairing"] != "unpaired":
            few.setdefault(c["method"], set()).add(f"{c['scope']}: {c['n']}")
    for m, where in few.items():
        notes.append(f"{m} vs {baseline}: fewer than 2 paired seeds → no p-value (paired seeds per scope: "
                     f"{', '.join(sorted(where))})")
    base_seeds = set(selection.used.get(baseline, {}))
    for m in methods:
        if m == baseline or m not in selection.used:
            continue
        seeds = set(selection.used[m])
        if seeds != base_seeds and seeds & base_seeds:  # (no common seed at all: see the "not paired" line)
            notes.append(f"{m}: paired on seeds {', '.join(map(str, sorted(seeds & base_seeds))) or 'none'} "
                         f"(only {m}: {', '.join(map(str, sorted(seeds - base_seeds))) or 'none'}; "
                         f"only {baseline}: {', '.join(map(str, sorted(base_seeds - seeds))) or 'none'})")
    commits = sorted({r.tags.get("git_commit", "")[:10] for by in selection.used.values() for r in by.values()} - {""})
    if len(commits) > 1:
        notes.append(f"the compared runs come from {len(commits)} commits: {', '.join(commits)}")
    return notes


def print_found(console, selection: Selection, methods: Sequence[str], baseline: str) -> None:
    from rich.markup import escape

    console.print(f"[bold]compare[/]: {selection.n_found} run(s) in the experiment")
    ref = selection.reference
    if ref is not None and ref.key:
        console.print(f"  comparison group {ref.key[:6]}: {ref.source}", markup=False)
    for m in methods:
        seeds = list(selection.used.get(m, {}))
        console.print(f"  {m:<10} {len(seeds)} run(s), seeds {', '.join(map(str, seeds)) or 'none'}"
                      + ("  (baseline)" if m == baseline else ""))
    for x in selection.left_out:
        console.print(f"  [yellow]left out[/] {x['run_name'] or x['run_id']} ({x['run_id'][:8]}): "
                      + escape(x["reason"]))
    for x in selection.superseded:
        console.print(f"  [yellow]{x['method']} seed {x['seed']}: {len(x['ignored']) + 1} valid runs, using the latest "
                      f"{x['used'][:8]}[/]")
    for x in selection.invalid:
        console.print(f"  [bold red]INVALID[/] {x['method']} seed {x['seed']} ({x['run_id'][:8]}): NaN/Inf scores in "
                      f"{', '.join(x['domains'])}; left out of those domains' and the mean/pooled comparisons")


def print_summary(console, result: Mapping[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    comps = {(c["method"], c["scope"], c["metric"]): c for c in result["comparisons"]}
    for metric in result["report_metrics"]:
        table = Table(title=f"{METRIC_LABELS[metric]} (%): mean ± std (ddof=1); Δ vs {result['baseline']}, Holm p")
        table.add_column("method")
        for s in result["table_scopes"]:
            table.add_column(scope_label(s), justify="right")
        for m in result["methods"]:
            cells = []
            for s in result["table_scopes"]:
                text = fmt_mean_std(result["summary"][m][s][metric], metric,
                                    max([len(r) for r in result["runs"].values()] or [0])).replace(" ± ", "±")
                c = comps.get((m, s, metric))
                if c is not None and c.get("pairing") == "unpaired":
                    text += f"\nunpaired Δ {fmt_delta(c['unpaired_delta'], metric)} (no p)"
                elif c is not None:
                    p = f"p={fmt_p(c['p_holm'])} {c['significance']}" if c["p_holm"] is not None else f"no p (n={c['n']})"
                    text += f"\nΔ {fmt_delta(c['delta'], metric)} {p}"
                cells.append(text)
            table.add_row(m, *cells)
        console.print(table)
    for hint in result.get("unpaired", []):
        console.print(f"[bold yellow]{escape(hint['line'])}[/]", soft_wrap=True)  # commands stay copyable


def write_plots(values: Mapping, methods: Sequence[str], scopes: Sequence[str], metrics: Sequence[str],
                plots_dir: Path, report_path: Path) -> list[dict[str, str]]:
    """One PNG per metric and domain, plus the per-seed numbers as CSV (for `dvc plots`). The folder is
    replaced as a whole: complete and without plots of domains or metrics no longer compared."""
    from hdmap_ad.pipeline.plots import plot_seed_comparison

    plots_dir = Path(plots_dir)
    written = []
    rows = ["method,seed,scope,metric,value"]
    for method in methods:
        for scope, by_metric in values.get(method, {}).items():
            for metric, per_seed in by_metric.items():
                rows += [f"{method},{seed},{scope},{metric},{v!r}" for seed, v in sorted(per_seed.items())]
    with atomic_dir(plots_dir) as tmp:
        write_text("\n".join(rows) + "\n", tmp / "data" / "per_seed.csv")
        for metric in metrics:
            for scope in scopes:
                data = {m: values.get(m, {}).get(scope, {}).get(metric, {}) for m in methods}
                name = f"{metric}_{scope}.png"
                plot_seed_comparison(data, METRIC_LABELS[metric], scope_label(scope), tmp / name,
                                     percent=metric not in NOT_PERCENT)
                out = plots_dir / name
                written.append({"metric": metric, "scope": scope, "path": str(out),
                                "relpath": os.path.relpath(out, Path(report_path).parent)})
    return written


def compare_experiment(settings: Settings) -> str:
    from hdmap_ad.pipeline import tracking

    return tracking.compare_experiment_name(settings.experiment)


def log_compare_run(settings: Settings, result: Mapping[str, Any], json_path: Path, report_path: Path,
                    details_path: Path, plots_dir: Path | None) -> tuple[str, str]:
    """One MLflow run `compare` (tag kind=compare) in `<experiment>-compare`, with the outputs as artifacts
    and Δ / Holm p as metrics; returns (run id, experiment name). Inside a DVC experiment it is tagged
    with its name, so every experiment's comparison stays findable."""
    import mlflow
    from mlflow.entities import Metric, Param

    from hdmap_ad.pipeline import tracking

    name = compare_experiment(settings)
    experiment_id = tracking.ensure_experiment(name, settings.tracking_uri)
    client = mlflow.MlflowClient()
    ref = result.get("reference") or {}
    tags = {"kind": COMPARE_KIND, "baseline": result["baseline"], "methods": ",".join(result["methods"]),
            "training_experiment": settings.experiment}
    if ref.get("comparison_key"):
        tags["comparison_key"] = ref["comparison_key"]
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if commit := tracking.git_commit():
        tags["git_commit"] = commit
    run = client.create_run(experiment_id, run_name="compare", tags=tags)
    run_id = run.info.run_id
    try:
        now = int(_dt.datetime.now().timestamp() * 1000)
        metrics = []
        for c in result["comparisons"]:
            if c["metric"] not in result["report_metrics"]:
                continue
            for key, value in (("delta", c["delta"]), ("delta_unpaired", c.get("unpaired_delta")), ("p_holm", c["p_holm"])):
                if value is not None:  # grouped like the training metrics: <what>_<metric>/<method>/<scope>
                    metrics.append(Metric(f"{key}_{c['metric']}/{c['method']}/{c['scope']}", float(value), now, 0))
        params = [Param("baseline", result["baseline"]), Param("methods", ",".join(result["methods"])),
                  Param("n_runs_used", str(sum(len(v) for v in result["runs"].values()))),
                  Param("n_left_out", str(len(result["left_out"]))), Param("profile", str(result["profile"]))]
        for i in range(0, len(metrics), 900):
            client.log_batch(run_id, metrics=metrics[i:i + 900], params=params if i == 0 else [])
        if not metrics:
            client.log_batch(run_id, params=params)
        for path in (json_path, report_path, details_path):
            client.log_artifact(run_id, str(path))
        if plots_dir is not None and plots_dir.is_dir():
            client.log_artifacts(run_id, str(plots_dir), artifact_path="plots")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id, name


def cmd_compare(args: argparse.Namespace) -> int:
    settings = load_settings(args.params, args.set)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    profile = "" if args.profile is None else (None if args.profile == "all" else args.profile)
    run_compare(settings, methods=methods, profile=profile, json_path=Path(args.json), report_path=Path(args.report),
                plots_dir=None if args.no_plots else Path(args.plots), log_run=not args.no_log)
    return 0


DESCRIPTION = """\
Read every run of the MLflow experiment (mlflow.experiment), keep the FINISHED and evaluated ones of
one comparison group (tag comparison_key: same settings and data, any method and seed; the group the
workspace's params and prepared data describe), the latest per method and seed, pair them by seed
with compare.baseline and test each method x domain (and the mean) x metric: paired t-test,
Wilcoxon, d_z, Holm within each metric's table. A method with no seed in common with the baseline
gets the unpaired difference of means (no p-value) and the command that would pair it.

Writes metrics/compare.json (means, Δ and Holm p only: what `dvc metrics diff` compares),
reports/comparison.md and reports/comparison.json (runs, left-out runs, every statistic) and
reports/plots/*.png, prints a summary, and logs a `compare` MLflow run (tag kind=compare) with them
into the experiment <mlflow.experiment>-compare. Runs that failed, are unfinished, are not
evaluated, belong to another comparison group or have invalid (NaN/Inf) domains are listed with
the reason they were left out. A missing or unreadable store, or no valid run, is an error and
leaves the existing outputs as they were. MLFLOW_TRACKING_URI points it at another store or a server.
"""


def add_parser(sub: "argparse._SubParsersAction", common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = sub.add_parser("compare", parents=[common], help="compare methods against the baseline over seeds (paired statistics)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", help="comma list of methods to compare (default: compare.methods, or every method found)")
    p.add_argument("--profile", help="only runs of this profile; 'all' mixes profiles (default: the params' profile)")
    p.add_argument("--json", default=str(JSON_FILE), help=f"metrics JSON for DVC (default: {JSON_FILE})")
    p.add_argument("--report", default=str(REPORT_FILE),
                   help=f"Markdown report; the details go to the .json beside it (default: {REPORT_FILE})")
    p.add_argument("--plots", default=str(PLOTS_DIR), help=f"folder for the PNG plots (default: {PLOTS_DIR})")
    p.add_argument("--no-plots", action="store_true", help="skip the plots")
    p.add_argument("--no-log", action="store_true", help="do not log a `compare` run to MLflow")
    p.set_defaults(func=cmd_compare)
    return p
