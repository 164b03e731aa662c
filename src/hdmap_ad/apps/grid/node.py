"""What one (method, seed) task of `hdmap-ad grid --executor ray` does on the node that runs it.

Standard library only (Ray and MLflow are imported inside functions, from the node's environment):
the driver ships this module to the workers by value, so the task logic is the driver's even when a
node's installed hdmap-ad is another version; the pipeline itself then runs from the cloned commit
(`PYTHONPATH=src`).

A task: takes its work dir (a fresh clone per attempt in the node's temp dir, or one stable dir per
task under a shared dir, where a retry finds the killed attempt's clone and training state and
resumes), marks runs of its own experiment name that a dead attempt left RUNNING as KILLED, pulls the
data that the commit's dvc.lock names (best effort: the synthetic default is regenerated
deterministically by the pipeline), runs `dvc exp run -n NAME -S method=… -S seed=… [-S …]`, and
pushes the experiment with `dvc exp push` (git refs to the git remote, outputs to the DVC remote).

A non-zero exit of a command is a real error: it is returned (with the log's last lines), not
raised, so Ray never retries it. Only a lost worker or node makes Ray run the task again.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

# Kills the task's process group when the Ray worker that started it dies (a killed worker or node):
# otherwise the orphaned `dvc exp run` would go on training beside the retry.
WATCHDOG = """
import os, signal, sys, time
parent, pgid = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == parent:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        sys.exit(0)
    time.sleep(0.5)
try:
    os.killpg(pgid, signal.SIGKILL)
except ProcessLookupError:
    pass
"""
LOCK_WAIT_S = 300.0
TAIL_LINES = 12


class Progress:
    """A Ray actor (num_cpus=0): each task attempt says where it started; the driver polls it."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}

    def started(self, key: str, node_id: str, ip: str) -> int:
        attempt = int(self.state.get(key, {}).get("attempt", 0)) + 1
        self.state[key] = {"node": node_id, "ip": ip, "attempt": attempt, "since": time.time()}
        return attempt

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return dict(self.state)


def task_entry(spec: dict[str, Any], progress: Any) -> dict[str, Any]:
    """The Ray task: report the node, then run the experiment."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    ip = ray.util.get_node_ip_address()
    try:
        attempt = ray.get(progress.started.remote(spec["key"], node_id, ip), timeout=60)
    except Exception:  # noqa: BLE001  (progress is for the display only: never a reason to fail the task)
        attempt = 0
    result = run_task(spec, attempt)
    result.update(node=node_id, ip=ip, attempt=attempt)
    return result


def _env(spec: dict[str, Any]) -> dict[str, str]:
    """The stages' environment: the node's venv first on PATH, the clone's src/ first on PYTHONPATH,
    the shared tracking server."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != "src"]
    env["PYTHONPATH"] = os.pathsep.join(["src", *paths])
    env["DVC_NO_ANALYTICS"] = "1"
    env["MLFLOW_TRACKING_URI"] = spec["tracking_uri"]
    for var in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):  # the driver's, never this clone's
        env.pop(var, None)
    return env


def _dvc() -> str:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def _tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(line for line in lines[-n:] if line.strip())


def _run(
    cmd: list[str], cwd: Path, env: dict[str, str], log: Path, timeout: float | None = None, keep: Any = None
) -> int:
    """Run a command in its own process group, output appended to `log`, with the watchdog beside it;
    `keep`: a lock file the command holds too, so the lock outlives a killed worker until its command is gone."""
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=(keep.fileno(),) if keep is not None else (),
        )
        dog = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG, str(os.getpid()), str(proc.pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            fh.write(f"timed out after {timeout:.0f} s\n")
            return 124
        finally:
            dog.kill()
            dog.wait()


def _lock(path: Path) -> Any:
    """One attempt at a time in a shared work dir: wait for the previous holder (a killed attempt's
    processes hold the lock until the watchdog has ended them)."""
    fh = open(path, "a")
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fh
        except BlockingIOError:
            if time.monotonic() > deadline:
                fh.close()
                raise RuntimeError(f"{path}: still locked after {LOCK_WAIT_S:.0f} s by an earlier attempt") from None
            time.sleep(1.0)


def mark_dead_attempts(spec: dict[str, Any]) -> list[str]:
    """Runs of this task's experiment name still RUNNING can only be a killed attempt's (one attempt
    runs at a time): end them KILLED, so compare never counts them. A resumed training reopens its run."""
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=spec["tracking_uri"])
        exp = client.get_experiment_by_name(spec["experiment"])
        if exp is None:
            return []
        runs = client.search_runs(
            [exp.experiment_id], f"tags.dvc_exp_name = '{spec['exp_name']}' and attributes.status = 'RUNNING'"
        )
        for run in runs:
            client.set_terminated(run.info.run_id, "KILLED")
        return [r.info.run_id for r in runs]
    except Exception:  # the stages report an unreachable server themselves, with a clearer message
        return []


def _failure(reason: str, log: Path, workdir: Path) -> dict[str, Any]:
    return {"ok": False, "reason": reason, "tail": _tail(log), "log": str(log), "workdir": str(workdir)}


def run_task(spec: dict[str, Any], attempt: int) -> dict[str, Any]:
    """Clone (or reuse), run and push one experiment; {"ok": True, ...} or {"ok": False, "reason": ...}."""
    name = spec["exp_name"]
    if spec.get("shared_dir"):
        root = Path(spec["shared_dir"]) / spec["grid_id"]
        workdir = root / name
    else:
        root = Path(tempfile.gettempdir()) / "hdmap-grid" / spec["grid_id"]
        workdir = root / f"{name}-{uuid.uuid4().hex[:6]}"  # fresh per attempt: a retry restarts
    root.mkdir(parents=True, exist_ok=True)
    log = workdir.with_name(workdir.name + ".log")
    env = _env(spec)
    lock = _lock(workdir.with_name(workdir.name + ".lock")) if spec.get("shared_dir") else None
    try:
        with open(log, "a") as fh:
            fh.write(f"== attempt {attempt} on {os.uname().nodename} (pid {os.getpid()}) at {time.ctime()}\n")
        git = ["git", "-c", "advice.detachedHead=false"]
        if not (workdir / ".git").is_dir():
            if workdir.exists():
                shutil.rmtree(workdir)
            if _run([*git, "clone", "-q", "--no-checkout", spec["git_remote"], str(workdir)], root, env, log, 600) != 0:
                return _failure(f"git clone {spec['git_remote']} failed", log, workdir)
            if _run([*git, "checkout", "-q", "--detach", spec["commit"]], workdir, env, log, 300) != 0:
                return _failure(
                    f"commit {spec['commit'][:10]} is not on {spec['git_remote']} (git push it)", log, workdir
                )
            for key, value in (("user.name", "hdmap-ad grid"), ("user.email", "grid@hdmap-ad.invalid")):
                subprocess.run(["git", "config", key, value], cwd=workdir, check=True, timeout=30)
        else:
            with open(log, "a") as fh:
                fh.write(f"reusing {workdir} (its training state, if any, is resumed)\n")
        killed = mark_dead_attempts(spec)
        if killed:
            with open(log, "a") as fh:
                fh.write(f"marked the dead attempt's MLflow run(s) KILLED: {', '.join(killed)}\n")
        if (workdir / "dvc.lock").is_file():  # outputs recorded at this commit; missing ones are rebuilt
            _run([_dvc(), "pull", "--allow-missing"], workdir, env, log, 1800)
        cmd = [_dvc(), "exp", "run", "-n", name, "-S", f"method={spec['method']}", "-S", f"seed={spec['seed']}"]
        for item in spec.get("sets", []):
            cmd += ["-S", item]
        code = _run(cmd, workdir, env, log, keep=lock)
        if code != 0:
            return _failure(f"dvc exp run exited {code}", log, workdir)
        code = _run([_dvc(), "exp", "push", "origin", name], workdir, env, log, 1800)
        if code != 0:
            return _failure(f"dvc exp push exited {code}", log, workdir)
        shutil.rmtree(workdir, ignore_errors=True)  # everything is on the remotes now
        return {"ok": True, "exp_name": name, "log": str(log)}
    except Exception as err:  # noqa: BLE001  (a setup error of this task, reported, not retried)
        return _failure(f"{type(err).__name__}: {err}", log, workdir)
    finally:
        if lock is not None:
            lock.close()
