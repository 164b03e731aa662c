"""`hdmap-ad grid --executor local` (the default): queue a methods × seeds grid of DVC experiments, run it
with N workers of this machine, then compare.

Steps (docs/design.md#pipe-mlflow explains why the order matters):
1. validate the settings of every method and create the MLflow store and experiment **before** any
   worker starts (parallel workers creating them at once lose runs or die in schema migration);
2. `dvc exp run --queue -S method=a,b -S seed=x,y [-S more]` queues the cross product;
3. `dvc queue start -j N` starts N workers (they inherit this process's environment);
4. poll `dvc queue status` until this grid's tasks are done, reporting progress;
5. name the failed experiments, each with the last lines of its `dvc queue logs NAME`;
6. run `hdmap-ad compare` in the workspace (it reads the runs from MLflow, not from the workspace).

Each training process of the grid claims a GPU of its own on a multi-GPU machine
(`hdmap_ad.core.devices.claim_cuda_device`).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hdmap_ad.core.devices import cuda_device_count
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.method_params import METHOD_PARAMS

DEFAULT_METHODS = tuple(METHOD_PARAMS)  # every registered method
DEFAULT_SEEDS = (42, 43, 44, 123, 456)
DONE_STATES = {"Success", "Failed"}


@dataclass(frozen=True)
class Task:
    rev: str
    name: str
    status: str


def parse_queue_status(text: str) -> tuple[dict[str, Task], tuple[int, int] | None]:
    """`dvc queue status` output -> ({task rev: Task}, (active workers, idle workers) or None)."""
    tasks: dict[str, Task] = {}
    workers = None
    for line in text.splitlines():
        m = re.match(r"\s*Worker status:\s*(\d+) active,\s*(\d+) idle", line)
        if m:
            workers = (int(m.group(1)), int(m.group(2)))
            continue
        parts = line.split()
        if len(parts) < 3 or parts[0] == "Task" or not re.fullmatch(r"[0-9a-f]{7,40}", parts[0]):
            continue
        status = parts[-1]
        # columns: Task, Name (may be empty), Created (e.g. "01:27 AM" or "Nov 28, 2025"), Status
        name = parts[1] if not re.fullmatch(r"\d{1,2}:\d{2}|[A-Z][a-z]{2}", parts[1]) else ""
        tasks[parts[0]] = Task(parts[0], name, status)
    return tasks, workers


def dvc_commands(
    methods: Sequence[str], seeds: Sequence[int], sets: Sequence[str], jobs: int, force: bool = False
) -> tuple[list[str], list[str]]:
    queue = [
        "dvc",
        "exp",
        "run",
        "--queue",
        "-S",
        f"method={','.join(methods)}",
        "-S",
        f"seed={','.join(map(str, seeds))}",
    ]
    for item in sets:
        queue += ["-S", item]
    if force:
        queue.append("--force")
    return queue, ["dvc", "queue", "start", "-j", str(jobs)]


def split_sweep_values(value: str) -> list[str]:
    """Hydra sweep syntax: `a,b` is a sweep, `[a,b]` a list; split on commas outside brackets/quotes."""
    out, depth, quote, cur = [], 0, None, ""
    for ch in value:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    return out + [cur]


def _first_choice(sets: Sequence[str]) -> list[str]:
    out = []
    for item in sets:
        key, sep, value = item.partition("=")
        out.append(f"{key}={split_sweep_values(value)[0]}" if sep else item)
    return out


def validate(
    params_path: Path,
    methods: Sequence[str],
    seeds: Sequence[int],
    sets: Sequence[str],
    out: Callable[[str], None] = print,
) -> None:
    """Fail before queueing anything: every method's full configuration must validate."""
    if not methods or not seeds:
        raise HdmapError("grid: need at least one method and one seed")
    dup = sorted({m for m in methods if list(methods).count(m) > 1}) + sorted(
        {str(s) for s in seeds if list(seeds).count(s) > 1}
    )
    if dup:
        raise HdmapError(f"grid: listed twice: {', '.join(dup)}")
    for item in sets:
        key = item.partition("=")[0].strip()
        if key in ("method", "seed"):
            raise HdmapError(f"grid: --set {item!r}: use --methods/--seeds for {key}")
    from hdmap_ad.core.config import load_params

    base = _first_choice(sets)
    for method in methods:  # params validation imports no torch: this runs on a machine without it too
        load_params(params_path, [*base, f"method={method}", f"seed={seeds[0]}"])


def _default_runner(cmd: Sequence[str]) -> subprocess.CompletedProcess:
    """Run a dvc command, its output to temporary files. Not pipes: `dvc queue start` leaves worker daemons
    that inherit the output handles, and reading a pipe to its end would wait until the workers exit."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            done = subprocess.run(
                list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=err, text=True, env=worker_env()
            )
        except FileNotFoundError:
            raise HdmapError(f"`{cmd[0]}` not found: install DVC in this environment (pip install -e .)") from None
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(done.args, done.returncode, out.read(), err.read())


def worker_env() -> dict[str, str]:
    """The environment `dvc queue start` hands to its workers: this venv's bin first on PATH (so the
    stages find `hdmap-ad` even when the venv is not activated), analytics off, and the relative
    PYTHONPATH entry `src` first: a stage runs in the experiment's temporary copy, and without it an
    editable install would import the live workspace's src/ instead of the code the experiment was
    queued with (and that DVC records)."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(["src"] + [p for p in paths if p != "src"])
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def with_venv_dvc(cmd: Sequence[str]) -> list[str]:
    """Prefer the dvc next to this interpreter (the project's venv)."""
    local = Path(sys.executable).parent / "dvc"
    return [str(local), *cmd[1:]] if cmd and cmd[0] == "dvc" and local.exists() else list(cmd)


def _check(result: subprocess.CompletedProcess, cmd: Sequence[str]) -> str:
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-5:])
        raise HdmapError(f"`{shlex.join(cmd)}` failed (exit {result.returncode}): {tail}")
    return result.stdout or ""


def _untracked(root: Path) -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "--others", "--exclude-standard"], cwd=root, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line for line in out.stdout.splitlines() if line.strip()]


def run_grid(
    params_path: Path | str,
    methods: Sequence[str],
    seeds: Sequence[int],
    sets: Sequence[str] = (),
    jobs: int = 1,
    *,
    compare: bool = True,
    dry_run: bool = False,
    force: bool = False,
    poll_s: float = 10.0,
    stall_s: float = 300.0,
    runner: Callable[[Sequence[str]], subprocess.CompletedProcess] | None = None,
    out: Callable[[str], None] = print,
) -> int:
    """The whole grid; returns the exit status (0: every experiment succeeded)."""
    from hdmap_ad.apps import compare as compare_mod
    from hdmap_ad.pipeline import tracking

    params_path = Path(params_path)
    if jobs < 1:
        raise HdmapError(f"grid: --jobs must be at least 1, got {jobs}")
    if not Path("dvc.yaml").is_file():
        raise HdmapError(f"{Path.cwd()}: no dvc.yaml here; run `hdmap-ad grid` from the repository root")
    validate(params_path, methods, seeds, sets, out)
    settings = compare_mod.load_settings(params_path, _first_choice(sets))
    uri = tracking.tracking_uri(settings.tracking_uri)
    queue_cmd, start_cmd = dvc_commands(methods, seeds, sets, jobs, force)
    n = len(methods) * len(seeds)
    for item in sets:  # a sweep in -S (key=a,b) multiplies the grid, as dvc does
        n *= len(split_sweep_values(item.partition("=")[2]))
    out(
        f"grid: {len(methods)} method(s) x {len(seeds)} seed(s){' x sweeps' if n > len(methods) * len(seeds) else ''} "
        f"= {n} experiment(s), {jobs} worker(s); "
        f"MLflow experiment {settings.experiment!r} at {uri}"
    )
    if dry_run:
        out(f"# 1. create the MLflow store and experiment {settings.experiment!r} if missing (hdmap-ad init-tracking)")
        out(shlex.join(queue_cmd))
        out(shlex.join(start_cmd))
        out("# 4. wait until `dvc queue status` shows every task Success or Failed")
        if compare:
            out(
                "hdmap-ad compare"
                + (f" --methods {','.join(methods)}" if methods else "")
                + "".join(f" --set {shlex.quote(s)}" for s in _first_choice(sets))
            )
        return 0

    run = runner or _default_runner
    untracked = [
        f
        for f in _untracked(Path.cwd())
        if f not in ("dvc.lock", "mlflow.db")
        and not f.startswith(("data/", "models/", "metrics/", "plots/", "reports/"))
    ]
    if untracked:
        out(
            f"warning: {len(untracked)} untracked file(s) are NOT copied into queued experiments (git add them): "
            + ", ".join(untracked[:8])
            + (" ..." if len(untracked) > 8 else "")
        )
    from hdmap_ad.pipeline.store_check import open_experiment

    # within seconds: the store answers and takes writes, before any experiment is queued
    exp_id = open_experiment(settings.experiment, settings.tracking_uri)
    # the workers' compare stages log there: create it now too, not in a race between them
    open_experiment(tracking.compare_experiment_name(settings.experiment), settings.tracking_uri)
    out(f"MLflow experiment {settings.experiment!r} (id {exp_id}) ready at {uri}")
    if jobs > 1 and (gpus := cuda_device_count()) > 1:
        out(
            f"{gpus} GPUs: each worker claims its own (runtime.device=auto)"
            + (f"; {jobs - gpus} worker(s) wait for a free GPU" if jobs > gpus else "")
        )

    status_cmd = with_venv_dvc(["dvc", "queue", "status"])
    before, _ = parse_queue_status(_check(run(status_cmd), status_cmd))
    out("$ " + shlex.join(queue_cmd))
    queued_out = _check(run(with_venv_dvc(queue_cmd)), queue_cmd)
    after, _ = parse_queue_status(_check(run(status_cmd), status_cmd))
    ours = {rev: t for rev, t in after.items() if rev not in before}
    if len(ours) != n:
        out(f"warning: expected {n} new queue task(s), found {len(ours)}")
    others = [t for rev, t in after.items() if rev not in ours and t.status in ("Queued", "Running")]
    if others:
        out(f"note: {len(others)} task(s) queued earlier will run too: {', '.join(t.name or t.rev for t in others)}")
    names = re.findall(r"Queued experiment '([^']+)'", queued_out)
    if names:
        out(f"queued: {', '.join(names)}")
    out("$ " + shlex.join(start_cmd))
    _check(run(with_venv_dvc(start_cmd)), start_cmd)

    final = wait_for_tasks(set(ours), run, status_cmd, poll_s=poll_s, stall_s=stall_s, out=out)
    failed = [t for t in final.values() if t.status == "Failed"]
    unfinished = [t for t in final.values() if t.status not in DONE_STATES]
    ok = sum(t.status == "Success" for t in final.values())
    out(f"grid finished: {ok} succeeded, {len(failed)} failed, {len(unfinished)} not finished (of {len(ours)})")
    for t in failed:
        out(f"  FAILED {t.name or t.rev}: see `dvc queue logs {t.name or t.rev}`")
        for line in failure_tail(t.name or t.rev, run):
            out(f"    | {line}")
    for t in unfinished:
        if t.status == "Gone":
            out(f"  {t.name or t.rev}: no longer listed by `dvc queue status` (removed?); see `dvc exp show`")
        else:
            out(f"  {t.status} {t.name or t.rev}: still in the queue (`dvc queue status`)")
    if compare:
        compare_mod.run_compare(settings, methods=list(methods))
    return 0 if not failed and not unfinished else 1


def failure_tail(name: str, run: Callable[[Sequence[str]], subprocess.CompletedProcess], lines: int = 6) -> list[str]:
    """The last non-empty lines of `dvc queue logs NAME` (where a failed stage says why); [] when the log
    cannot be read: the FAILED line already says where to look."""
    try:
        result = run(with_venv_dvc(["dvc", "queue", "logs", name]))
    except (OSError, HdmapError):
        return []
    text = (result.stdout or "") + (result.stderr or "")
    return [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]


def wait_for_tasks(
    revs: set[str], run, status_cmd: Sequence[str], *, poll_s: float, stall_s: float, out: Callable[[str], None]
) -> dict[str, Task]:
    """Poll `dvc queue status` until every task in `revs` is Success/Failed (or gone, or no worker is
    left for `stall_s` seconds); print a progress line whenever the counts change."""
    last_line, idle_since, latest = None, None, {}
    try:
        while True:
            tasks, workers = parse_queue_status(_check(run(status_cmd), status_cmd))
            for rev in revs:
                if rev in tasks:
                    latest[rev] = tasks[rev]
                elif rev not in latest:
                    latest[rev] = Task(rev, "", "Gone")
                elif latest[rev].status not in DONE_STATES:
                    latest[rev] = Task(rev, latest[rev].name, "Gone")
            counts = {
                s: sum(t.status == s for t in latest.values()) for s in ("Success", "Failed", "Running", "Queued")
            }
            done = counts["Success"] + counts["Failed"]
            line = (
                f"{done}/{len(revs)} done ({counts['Failed']} failed), {counts['Running']} running, "
                f"{counts['Queued']} queued" + (f"; workers {workers[0]} active, {workers[1]} idle" if workers else "")
            )
            if line != last_line:
                out(time.strftime("[%H:%M:%S] ") + line)
                last_line = line
            pending = [t for t in latest.values() if t.status in ("Queued", "Running")]
            if not pending:
                return latest
            if workers is not None and sum(workers) == 0:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= stall_s:
                    out(
                        f"no queue worker has been alive for {stall_s:.0f} s while {len(pending)} task(s) wait: "
                        f"restart them with `dvc queue start -j N`"
                    )
                    return latest
            else:
                idle_since = None
            time.sleep(poll_s)
    except KeyboardInterrupt:
        out(
            "stopped waiting; the queue keeps running in the background: `dvc queue status`, "
            "`dvc queue stop` (after the running ones) or `dvc queue kill NAME`"
        )
        raise
