"""`hdmap-ad grid --executor ray` on a real multi-node Ray cluster on this computer (docs/multi-machine.md).

One cluster for the module: a head (no CPUs: it only schedules) and two worker nodes of 1 CPU each,
each its own raylet and object store (`ray.cluster_utils.Cluster`), in a private temp dir, on this
machine's own address (Ray rewrites a 127.0.0.1 head to it), shut down at the end. Beside it: a
loopback `mlflow server`, a bare git remote and a
local-directory DVC remote; the driver is a clone of the remote, as on a user's machine.

The repository's pipeline is a stand-in for train + evaluate (the real one takes minutes per
experiment on a shared 2-core machine): one stage that logs the run with the real run name and tags
(hdmap_ad.pipeline.tracking, the real comparison_key), trains in steps, saves a resumable state after
each step and resumes into the same MLflow run, as training.py does. What is tested is the engine:
clone at the commit, `dvc exp run -S`, push/pull, retries, resume, skip, failure reporting, compare.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

import shipped
from servers import running_mlflow_server, sh

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[cluster]')")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXPERIMENT = "hdmap-ray-grid"
STEPS, STEP_S = 30, 0.4

STAND_IN = '''\
"""Stand-in for train + evaluate: the real run name and tags, a resumable state per step."""
import json, os, random, sys, time
from pathlib import Path

import mlflow

from hdmap_ad.core.config import load_params
from hdmap_ad.pipeline import tracking

p = load_params("params.yaml")
digest = "standin-data-1"
if p.train.lr > 1:
    print("error: training diverged: loss is NaN at step 1 (train.lr too high)", file=sys.stderr)
    sys.exit(1)
exp_id = tracking.ensure_experiment(p.mlflow.experiment, p.mlflow.tracking_uri)
state_file = Path("models/train_state/last.json")
state = json.loads(state_file.read_text()) if state_file.is_file() else {"step": 0, "run_id": None}
with mlflow.start_run(run_id=state["run_id"], experiment_id=exp_id, run_name=tracking.run_name(p, digest),
                      tags=tracking.run_tags(p, digest)) as run:
    if state["step"]:
        mlflow.set_tag("resumed_at_step", str(state["step"]))
        print(f"resuming from {state_file} at step {state['step']}", flush=True)
    for step in range(state["step"] + 1, p.train.steps + 1):
        time.sleep(%(step_s)s)
        mlflow.log_metric("train/loss", 1.0 / step, step=step)
        state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step, "run_id": run.info.run_id}))
        os.replace(tmp, state_file)
    rng = random.Random(f"{p.method}-{p.seed}")
    level = {"baseline": 0.90, "gem": 0.93}.get(p.method, 0.9)
    metrics = {}
    for m in ("auroc", "tpr_at_fpr_1", "tpr_at_fpr_5"):
        per = [min(1.0, level + rng.gauss(0, 0.01)) for _ in p.data.domains]
        metrics.update({f"test_{m}/{d}": v for d, v in zip(p.data.domains, per)})
        metrics[f"test_{m}/mean"] = sum(per) / len(per)
    mlflow.log_metrics(metrics)
    mlflow.set_tags({"evaluated": "true", "invalid_domains": ""})
Path("models/run.txt").write_text(run.info.run_id + "\\n")
Path("metrics").mkdir(exist_ok=True)
Path("metrics/eval.json").write_text(json.dumps({"auroc": metrics["test_auroc/mean"]}))
''' % {"step_s": STEP_S}  # noqa: UP031 (a template of Python code with braces)

DVC_YAML = """\
stages:
  train:
    cmd: python standin.py
    deps: [standin.py, src/hdmap_ad/pipeline/tracking.py]
    params: [method, seed, train, mlflow]
    outs: [models/run.txt]
    metrics:
      - metrics/eval.json:
          cache: false
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The cluster, the server, the remotes and the driver's clone; everything stopped at the end."""
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("raygrid")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rg", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1")
    for var in ("DVC_ROOT", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PYTHONPATH"):
        env.pop(var, None)
    node_args = {"num_cpus": 1, "object_store_memory": 100 * 2**20, "temp_dir": str(ray_tmp)}
    # Ray's test cluster writes its address file under RAY_TMPDIR/ray (default /tmp/ray, which a
    # fresh machine lacks): point it into this test's own directory.
    (ray_tmp / "ray").mkdir()
    env["RAY_TMPDIR"] = str(ray_tmp)
    cluster = None
    with running_mlflow_server(root) as url, pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", str(ray_tmp))
        try:
            cluster = Cluster(
                initialize_head=True,
                connect=False,
                head_node_args={**node_args, "num_cpus": 0, "include_dashboard": False},
            )
            workers = [cluster.add_node(**node_args) for _ in range(2)]
            cluster.wait_for_nodes()
            origin, remote, seed_repo, driver = root / "origin.git", root / "dvc-remote", root / "seed", root / "driver"
            sh(["git", "init", "-q", "--bare", str(origin)], root, env)
            shutil.copytree(REPO / "src", seed_repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            p = yaml.safe_load(shipped.text("params.yaml"))
            p["mlflow"]["experiment"] = EXPERIMENT
            p["train"]["steps"] = STEPS
            p["compare"].update(metrics=["auroc"], bootstrap_resamples=200)
            (seed_repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
            (seed_repo / "dvc.yaml").write_text(DVC_YAML)
            (seed_repo / "standin.py").write_text(STAND_IN)
            (seed_repo / ".gitignore").write_text("/models/train_state/\n/reports/\n/metrics/compare.json\n")
            for cmd in (
                ["git", "init", "-q", "-b", "main"],
                [str(BIN / "dvc"), "init", "-q"],
                [str(BIN / "dvc"), "remote", "add", "-d", "storage", str(remote)],
                ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "tiny repo"],
                ["git", "remote", "add", "origin", str(origin)],
                ["git", "push", "-q", "origin", "main"],
            ):
                sh(cmd, seed_repo, env)
            sh(["git", "clone", "-q", "-b", "main", str(origin), str(driver)], root, env)
            yield {
                "root": root,
                "url": url,
                "cluster": cluster,
                "workers": workers,
                "driver": driver,
                "env": dict(env, MLFLOW_TRACKING_URI=url, PYTHONUNBUFFERED="1"),
                "node_args": node_args,
            }
        finally:
            if cluster is not None:
                cluster.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


def grid(world, *args: str) -> subprocess.Popen:
    log = open(world["root"] / f"grid-{time.monotonic_ns()}.out", "w+")
    cmd = [
        str(BIN / "hdmap-ad"),
        "grid",
        "--executor",
        "ray",
        "--cluster",
        world["cluster"].address,
        "--shared-dir",
        str(world["root"] / "shared"),
        *args,
    ]
    proc = subprocess.Popen(cmd, cwd=world["driver"], env=world["env"], stdout=log, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    proc.log.seek(0)
    out = proc.log.read()
    assert code is not None, f"grid did not finish in {timeout} s:\n{out[-4000:]}"
    return code, out


def training_runs(world) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=world["url"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kind") != "compare"]


def test_grid_survives_a_killed_node_and_counts_each_pair_once(world, monkeypatch):
    cluster, shared = world["cluster"], world["root"] / "shared"
    proc = grid(world, "--methods", "baseline,gem", "--seeds", "42,43", "--max-retries", "2")
    # kill the node of the first task that has checkpointed a few steps, then give the cluster a fresh node
    victim, deadline = None, time.monotonic() + 180
    while victim is None and proc.poll() is None and time.monotonic() < deadline:
        for state in shared.glob("*/*/models/train_state/last.json"):
            try:
                step = json.loads(state.read_text())["step"]
            except (OSError, ValueError, KeyError):
                continue
            if step >= 3:
                exp_name = state.parents[2].name
                method, seed = re.fullmatch(r"g[0-9a-f]{6}-(\w+)-(\d+)", exp_name).groups()
                proc.log.seek(0)
                running = re.findall(rf"{method} seed {seed}: running on node ([0-9a-f]{{8}})", proc.log.read())
                nodes = [n for n in world["workers"] if running and n.node_id.startswith(running[-1])]
                if nodes:
                    victim = (method, seed, running[-1], step)
                    # the machine dies: its raylet and the worker running the task (whose watchdog then
                    # ends the task's `dvc exp run`; the raylet's death alone reaches workers late)
                    worker_pid = int(re.findall(r"\(pid (\d+)\)", state.parents[2].with_suffix(".log").read_text())[-1])
                    cluster.remove_node(nodes[0], allow_graceful=False)
                    os.kill(worker_pid, signal.SIGKILL)
                    world["workers"].remove(nodes[0])
                    world["workers"].append(cluster.add_node(**world["node_args"]))
                    break
        time.sleep(0.3)
    code, out = finish(proc, 300)
    (world["root"] / "grid-kill.out").write_text(out)
    assert victim is not None, f"no task was seen mid-training:\n{out[-3000:]}"
    method, seed, dead_node, step = victim
    assert code == 0, out[-4000:]
    retried = re.findall(rf"{method} seed {seed}: done on node ([0-9a-f]{{8}}) \([^)]*\), attempt (\d+)", out)
    assert retried and retried[-1][0] != dead_node and int(retried[-1][1]) >= 2, out[-3000:]
    assert "grid finished: 4 done, 0 skipped, 0 failed (of 4)" in out

    # one finished, evaluated run per pair; the killed attempt's run was resumed, not duplicated
    runs = training_runs(world)
    pairs = sorted((r.data.tags["method"], r.data.tags["seed"]) for r in runs)
    assert pairs == [("baseline", "42"), ("baseline", "43"), ("gem", "42"), ("gem", "43")]
    assert all(r.info.status == "FINISHED" and r.data.tags.get("evaluated") == "true" for r in runs)
    (resumed,) = [r for r in runs if (r.data.tags["method"], r.data.tags["seed"]) == (method, seed)]
    # from its checkpoint, not from step 0, and mid-training (the kill stopped the first attempt)
    assert step <= int(resumed.data.tags["resumed_at_step"]) < STEPS

    # the driver has every experiment (refs from the git remote, outputs from the DVC remote)
    shown = json.loads(sh([str(BIN / "dvc"), "exp", "show", "--json"], world["driver"], world["env"]))
    names = {
        e.get("name") for entry in shown for exp in (entry.get("experiments") or []) for e in (exp.get("revs") or [])
    }
    assert {f"{m}-{s}" for m in ("baseline", "gem") for s in (42, 43)} <= {n.split("-", 1)[1] for n in names if n}

    from hdmap_ad.apps.compare import load_settings, run_compare

    monkeypatch.chdir(world["driver"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["url"])
    result = run_compare(load_settings("params.yaml"), plots_dir=None, log_run=False).to_json()
    assert {m: sorted(r) for m, r in result["runs"].items()} == {"baseline": ["42", "43"], "gem": ["42", "43"]}
    (c,) = [c for c in result["comparisons"] if (c["method"], c["scope"], c["metric"]) == ("gem", "mean", "auroc")]
    assert c["seeds"] == [42, 43]


def test_finished_pairs_are_skipped_unless_forced(world):
    code, out = finish(grid(world, "--methods", "baseline,gem", "--seeds", "42,43", "--no-compare"), 120)
    assert code == 0, out[-3000:]
    assert out.count(": skipped (finished and evaluated at this commit") == 4
    assert "grid finished: 0 done, 4 skipped, 0 failed (of 4)" in out
    assert len(training_runs(world)) == 4


def test_a_failing_task_is_named_with_its_reason_and_not_retried(world):
    code, out = finish(grid(world, "--methods", "baseline", "--seeds", "7", "-S", "train.lr=1000", "--no-compare"), 180)
    assert code == 1, out[-3000:]
    assert "FAILED baseline seed 7" in out and "dvc exp run exited" in out
    assert "training diverged: loss is NaN" in out  # the log's last lines travel to the summary
    assert "attempt 2" not in out
    assert not [r for r in training_runs(world) if r.data.tags.get("seed") == "7"]
