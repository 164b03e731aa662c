"""`hdmap-ad grid --executor ray --cluster ADDRESS`: the grid as Ray tasks on an existing Ray cluster.

The driver (this module, in the user's checkout):
1. validates every method's settings, insists on a tracking server every node can reach and on a
   committed, pushed code commit (the nodes clone it from the git remote: they run exactly that);
2. creates the MLflow experiments before any task starts (as the local executor does);
3. skips each (method, seed) that already has a finished, evaluated run at this commit in this
   comparison group (unless --force);
4. submits one task per remaining (method, seed) asking for 1 GPU where the cluster has GPUs, else
   --cpus-per-task CPUs; Ray retries a task whose worker or node died (at most --max-retries times),
   never one that failed by itself (hdmap_ad.apps.grid.node);
5. shows a line per task state (queued / running on node X / done / failed / skipped), `dvc exp pull`s
   each finished experiment from the git remote (its outputs from the DVC remote), names every
   failure with the last lines of its log, and runs `hdmap-ad compare`.
"""

from __future__ import annotations

import shlex
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdmap_ad.apps.grid import local, node
from hdmap_ad.core.errors import HdmapError

# outputs of the pipeline: a modified one is not code, and the nodes rebuild or pull them anyway
OUTPUT_PREFIXES = ("dvc.lock", "data/", "models/", "metrics/", "plots/", "reports/", "mlflow.db")


@dataclass
class TaskState:
    method: str
    seed: int
    exp_name: str
    state: str = "queued"  # queued | running | done | failed | skipped
    node: str = ""
    ip: str = ""
    attempt: int = 0
    reason: str = ""
    tail: str = ""
    where: str = ""  # the log (and work dir) on the node, for a failure

    @property
    def key(self) -> str:
        return f"{self.method}-seed{self.seed}"

    def line(self) -> str:
        label = f"{self.method} seed {self.seed}"
        where = f" on node {self.node[:8]} ({self.ip})" if self.node else ""
        again = f", attempt {self.attempt}" if self.attempt > 1 else ""
        if self.state == "running":
            return f"{label}: running{where}{again}"
        if self.state == "done":
            return f"{label}: done{where}{again} ({self.exp_name})"
        if self.state == "failed":
            return f"{label}: failed{where}{again}: {self.reason}"
        if self.state == "skipped":
            return f"{label}: skipped ({self.reason})"
        return f"{label}: queued"


@dataclass
class Outcome:
    code: int
    tasks: list[TaskState] = field(default_factory=list)
    dashboard: str | None = None


def _git(args: Sequence[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise HdmapError(f"git {' '.join(args)}: {err}") from None
    if done.returncode != 0:
        raise HdmapError(f"git {' '.join(args)}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
    return done.stdout.strip()


def code_commit(git_remote: str) -> tuple[str, str]:
    """(HEAD commit, the remote's URL): the commit every node runs. Refuses uncommitted code and a
    commit the remote does not have, since the nodes would run something else or nothing."""
    commit = _git(["rev-parse", "HEAD"])
    changed = [
        line[3:] for line in _git(["status", "--porcelain", "--untracked-files=no"]).splitlines() if line.strip()
    ]
    changed = [f for f in changed if not f.startswith(OUTPUT_PREFIXES)]
    if changed:
        raise HdmapError(
            "grid --executor ray runs the committed code on every node; commit and push these first: "
            + ", ".join(changed[:8])
            + (" ..." if len(changed) > 8 else "")
        )
    try:
        url = _git(["remote", "get-url", git_remote])
    except HdmapError:
        raise HdmapError(f"grid --executor ray: no git remote {git_remote!r} (set one with --git-remote)") from None
    holders = [b.strip() for b in _git(["branch", "-r", "--contains", commit]).splitlines()]
    if not any(b.startswith(f"{git_remote}/") for b in holders):
        raise HdmapError(
            f"grid --executor ray: commit {commit[:10]} is not on {git_remote!r}; `git push {git_remote}` "
            "it first (the nodes clone it from there)"
        )
    return commit, url


def finished_pairs(
    settings: Any, methods: Sequence[str], seeds: Sequence[int], commit: str, params_path: Path, sets: Sequence[str]
) -> dict[tuple[str, int], str]:
    """{(method, seed): run id} of the pairs that already have the run compare would use, at this
    commit and with exactly these settings (its comparison_key, recomputed for the run's data)."""
    from hdmap_ad.apps.compare import collect
    from hdmap_ad.core.config import load_params

    try:
        selection, _, _ = collect(settings, methods=list(methods))
    except HdmapError:  # no experiment or no run yet: nothing to skip
        return {}
    found = {}
    for method in methods:
        params = load_params(params_path, [*sets, f"method={method}", f"seed={seeds[0]}"])
        for seed, run in selection.used.get(method, {}).items():
            if seed not in seeds or run.git_commit != commit:
                continue
            if run.comparison_key == params.comparison_key(run.tags.get("data_digest")):
                found[(method, seed)] = run.run_id
    return found


class Display:
    """A live table on a terminal (rich); elsewhere one timestamped line per state change."""

    def __init__(self, tasks: Sequence[TaskState], out: Callable[[str], None]) -> None:
        from rich.console import Console

        self.tasks, self.out, self.last = tasks, out, {}
        self.console = Console()
        self.live = None
        if out is print and self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._table(), console=self.console, refresh_per_second=2, transient=False)
            self.live.start()

    def _table(self):
        from rich.table import Table

        table = Table(title="hdmap-ad grid on Ray", show_lines=False)
        for col in ("method", "seed", "state", "node", "attempt", "note"):
            table.add_column(col)
        colour = {"done": "green", "failed": "red", "running": "cyan", "skipped": "dim"}
        for t in self.tasks:
            table.add_row(
                t.method,
                str(t.seed),
                f"[{colour.get(t.state, 'white')}]{t.state}[/]",
                f"{t.node[:8]} {t.ip}".strip(),
                str(t.attempt or ""),
                t.reason[:60],
            )
        return table

    def update(self) -> None:
        if self.live is not None:
            self.live.update(self._table())
            return
        for t in self.tasks:
            line = t.line()
            if self.last.get(t.key) != line:
                self.out(time.strftime("[%H:%M:%S] ") + line)
                self.last[t.key] = line

    def close(self) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.stop()


def _reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on a HOST:PORT nobody answers: ray.init would retry for minutes."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or address == "auto" or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise HdmapError(
            f"grid: no Ray head answers at {address} ({err}); is `ray start --head` running there?"
        ) from None


def plan_lines(tasks: Sequence[TaskState], sets: Sequence[str], commit: str, url: str) -> list[str]:
    lines = [f"# every node: git clone {url} && git checkout {commit[:10]}, then in that clone:"]
    for t in tasks:
        cmd = ["dvc", "exp", "run", "-n", t.exp_name, "-S", f"method={t.method}", "-S", f"seed={t.seed}"]
        for item in sets:
            cmd += ["-S", item]
        lines.append(shlex.join(cmd) + f" && dvc exp push origin {t.exp_name}")
    return lines


def run_grid_ray(
    params_path: Path | str,
    methods: Sequence[str],
    seeds: Sequence[int],
    sets: Sequence[str] = (),
    *,
    address: str,
    cpus_per_task: float = 1.0,
    gpus_per_task: float | None = None,
    max_retries: int = 2,
    shared_dir: str | None = None,
    git_remote: str = "origin",
    force: bool = False,
    compare: bool = True,
    dry_run: bool = False,
    poll_s: float = 1.0,
    out: Callable[[str], None] = print,
) -> Outcome:
    """The whole grid on a Ray cluster; Outcome.code 0 when every (method, seed) is done or skipped."""
    from hdmap_ad.apps import compare as compare_mod
    from hdmap_ad.pipeline import tracking

    params_path = Path(params_path)
    sets = list(sets)
    if not Path("dvc.yaml").is_file():
        raise HdmapError(f"{Path.cwd()}: no dvc.yaml here; run `hdmap-ad grid` from the repository root")
    if max_retries < 0 or cpus_per_task <= 0 or (gpus_per_task is not None and gpus_per_task < 0):
        raise HdmapError("grid: --max-retries must be >= 0, --cpus-per-task > 0 and --gpus-per-task >= 0")
    for item in sets:
        if len(local.split_sweep_values(item.partition("=")[2])) > 1:
            raise HdmapError(
                f"grid --executor ray: -S {item!r} is a sweep; give one value per key (the grid is --methods x --seeds)"
            )
    local.validate(params_path, methods, seeds, sets, out)
    settings = compare_mod.load_settings(params_path, sets)
    uri = tracking.tracking_uri(settings.tracking_uri)
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        raise HdmapError(
            f"grid --executor ray: the tracking store {uri} is local to this machine; start a tracking "
            "server every node reaches and set MLFLOW_TRACKING_URI=http://HOST:PORT (docs/multi-machine.md)"
        )
    commit, url = code_commit(git_remote)
    grid_id = uuid.uuid4().hex[:6]
    tasks = [TaskState(m, s, f"g{grid_id}-{m}-{s}") for m in methods for s in seeds]
    out(
        f"grid on Ray ({address}): {len(methods)} method(s) x {len(seeds)} seed(s) = {len(tasks)} task(s) at commit "
        f"{commit[:10]}; MLflow experiment {settings.experiment!r} at {uri}; work dirs "
        + (
            f"under the shared {shared_dir} (a retried task resumes)"
            if shared_dir
            else "in each node's temp dir (a retried task restarts)"
        )
    )
    if dry_run:
        for line in plan_lines(tasks, sets, commit, url):
            out(line)
        return Outcome(0, tasks)

    from hdmap_ad.pipeline.store_check import open_experiment

    # within seconds: the store answers and takes writes, before any task is sent
    open_experiment(settings.experiment, settings.tracking_uri)
    open_experiment(tracking.compare_experiment_name(settings.experiment), settings.tracking_uri)
    if not force:
        done_before = finished_pairs(settings, methods, seeds, commit, params_path, sets)
        for t in tasks:
            if (t.method, t.seed) in done_before:
                t.state, t.reason = (
                    "skipped",
                    f"finished and evaluated at this commit: run {done_before[(t.method, t.seed)][:8]}",
                )

    try:
        import ray
        from ray import cloudpickle
    except ImportError:
        raise HdmapError("grid --executor ray needs Ray: pip install -e '.[cluster]'") from None
    todo = [t for t in tasks if t.state == "queued"]
    display = Display(tasks, out)
    dashboard = None
    try:
        if todo:
            _reachable(address)
            try:
                info = ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            except Exception as err:  # ConnectionError, ValueError (bad address), RuntimeError
                raise HdmapError(f"grid: cannot connect to the Ray cluster at {address!r}: {err}") from None
            dashboard = getattr(info, "dashboard_url", None) or None
            if dashboard:
                out(f"Ray dashboard: http://{dashboard}" if "://" not in dashboard else f"Ray dashboard: {dashboard}")
            resources = ray.cluster_resources()
            gpus = gpus_per_task if gpus_per_task is not None else (1.0 if resources.get("GPU", 0) > 0 else 0.0)
            cpus = 1.0 if gpus else cpus_per_task
            if resources.get("CPU", 0) < cpus or resources.get("GPU", 0) < gpus:
                raise HdmapError(
                    f"grid: no node of the cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s) for a task "
                    f"(cluster: {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU)"
                )
            out(
                f"{len(todo)} task(s), each asking for "
                + (f"{gpus:g} GPU" if gpus else f"{cpus:g} CPU(s)")
                + f"; a task whose worker or node dies is retried up to {max_retries} time(s)"
            )
            cloudpickle.register_pickle_by_value(node)  # the task logic travels with the task
            # on the head node: a worker node that dies must not take the progress record with it
            progress = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})(node.Progress).remote()
            remote = ray.remote(node.task_entry).options(
                num_cpus=cpus, num_gpus=gpus, max_retries=max_retries, retry_exceptions=False
            )
            base = {
                "commit": commit,
                "git_remote": url,
                "sets": sets,
                "tracking_uri": uri,
                "experiment": settings.experiment,
                "shared_dir": shared_dir,
                "grid_id": grid_id,
            }
            pending = {
                remote.remote(
                    {**base, "key": t.key, "method": t.method, "seed": t.seed, "exp_name": t.exp_name}, progress
                ): t
                for t in todo
            }
            _wait(ray, pending, progress, display, git_remote, poll_s, out)
        display.update()
    finally:
        display.close()
        if ray.is_initialized():
            ray.shutdown()

    failed = [t for t in tasks if t.state == "failed"]
    done = [t for t in tasks if t.state == "done"]
    skipped = [t for t in tasks if t.state == "skipped"]
    out(f"grid finished: {len(done)} done, {len(skipped)} skipped, {len(failed)} failed (of {len(tasks)})")
    for t in failed:
        out(f"  FAILED {t.method} seed {t.seed} ({t.exp_name}): {t.reason}" + (f" [{t.where}]" if t.where else ""))
        for line in t.tail.splitlines():
            out(f"    | {line}")
    if compare and (done or skipped):
        compare_mod.run_compare(settings, methods=list(methods))
    return Outcome(0 if not failed else 1, tasks, dashboard)


def _wait(
    ray: Any, pending: dict, progress: Any, display: Display, git_remote: str, poll_s: float, out: Callable[[str], None]
) -> None:
    """Until every task ended: follow where each one runs, pull each finished experiment."""
    from ray.exceptions import RayError

    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll_s)
        try:
            where = ray.get(progress.snapshot.remote(), timeout=30)
        except RayError:
            where = {}
        for t in list(pending.values()) + [t for t in display.tasks if t.state in ("done", "failed")]:
            info = where.get(t.key)
            if info:
                t.node, t.ip, t.attempt = info["node"], info["ip"], info["attempt"]
                if t.state == "queued":
                    t.state = "running"
        for ref in ready:
            t = pending.pop(ref)
            try:
                result = ray.get(ref)
            except RayError as err:  # retries used up: the worker or node died every time
                t.state = "failed"
                t.reason = f"lost after {t.attempt} attempt(s): {type(err).__name__}"
                continue
            t.node, t.ip, t.attempt = (
                result.get("node", t.node),
                result.get("ip", t.ip),
                result.get("attempt", t.attempt),
            )
            if not result.get("ok"):
                t.state, t.reason, t.tail = "failed", result.get("reason", "failed"), result.get("tail", "")
                t.where = f"log {result.get('log')} on {t.ip}"
                continue
            pull = [local.with_venv_dvc(["dvc"])[0], "exp", "pull", git_remote, t.exp_name]
            done = subprocess.run(
                pull, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=local.worker_env()
            )
            if done.returncode != 0:
                t.state = "failed"
                t.reason = (
                    f"ran, but `{shlex.join(pull)}` failed: " + " ".join((done.stderr or done.stdout).split())[-300:]
                )
            else:
                t.state = "done"
        display.update()
