"""`hdmap-ad compare`: select the runs, analyse them, write the outputs and log them to MLflow."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path

from hdmap_ad.apps.compare.analysis import analyse
from hdmap_ad.apps.compare.report import render_markdown, write_plots
from hdmap_ad.apps.compare.result import ComparisonResult
from hdmap_ad.apps.compare.runs import COMPARE_KIND, Reference, collect, order_methods
from hdmap_ad.apps.compare.settings import Settings, load_settings
from hdmap_ad.apps.compare.terminal import print_found, print_summary
from hdmap_ad.apps.parsing import add_command
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.files import write_json, write_text
from hdmap_ad.core.method_params import metric_safe
from hdmap_ad.core.paths import COMPARE_FILE as JSON_FILE
from hdmap_ad.core.paths import REPORT_FILE
from hdmap_ad.core.paths import REPORT_PLOTS_DIR as PLOTS_DIR


def details_path_for(report_path: Path) -> Path:
    """reports/comparison.json beside reports/comparison.md."""
    return Path(report_path).with_suffix(".json")


def run_compare(
    settings: Settings,
    *,
    methods: Sequence[str] | None = None,
    profile: str | None = "",
    json_path: Path = JSON_FILE,
    report_path: Path = REPORT_FILE,
    plots_dir: Path | None = PLOTS_DIR,
    log_run: bool = True,
    console=None,
    reference: Reference | None = None,
) -> ComparisonResult:
    """The whole compare stage. `profile=""` means the params' profile, None any profile.

    Raises HdmapError, writing nothing, when the store is missing or unreadable or has no valid run."""
    from rich.console import Console

    console = console or Console()
    methods = list(methods) if methods else (list(settings.methods) if settings.methods else None)
    from hdmap_ad.pipeline import store_check, tracking

    # the store answers within seconds (and, when compare logs, takes a write) before the slow statistics
    store_check.check_store(tracking.tracking_uri(settings.tracking_uri), write=False)
    selection, experiment_id, uri = collect(settings, methods, profile, reference=reference)
    if log_run:
        store_check.open_experiment(compare_experiment(settings), settings.tracking_uri)
        import mlflow

        from hdmap_ad.pipeline.orphans import end_orphan_runs

        # runs left RUNNING by a killed process: ended now (compare leaves unfinished runs out anyway)
        for run in end_orphan_runs(mlflow.MlflowClient(uri), [experiment_id], "hdmap-ad compare"):
            console.print(
                f"MLflow run {run.info.run_name} ({run.info.run_id}) was RUNNING, but its process is gone: "
                "marked KILLED",
                markup=False,
            )
    baseline = settings.baseline
    # The baseline is always listed (its tables say so when it has no runs); then the asked-for or found methods.
    method_list = order_methods(list(methods or selection.used) + [baseline], baseline)
    print_found(console, selection, method_list, baseline)
    if not selection.used:
        ref = selection.reference
        group = f" in comparison group {ref.key[:6]} ({ref.source})" if ref is not None and ref.key else ""
        raise HdmapError(
            f"MLflow experiment {settings.experiment!r} at {uri}: no valid run to compare{group}; "
            f"{selection.n_found} run(s) found, {len(selection.left_out)} left out (listed above); "
            f"{json_path} and {report_path} left as they were"
        )
    result = analyse_with_scores(
        selection,
        settings,
        method_list,
        profile=settings.profile if profile == "" else profile,
        experiment_id=experiment_id,
        tracking_uri=uri,
    )
    for method, used in result.uncertainty.get("per_map", {}).items():
        if "bootstrap_seconds" in used:
            console.print(
                f"per-map statistics {method} vs {baseline}: DeLong and hierarchical bootstrap "
                f"({result.uncertainty['bootstrap_resamples']} resamples) in {used['bootstrap_seconds']:.1f} s",
                markup=False,
            )

    details_path = details_path_for(Path(report_path))
    if plots_dir is not None:
        result.plots = write_plots(result, Path(plots_dir), Path(report_path))
    write_json(result.to_json(), details_path)
    write_json(result.metrics_json(), Path(json_path))
    write_text(render_markdown(result), Path(report_path))
    print_summary(console, result)
    console.print(
        f"wrote {json_path}, {report_path}, {details_path}"
        + (f", {len(result.plots)} plots under {plots_dir}" if plots_dir else "")
    )
    if log_run:
        run_id, exp_name = log_compare_run(
            settings,
            result,
            Path(json_path),
            Path(report_path),
            details_path,
            Path(plots_dir) if plots_dir is not None else None,
        )
        result.compare_run_id = run_id
        console.print(f"MLflow run {compare_run_name(result)!r} {run_id} (experiment {exp_name!r})", markup=False)
    return result


def analyse_with_scores(selection, settings: Settings, methods: Sequence[str], **kw) -> ComparisonResult:
    """`analyse`, with each paired run's per-map scores downloaded from MLflow once, into a temporary
    folder removed afterwards (the numbers taken from them are in the result)."""
    import tempfile

    import mlflow

    from hdmap_ad.apps.compare.scores import ScoresCache

    with tempfile.TemporaryDirectory(prefix="hdmap-compare-scores-") as tmp:
        cache = ScoresCache(mlflow.MlflowClient(tracking_uri=kw["tracking_uri"]), Path(tmp))
        return analyse(selection, settings, methods, scores=cache, **kw)


def compare_experiment(settings: Settings) -> str:
    from hdmap_ad.pipeline import tracking

    return tracking.compare_experiment_name(settings.experiment)


def log_compare_run(
    settings: Settings,
    result: ComparisonResult,
    json_path: Path,
    report_path: Path,
    details_path: Path,
    plots_dir: Path | None,
) -> tuple[str, str]:
    """One MLflow run (tag kind=compare, named by what it compares) in `<experiment>-compare`, with the
    outputs as artifacts, Δ / Holm p / intervals as metrics and the verdicts as tags (`verdict/<method>`,
    `verdict/<method>/<scope>/<metric>`); returns (run id, experiment name). Inside a DVC experiment it is tagged
    with its name, so every experiment's comparison stays findable."""
    import mlflow
    from mlflow.entities import Metric, Param

    from hdmap_ad.pipeline import tracking

    name = compare_experiment(settings)
    experiment_id = tracking.ensure_experiment(name, settings.tracking_uri)
    client = mlflow.MlflowClient()
    tags = {
        "kind": COMPARE_KIND,
        "baseline": result.baseline,
        "methods": ",".join(result.methods),
        "training_experiment": settings.experiment,
    }
    if result.reference is not None and result.reference.key:
        tags["comparison_key"] = result.reference.key
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if commit := tracking.git_commit():
        tags["git_commit"] = commit
    for method, v in result.verdicts.items():  # the answer, searchable: tags.`verdict/gem` = 'better'
        tags[f"verdict/{metric_safe(method)}"] = v.verdict  # MLflow refuses `+` in keys
    for c in result.comparisons:
        if c.verdict is not None and c.metric in result.report_metrics and c.scope in result.table_scopes:
            tags[f"verdict/{metric_safe(c.method)}/{c.scope}/{c.metric}"] = c.verdict.verdict
    run = client.create_run(experiment_id, run_name=compare_run_name(result), tags=tags)
    run_id = run.info.run_id
    try:
        now = int(_dt.datetime.now().timestamp() * 1000)
        metrics = []
        for c in result.comparisons:
            if c.metric not in result.report_metrics:
                continue
            for key, value in logged_values(c):
                if value is not None:  # grouped like the training metrics: <what>_<metric>/<method>/<scope>
                    key_name = f"{key}_{c.metric}/{metric_safe(c.method)}/{c.scope}"  # MLflow refuses `+` in names
                    metrics.append(Metric(key_name, float(value), now, 0))
        u = result.uncertainty
        params = [
            Param("baseline", result.baseline),
            Param("methods", ",".join(result.methods)),
            Param("n_runs_used", str(sum(len(v) for v in result.runs.values()))),
            Param("n_left_out", str(len(result.selection.left_out))),
            Param("profile", str(result.profile)),
        ]
        params += [
            Param(k, str(u[k]))
            for k in ("confidence", "bootstrap_resamples", "bootstrap_seed", "alpha", "power")
            if k in u
        ]
        params += [Param(f"rope.{m}", f"{v:g}") for m, v in u.get("rope_points", {}).items()]
        for i in range(0, len(metrics), 900):
            client.log_batch(run_id, metrics=metrics[i : i + 900], params=params if i == 0 else [])
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


def compare_run_name(result: ComparisonResult) -> str:
    """What the run compares: 'gem,topk vs baseline × seeds 42-44 × group 1a2b3c' ('baseline alone × seeds 43'
    when no other method has runs)."""
    others = [m for m in result.methods if m != result.baseline and result.runs.get(m)]
    seeds = sorted({s for runs in result.runs.values() for s in runs})
    span = (
        "-".join(map(str, (seeds[0], seeds[-1])))
        if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1))
        else ",".join(map(str, seeds))
    )
    ref = result.reference
    group = f" × group {ref.key[:6]}" if ref is not None and ref.key else ""
    what = f"{','.join(others)} vs {result.baseline}" if others else f"{result.baseline} alone"
    return f"{what} × seeds {span or 'none'}{group}"


def logged_values(c) -> list[tuple[str, float | None]]:
    """A comparison's numbers logged as compare-run metrics: the paired n, Δ, Holm p, the intervals,
    P(improvement) and the Bayesian probabilities (only from 2 paired seeds on: at one seed a share
    of 0 or 1 would read as a probability), seeds needed and, for AUROC, DeLong pooled and the
    hierarchical bootstrap."""
    iv, imp, need, dl, hb = c.interval, c.improvement, c.seeds_needed, c.delong, c.bootstrap
    few = c.paired.n < 2
    bayes = c.bayes if not few else None
    return [
        ("n_paired", c.paired.n),
        ("delta", c.paired.delta),
        ("delta_unpaired", c.unpaired_delta),
        ("p_holm", c.paired.p_holm),
        ("delta_t_low", iv and iv.t_low),
        ("delta_t_high", iv and iv.t_high),
        ("delta_boot_low", iv and iv.boot_low),
        ("delta_boot_high", iv and iv.boot_high),
        ("p_improvement", None if few else imp and imp.share_better),
        ("p_better", bayes and bayes.p_better),
        ("p_equivalent", bayes and bayes.p_equivalent),
        ("p_worse", bayes and bayes.p_worse),
        ("seeds_needed", need and need.n_needed),
        ("delong_delta", dl and dl.delta),
        ("delong_se", dl and dl.se),
        ("delong_p", dl and dl.p),
        ("hboot_low", hb and hb.low),
        ("hboot_high", hb and hb.high),
        ("hboot_p_improvement", hb and hb.p_improvement),
    ]


def cmd_compare(args: argparse.Namespace) -> int:
    settings = load_settings(args.params, args.set)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    profile = "" if args.profile is None else (None if args.profile == "all" else args.profile)
    run_compare(
        settings,
        methods=methods,
        profile=profile,
        json_path=Path(args.json),
        report_path=Path(args.report),
        plots_dir=None if args.no_plots else Path(args.plots),
        log_run=not args.no_log,
    )
    return 0


DESCRIPTION = """\
Read every run of the MLflow experiment (mlflow.experiment), keep the FINISHED and evaluated ones of
one comparison group (tag comparison_key: same settings and data, any method and seed; the group the
workspace's params and prepared data describe), the latest per method and seed, pair them by seed
with compare.baseline and test each method x domain (and the mean) x metric: paired t-test,
Wilcoxon, d_z, Holm within each metric's table; Δ with its t and bootstrap intervals over seeds,
P(improvement) and the seeds needed (compare.confidence, bootstrap_resamples, bootstrap_seed, alpha,
power); for AUROC, from each run's per-map scores (artifact eval/scores.csv), DeLong per seed and
pooled and a hierarchical bootstrap over seeds x test maps. A method with no seed in common with
the baseline gets the unpaired difference of means (no p-value) and the command that would pair it.

Writes metrics/compare.json (means, Δ and Holm p only: what `dvc metrics diff` compares),
reports/comparison.md and reports/comparison.json (runs, left-out runs, every statistic) and
reports/plots/*.png, prints a summary, and logs a `compare` MLflow run (tag kind=compare) with them
into the experiment <mlflow.experiment>-compare. Runs that failed, are unfinished, are not
evaluated, belong to another comparison group or have invalid (NaN/Inf) domains are listed with
the reason they were left out. A missing or unreadable store, or no valid run, is an error and
leaves the existing outputs as they were. MLFLOW_TRACKING_URI points it at another store or a server.
"""


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = add_command(
        sub, common, "compare", "compare methods against the baseline over seeds (paired statistics)", DESCRIPTION
    )
    p.add_argument(
        "--methods", help="comma list of methods to compare (default: compare.methods, or every method found)"
    )
    p.add_argument("--profile", help="only runs of this profile; 'all' mixes profiles (default: the params' profile)")
    p.add_argument("--json", default=str(JSON_FILE), help=f"metrics JSON for DVC (default: {JSON_FILE})")
    p.add_argument(
        "--report",
        default=str(REPORT_FILE),
        help=f"Markdown report; the details go to the .json beside it (default: {REPORT_FILE})",
    )
    p.add_argument("--plots", default=str(PLOTS_DIR), help=f"folder for the PNG plots (default: {PLOTS_DIR})")
    p.add_argument("--no-plots", action="store_true", help="skip the plots")
    p.add_argument("--no-log", action="store_true", help="do not log a `compare` run to MLflow")
    p.set_defaults(func=cmd_compare)
    return p
