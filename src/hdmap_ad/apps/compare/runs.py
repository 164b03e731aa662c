"""The runs compare reads: fetched from MLflow, then selected (one comparison group, the latest valid
run per method and seed) with every run left out named and why; and the hints that would pair a
method with the baseline.

Which runs count: FINISHED runs tagged `evaluated=true` with `method` and `seed` tags, of the active
profile, whose `comparison_key` tag equals the reference group's (the workspace's params and prepared
data; without prepared data, the newest baseline run's group). Everything else is listed with the
reason it was left out; a run of another group names the settings that differ. Within the group, runs
pair only at one precision: `train.amp: auto` (and `evaluate.amp: auto`) resolve per machine, so the
same params can train in bf16 on one machine and in float32 on another, a difference of the order of
the seed-to-seed spread. The group's precision is the newest baseline run's (else the newest run's),
as the runs recorded it; a run trained or scored at another precision is left out and says so. When
several valid runs share (method, seed) the latest one is used and the others are named.

(Over 450 lines: one selection (status, profile, group, precision, latest per seed) whose steps share the
run records and reasons; the hints that pair are its last step.)
"""

from __future__ import annotations

import datetime as _dt
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hdmap_ad.apps.compare.settings import Settings
from hdmap_ad.core.errors import HdmapError

if TYPE_CHECKING:
    from hdmap_ad.core.config import Params

COMPARE_KIND = "compare"
STATUS_REASONS = {
    "FAILED": "failed (status FAILED)",
    "KILLED": "killed (status KILLED)",
    "RUNNING": "unfinished (status RUNNING: still running, or its process died)",
    "SCHEDULED": "unfinished (status SCHEDULED)",
}


def known_methods() -> tuple[str, ...]:
    """The methods in the method list's order (the experiment plan's order); torch-free, so compare
    imports no torch for it."""
    from hdmap_ad.core.method_params import METHODS

    return tuple(METHODS)


def iso_time(ms: int | None) -> str | None:
    """An MLflow timestamp (ms since the epoch) as UTC ISO text; None for none."""
    if not ms:
        return None
    return _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.UTC).isoformat(timespec="seconds")


PRECISION_NAMES = {"off": "float32", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class RunPrecision:
    """The resolved autocast precision of a run's training and of its evaluation: off (float32), bf16, fp16."""

    train: str | None
    evaluate: str | None

    def matches(self, other: RunPrecision) -> bool:
        """Equal where both are recorded (a run that predates the record matches any)."""
        return all(
            a is None or b is None or a == b for a, b in ((self.train, other.train), (self.evaluate, other.evaluate))
        )

    def describe(self) -> str:
        def name(value: str | None) -> str:
            return PRECISION_NAMES.get(value, value) if value else "not recorded"

        return f"trained in {name(self.train)}, scored in {name(self.evaluate)}"

    def to_json(self) -> dict[str, Any]:
        return {"train": self.train, "evaluate": self.evaluate}


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

    @property
    def precision(self) -> RunPrecision:
        """How it was trained and scored, as recorded (None where a run predates the record)."""
        return RunPrecision(self.params.get("train.amp_resolved") or None, self.tags.get("eval_precision") or None)

    @property
    def started(self) -> str | None:
        return iso_time(self.start_time)

    @property
    def git_commit(self) -> str | None:
        return self.tags.get("git_commit")

    @property
    def dvc_exp_name(self) -> str | None:
        return self.tags.get("dvc_exp_name")

    def brief(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_name": self.run_name,
            "method": self.method,
            "seed": self.seed,
            "status": self.status,
            "start_time": self.started,
            "dvc_exp_name": self.dvc_exp_name,
            "git_commit": self.git_commit,
            "profile": self.tags.get("profile"),
            "comparison_key": self.comparison_key,
        }


@dataclass(frozen=True)
class Reference:
    """The comparison group compared: runs pair only when their `comparison_key` equals `key`."""

    key: str | None  # None: not known yet (choose the newest baseline run's group)
    params: Mapping[str, str]  # its flattened config as training logs it (names what differs)
    manifest: str | None  # its prepared-data content digest
    source: str  # how it was chosen, for the report
    fallback: str = ""  # why the workspace's group could not be used ("" when it was)

    def to_json(self) -> dict[str, Any]:
        return {
            "comparison_key": self.key,
            "source": self.source,
            "data_digest": self.manifest,
            "fallback": self.fallback or None,
        }


@dataclass(frozen=True)
class LeftOut:
    """A run not compared, and why (`short`: a few words for the per-seed tables)."""

    run: RunRecord
    reason: str
    short: str
    differs: tuple[str, ...] | None = None  # the differing settings, for a run of another group

    @property
    def method(self) -> str | None:
        return self.run.method

    @property
    def seed(self) -> int | None:
        return self.run.seed

    def to_json(self) -> dict[str, Any]:
        extra = {"differs": list(self.differs)} if self.differs is not None else {}
        return {**self.run.brief(), "reason": self.reason, "short": self.short, **extra}


@dataclass(frozen=True)
class Superseded:
    """Several valid runs of one (method, seed): the latest is used, the older ones are ignored."""

    method: str
    seed: int
    used: RunRecord
    ignored: tuple[RunRecord, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "seed": self.seed,
            "used": self.used.run_id,
            "used_start": self.used.started,
            "ignored": [r.run_id for r in self.ignored],
        }


@dataclass(frozen=True)
class InvalidRun:
    """A used run whose evaluation found NaN/Inf scores in some domains."""

    method: str
    seed: int
    run: RunRecord

    @property
    def domains(self) -> list[str]:
        return self.run.invalid_domains

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "seed": self.seed, "run_id": self.run.run_id, "domains": self.domains}


@dataclass
class Selection:
    """Which runs were used, and what was left out and why."""

    used: dict[str, dict[int, RunRecord]]  # method -> seed -> run
    left_out: list[LeftOut]
    superseded: list[Superseded]
    invalid: list[InvalidRun]
    not_selected: dict[str, int]  # method -> valid runs not asked for
    n_found: int
    reference: Reference | None = None
    precision: RunPrecision | None = None  # the one precision the used runs share (None: no run)


@dataclass(frozen=True)
class PairingHint:
    """A compared method that shares no seed with the baseline, with the commands that would pair it."""

    method: str
    method_seeds: list[int]
    baseline_seeds: list[int]
    command: str
    grid: str
    line: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _to_record(run) -> RunRecord:
    tags = dict(run.data.tags)
    seed: int | None
    try:
        seed = int(tags["seed"]) if "seed" in tags else None
    except ValueError:
        seed = None
    invalid = [d.strip() for d in tags.get("invalid_domains", "").split(",") if d.strip()]
    return RunRecord(
        run_id=run.info.run_id,
        run_name=run.info.run_name or "",
        method=tags.get("method") or None,
        seed=seed,
        status=run.info.status,
        start_time=int(run.info.start_time or 0),
        end_time=run.info.end_time,
        tags=tags,
        metrics=dict(run.data.metrics),
        invalid_domains=invalid,
        params={k: str(v) for k, v in run.data.params.items()},
    )


def fetch_runs(client, experiment_id: str) -> list[RunRecord]:
    """Every active (not deleted) run of the experiment except compare runs, all pages."""
    from mlflow.entities import ViewType

    records, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string="", run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
        )
        records += [_to_record(r) for r in page if r.data.tags.get("kind") != COMPARE_KIND]
        token = page.token
        if not token:
            return records


def workspace_reference(
    params_path: str | Path | None, overrides: Sequence[str] = (), params: Params | None = None
) -> Reference:
    """The comparison group the workspace describes: its params and its prepared data's content digest.

    `params`: those already loaded from params_path (else they are loaded here). Without them (no
    params file, params that do not load, no prepared data) the returned reference has key None and
    says why; select_runs then uses the newest baseline run's group.
    """
    from hdmap_ad.core.config import flatten, load_params
    from hdmap_ad.pipeline.data import PreparedData

    if params_path is None:
        return Reference(None, {}, None, "", "no params file given")
    if params is None:
        try:
            params = load_params(params_path, list(overrides))
        except HdmapError as err:
            return Reference(None, {}, None, "", f"the workspace params could not be read ({err})")
    try:
        manifest = PreparedData.load(Path(params.data.prepared)).data_digest()
    except HdmapError:
        return Reference(None, {}, None, "", f"no prepared data at {params.data.prepared} to identify the data")
    flat = {k: str(v)[:6000] for k, v in flatten(params.resolved()).items()}  # as training.py logs them
    return Reference(
        params.comparison_key(manifest),
        flat,
        manifest,
        f"the workspace ({params_path} and {params.data.prepared}, data {manifest[:8]})",
    )


def _short(value: str | None, limit: int = 40) -> str:
    if value is None:
        return "(not logged)"
    return value if len(value) <= limit else value[: limit - 1] + "…"


def differing_settings(run: RunRecord, ref: Reference, limit: int = 6) -> list[str]:
    """'train.steps 20 ≠ 150', ..., 'data (digest 1a2b… ≠ 9c8d…)': the settings the comparison key
    covers (core.config.is_compared_setting) whose logged values differ between the run and the
    reference group; what training logs beside the config (`train.amp_resolved`, ...) is not one."""
    from hdmap_ad.core.config import is_compared_setting

    keys = sorted(k for k in set(run.params) | set(ref.params) if is_compared_setting(k))
    diffs = [
        f"{k} {_short(run.params.get(k))} ≠ {_short(ref.params.get(k))}"
        for k in keys
        if run.params.get(k) != ref.params.get(k)
    ]
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
    newest = max(bases or pool, key=_age)
    what = f"the newest {baseline} run" if bases else f"the newest valid run (no {baseline} run)"
    return Reference(
        newest.comparison_key,
        dict(newest.params),
        newest.tags.get("data_digest"),
        f"{what} {newest.run_name or newest.run_id} (`{newest.run_id[:8]}`), because {why}",
        why,
    )


def _age(r: RunRecord) -> tuple[int, int]:
    return (r.start_time, r.end_time or 0)


def _unusable(r: RunRecord, profile: str | None) -> tuple[str, str] | None:
    """(reason, short) why a run cannot be compared at all; None when it can."""
    if r.method is None or r.seed is None:
        return "no `method`/`seed` tag (not a training run of this project)", "no tags"
    if r.status != "FINISHED":
        reason = STATUS_REASONS.get(r.status, f"not finished (status {r.status})")
        return reason, reason.split(" (")[0]
    if r.tags.get("evaluated") != "true":
        return "not evaluated (trained only: the evaluate stage did not log to it)", "not evaluated"
    if profile is not None and r.tags.get("profile") not in (None, profile):
        return (
            f"profile {r.tags.get('profile')!r}, not {profile!r} (compare --profile all to mix)",
            f"profile {r.tags.get('profile')}",
        )
    if r.comparison_key is None:
        return (
            "no `comparison_key` tag (logged by an older version): its settings and data cannot be "
            "matched to the others; train it again to compare it"
        ), "no comparison_key"
    return None


def select_runs(
    runs: Sequence[RunRecord],
    profile: str | None = None,
    methods: Sequence[str] | None = None,
    reference: Reference | None = None,
    baseline: str = "baseline",
) -> Selection:
    """Keep FINISHED, evaluated runs of the profile (and methods) in the reference comparison group;
    the latest per (method, seed). A reference without a key means: the newest baseline run's group."""
    left_out: list[LeftOut] = []
    pool: list[RunRecord] = []
    not_selected: dict[str, int] = {}
    for r in sorted(runs, key=_age):  # oldest first: lists read in time order
        why = _unusable(r, profile)
        if why:
            left_out.append(LeftOut(r, *why))
        elif methods is not None and r.method not in methods and r.method != baseline:
            not_selected[r.method] = not_selected.get(r.method, 0) + 1
        else:
            pool.append(r)

    if reference is None or reference.key is None:
        why_not = reference.fallback if reference is not None else "no workspace group was given"
        reference = _reference_from_runs(pool, baseline, why_not)
    candidates: dict[tuple[str, int], list[RunRecord]] = {}
    for r in pool:
        if reference is not None and r.comparison_key != reference.key:
            diffs = differing_settings(r, reference)
            what = ", ".join(diffs) if diffs else "no logged setting differs (the key also covers code defaults)"
            left_out.append(
                LeftOut(
                    r,
                    f"other settings: {what} (comparison_key {r.comparison_key[:6]} ≠ {reference.key[:6]})",
                    "other settings",
                    tuple(diffs),
                )
            )
            continue
        candidates.setdefault((r.method, r.seed), []).append(r)

    # One precision per comparison: checked before the latest run per (method, seed) is chosen, so that a
    # newer run at another precision does not hide an older one that pairs.
    precision = _group_precision([r for group in candidates.values() for r in group], baseline)
    if precision is not None:
        for pair, group in list(candidates.items()):
            keep = [r for r in group if r.precision.matches(precision)]
            for r in group:
                if r not in keep:
                    left_out.append(
                        LeftOut(
                            r,
                            f"other precision: {r.precision.describe()}, the compared runs "
                            f"{precision.describe()} ({PRECISION_HINT})",
                            "other precision",
                        )
                    )
            if keep:
                candidates[pair] = keep
            else:
                del candidates[pair]

    used: dict[str, dict[int, RunRecord]] = {}
    superseded, invalid = [], []
    for (method, seed), group in candidates.items():
        group.sort(key=_age, reverse=True)
        chosen = group[0]
        used.setdefault(method, {})[seed] = chosen
        if len(group) > 1:
            superseded.append(Superseded(method, seed, chosen, tuple(group[1:])))
        if chosen.invalid_domains:
            invalid.append(InvalidRun(method, seed, chosen))
    used = {m: dict(sorted(used[m].items())) for m in order_methods(used, baseline)}
    left_out.sort(key=lambda x: (str(x.method), x.seed if x.seed is not None else -1))
    superseded.sort(key=lambda x: (x.method, x.seed))
    invalid.sort(key=lambda x: (x.method, x.seed))
    return Selection(used, left_out, superseded, invalid, not_selected, len(runs), reference, precision)


PRECISION_HINT = (
    "train.amp/evaluate.amp `auto` resolve per machine: set them to off or bf16 and rerun "
    "the runs left out to pair them"
)


def _group_precision(group: Sequence[RunRecord], baseline: str) -> RunPrecision | None:
    """The precision of the newest baseline run of the group (else of its newest run), each part taken
    from the newest run that recorded it; None for an empty group."""
    if not group:
        return None
    newest_first = sorted(group, key=lambda r: (r.method == baseline, _age(r)), reverse=True)
    train = next((r.precision.train for r in newest_first if r.precision.train), None)
    evaluate = next((r.precision.evaluate for r in newest_first if r.precision.evaluate), None)
    return RunPrecision(train, evaluate)


def order_methods(methods: Iterable[str], baseline: str = "baseline") -> list[str]:
    """Registry order (the experiment plan's), other methods alphabetically after; the baseline first."""
    names = list(dict.fromkeys(methods))
    registry = known_methods()
    known = [m for m in registry if m in names]
    rest = sorted(m for m in names if m not in registry)
    ordered = known + rest
    if baseline in ordered:
        ordered.remove(baseline)
        ordered.insert(0, baseline)
    return ordered


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for other stores and in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    path = path[len("file:") :] if path.startswith("file:") else path  # sqlite's URI form (e.g. ?mode=ro)
    return Path(path) if path and path != ":memory:" else None


def collect(
    settings: Settings,
    methods: Sequence[str] | None = None,
    profile: str | None = "",
    client=None,
    reference: Reference | None = None,
) -> tuple[Selection, str, str]:
    """Find the experiment and select its runs; returns (selection, experiment id, tracking uri).
    `reference` None: the group of the workspace's params and prepared data (settings.params_path)."""
    import mlflow

    from hdmap_ad.pipeline import tracking

    uri = tracking.tracking_uri(settings.tracking_uri)
    db = _sqlite_file(uri)
    # MLflow silently creates an empty database for a missing sqlite path: a lost store would pass as "no runs"
    if db is not None and not db.is_file():
        raise HdmapError(
            f"MLflow store {uri}: {db} does not exist (deleted or moved?); restore it, or point "
            "MLFLOW_TRACKING_URI / mlflow.tracking_uri at the store (nothing written)"
        )
    mlflow.set_tracking_uri(uri)
    try:
        client = client or mlflow.MlflowClient()
        exp = client.get_experiment_by_name(settings.experiment)
        if exp is None or exp.lifecycle_stage == "deleted":
            raise HdmapError(
                f"MLflow experiment {settings.experiment!r} not found in {uri}: no runs to compare "
                "(train and evaluate first, or set mlflow.experiment / MLFLOW_TRACKING_URI)"
            )
        runs = fetch_runs(client, exp.experiment_id)
    except HdmapError:
        raise
    except Exception as err:  # sqlalchemy / MlflowException / connection errors: the store is unusable
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise HdmapError(f"MLflow store {uri}: cannot be read ({first})") from None
    if reference is None:
        reference = workspace_reference(settings.params_path, settings.overrides, settings.params)
    chosen_profile = settings.profile if profile == "" else profile
    selection = select_runs(runs, chosen_profile, methods or settings.methods, reference, settings.baseline)
    return selection, exp.experiment_id, uri


def pairing_hints(selection: Selection, baseline: str, methods: Sequence[str]) -> list[PairingHint]:
    """Each compared method that shares no seed with the baseline, with the commands that would pair it."""
    base = set(selection.used.get(baseline, {}))
    hints = []
    for m in methods:
        mine = set(selection.used.get(m, {}))
        if m == baseline or not mine or mine & base:
            continue
        missing = sorted(mine - base)
        seeds = ",".join(map(str, missing))
        command = (
            f"dvc exp run -S method={shlex.quote(baseline)} -S seed={seeds}"
            if len(missing) == 1
            else f"dvc exp run --queue -S method={shlex.quote(baseline)} -S seed={seeds} && dvc queue start"
        )
        grid = (
            f"hdmap-ad grid --methods {shlex.quote(f'{baseline},{m}')} "
            f"--seeds {','.join(map(str, sorted(mine | base)))}"
        )
        line = (
            f"{m}: not paired: no common seed — run `{command}` (or `{grid}`); seeds: {m} "
            f"{', '.join(map(str, sorted(mine)))}, {baseline} {', '.join(map(str, sorted(base))) or 'none'}"
        )
        hints.append(PairingHint(m, sorted(mine), sorted(base), command, grid, line))
    return hints
