"""`hdmap-ad grid`: the exact DVC commands, the store before the workers, GPU claims, concurrent writers."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import shipped
from hdmap_ad.apps import grid
from hdmap_ad.core import devices
from hdmap_ad.core.method_params import METHODS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A repository root stand-in: dvc.yaml + params.yaml, the MLflow store resolved to it (none yet)."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(shipped.text("params.yaml"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    return tmp_path


def test_dry_run_prints_the_exact_dvc_commands(workspace, capsys):
    from hdmap_ad.apps import cli

    assert (
        cli.main(
            [
                "grid",
                "--dry-run",
                "--methods",
                "baseline,gem",
                "--seeds",
                "42,43",
                "-j",
                "2",
                "-S",
                "train.steps=50",
                "--set",
                "model.fuse_groups=[[0,1],[2,3]]",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert (
        "dvc exp run --queue -S method=baseline,gem -S seed=42,43 -S train.steps=50 -S 'model.fuse_groups=[[0,1],[2,3]]'"
        in lines
    )
    assert "dvc queue start -j 2" in lines
    assert any(line.startswith("hdmap-ad compare --methods baseline,gem") for line in lines)
    assert lines.index("dvc queue start -j 2") > [i for i, line in enumerate(lines) if "MLflow store" in line][0]
    assert not (workspace / "mlflow.db").exists()  # a dry run changes nothing

    assert cli.main(["grid", "--dry-run", "--no-compare"]) == 0
    lines = capsys.readouterr().out.splitlines()
    every = ",".join(METHODS)  # by default, every method of the method list (each alone)
    assert f"dvc exp run --queue -S method={every} -S seed=42,43,44,123,456" in lines
    assert "dvc queue start -j 1" in lines and not any(line.startswith("hdmap-ad compare") for line in lines)
    assert cli.main(["grid", "--dry-run", "--methods", "baseline", "--set", "seed=3"]) == 2  # seeds go through --seeds


def test_worker_environment(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = grid.worker_env()
    # stages import the experiment copy's src/ (not an editable install's live workspace), find hdmap-ad
    assert env["PYTHONPATH"].split(os.pathsep) == ["src", "/elsewhere"]
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent) or str(
        Path(sys.executable).parent
    ) in env["PATH"].split(os.pathsep)
    assert env["DVC_NO_ANALYTICS"] == "1"


def test_parse_queue_status():
    text = """Task     Name        Created       Status
e04e28e  major-syce  01:27 AM      Running
605d98c              01:27 AM      Queued
a9a027f  wight-runs  Nov 28, 2025  Failed
f6b6da1  leady-raps  01:27 AM      Success

Worker status: 2 active, 1 idle
"""
    tasks, workers = grid.parse_queue_status(text)
    assert workers == (2, 1)
    assert {t.rev: (t.name, t.status) for t in tasks.values()} == {
        "e04e28e": ("major-syce", "Running"),
        "605d98c": ("", "Queued"),
        "a9a027f": ("wight-runs", "Failed"),
        "f6b6da1": ("leady-raps", "Success"),
    }
    assert grid.parse_queue_status("No experiment tasks in the queue.\n\nWorker status: 0 active, 0 idle\n") == (
        {},
        (0, 0),
    )


class FakeDvc:
    """Plays `dvc queue status` / `dvc exp run --queue` / `dvc queue start`; the "workers" log runs to MLflow."""

    def __init__(self, db: Path, fail: set[tuple[str, int]]):
        self.db, self.fail, self.calls = db, fail, []
        self.tasks = {"0ld0000": ["old-one", "Success"]}  # from an earlier grid: not ours
        self.polls_after_start = 0
        self.store_at_start = None

    def status_text(self) -> str:
        rows = [f"{rev}  {t[0]}  01:27 AM  {t[1]}" for rev, t in self.tasks.items()]
        return "Task  Name  Created  Status\n" + "\n".join(rows) + "\n\nWorker status: 0 active, 0 idle\n"

    def __call__(self, cmd):
        args = list(cmd[1:])
        self.calls.append(args)
        out = ""
        if args[:2] == ["queue", "status"]:
            if self.polls_after_start:
                self.polls_after_start += 1
                for task in self.tasks.values():
                    if task[1] == "Running" and self.polls_after_start > 2:
                        task[1] = "Failed" if tuple(task[2:]) in self.fail else "Success"
                    elif task[1] == "Queued":
                        task[1] = "Running"
            out = self.status_text()
        elif args[:3] == ["exp", "run", "--queue"]:
            methods = args[args.index("-S") + 1].split("=")[1].split(",")
            seeds = [int(s) for s in args[args.index("-S") + 3].split("=")[1].split(",")]
            for i, (m, s) in enumerate((m, s) for m in methods for s in seeds):
                self.tasks[f"abc{i:04x}"] = [f"exp-{m}-{s}", "Queued", m, s]
                out += f"Queued experiment 'exp-{m}-{s}' for future execution.\n"
        elif args[:2] == ["queue", "logs"]:
            out = "Running stage 'train':\n> hdmap-ad train\nhdmap-ad: error: train.steps=5: what went wrong\n"
        elif args[:2] == ["queue", "start"]:
            # what the workers would find: the store and the experiment already there
            with sqlite3.connect(self.db) as con:
                self.store_at_start = [r[0] for r in con.execute("select name from experiments")]
            self.workers_log_runs()
            self.polls_after_start = 1
        return subprocess.CompletedProcess(cmd, 0, out, "")

    def workers_log_runs(self):
        import mlflow

        from test_compare import log_run

        mlflow.set_tracking_uri(f"sqlite:///{self.db}")
        exp = mlflow.MlflowClient().get_experiment_by_name("hdmap-dinomaly")
        for task in self.tasks.values():
            if len(task) > 2:
                m, s = task[2], task[3]
                log_run(
                    exp.experiment_id,
                    m,
                    s,
                    status="FAILED" if (m, s) in self.fail else "FINISHED",
                    evaluated=(m, s) not in self.fail,
                )


def test_store_and_experiment_exist_before_workers_start_then_compare(workspace):
    fake = FakeDvc(workspace / "mlflow.db", fail={("gem", 43)})
    lines: list[str] = []
    code = grid.run_grid(
        "params.yaml",
        ["baseline", "gem"],
        [42, 43, 44],
        ["train.steps=5", "compare.metrics=[auroc]"],
        jobs=2,
        poll_s=0.01,
        runner=fake,
        out=lines.append,
    )
    assert code == 1  # one experiment failed
    order = [" ".join(c[:3]) for c in fake.calls]
    assert order[:4] == ["queue status", "exp run --queue", "queue status", "queue start -j"]
    assert fake.calls[1] == [
        "exp",
        "run",
        "--queue",
        "-S",
        "method=baseline,gem",
        "-S",
        "seed=42,43,44",
        "-S",
        "train.steps=5",
        "-S",
        "compare.metrics=[auroc]",
    ]
    # the training and the compare experiment are created before `dvc queue start`
    assert fake.store_at_start == ["Default", "hdmap-dinomaly", "hdmap-dinomaly-compare"]
    text = "\n".join(lines)
    assert "6/6 done (1 failed)" in text and "old-one" not in text.split("grid finished")[1]
    assert "FAILED exp-gem-43: see `dvc queue logs exp-gem-43`" in text
    # the failed stage's last lines, read from its queue log, come with it
    assert "    | hdmap-ad: error: train.steps=5: what went wrong" in text
    assert ["queue", "logs", "exp-gem-43"] in fake.calls
    saved = json.loads((workspace / "reports/comparison.json").read_text())
    assert saved["runs"]["gem"].keys() == {"42", "44"} and saved["runs"]["baseline"].keys() == {"42", "43", "44"}
    assert any(x["reason"].startswith("failed") for x in saved["left_out"])
    assert (workspace / "reports/comparison.md").is_file()
    # plots: one per domain (+ mean) of each listed metric, each method's per-seed values; logged with the rest
    assert sorted(p.name for p in (workspace / "reports/plots").glob("*.png")) == [
        f"auroc_{s}.png" for s in ("domain_A", "domain_B", "domain_C", "domain_D", "mean")
    ]
    assert "gem,43," not in (workspace / "reports/plots/data/per_seed.csv").read_text()
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    assert (
        client.search_runs([client.get_experiment_by_name("hdmap-dinomaly").experiment_id], "tags.kind = 'compare'")
        == []
    )
    (crun,) = client.search_runs(
        [client.get_experiment_by_name("hdmap-dinomaly-compare").experiment_id], "tags.kind = 'compare'"
    )
    assert {a.path for a in client.list_artifacts(crun.info.run_id)} == {
        "compare.json",
        "comparison.md",
        "comparison.json",
        "plots",
    }
    assert "plots/auroc_domain_C.png" in {a.path for a in client.list_artifacts(crun.info.run_id, "plots")}


HOLDER = """
import sys, time, pathlib
from hdmap_ad.core.devices import claim_cuda_device
lock_dir, mode, release = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
print(claim_cuda_device("auto", device_count=3, lock_dir=lock_dir, wait=mode == "wait", poll_s=0.05), flush=True)
while not release.exists():
    time.sleep(0.02)
"""


def _holder(tmp_path: Path, name: str, mode: str = "nowait") -> tuple[subprocess.Popen, Path]:
    release = tmp_path / f"release-{name}"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "locks"), mode, str(release)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    return p, release


def test_gpu_claim_gives_concurrent_processes_distinct_devices(tmp_path):
    holders = [_holder(tmp_path, str(i)) for i in range(3)]
    try:
        got = [p.stdout.readline().strip() for p, _ in holders]
        assert sorted(got) == ["cuda:0", "cuda:1", "cuda:2"]
        extra, extra_release = _holder(tmp_path, "extra")  # every GPU claimed, not waiting: no device of its own
        assert extra.stdout.readline().strip() == "None"
        extra_release.touch()
        waiter, waiter_release = _holder(tmp_path, "waiter", "wait")
        time.sleep(0.5)
        assert waiter.poll() is None  # still waiting for a GPU
        holders[1][1].touch()  # the process holding got[1] ends: its lock goes with it
        holders[1][0].wait(timeout=10)
        assert waiter.stdout.readline().strip() == got[1]
        assert "waiting for one" in waiter.stderr.readline()
        waiter_release.touch()
    finally:
        for _, release in holders:
            release.touch()
        for p, _ in holders:
            p.wait(timeout=10)


def test_gpu_claim_only_for_auto_with_several_devices(tmp_path, monkeypatch):
    assert devices.claim_cuda_device("cuda:1", device_count=4, lock_dir=tmp_path) is None
    assert devices.claim_cuda_device("auto", device_count=1, lock_dir=tmp_path) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    try:
        assert devices.claim_cuda_device("auto", device_count=2, lock_dir=tmp_path) == "cuda:0"
        assert (
            devices.claim_cuda_device("auto", device_count=2, lock_dir=tmp_path) == "cuda:0"
        )  # same process: same GPU
        assert (tmp_path / "gpu-5.lock").read_text().startswith(f"pid {os.getpid()}")  # named after the physical GPU
    finally:
        devices.release_cuda_device()
    # default location: <repo root>/.dvc/tmp/gpu-locks
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    try:
        assert devices.claim_cuda_device("auto", device_count=2) == "cuda:0"
        assert (tmp_path / ".dvc/tmp/gpu-locks/gpu-0.lock").is_file()
    finally:
        devices.release_cuda_device()


WRITER = """
import os, sys, time
import mlflow
mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
exp_id = mlflow.MlflowClient().get_experiment_by_name({exp!r}).experiment_id
method = sys.argv[1]
while not os.path.exists({go!r}):
    time.sleep(0.01)
for seed in range(6):  # as training.py + evaluation.py log them
    with mlflow.start_run(experiment_id=exp_id, run_name=f"{{method}}-seed{{seed}}",
                          tags={{"method": method, "seed": str(seed), "profile": "quick", "comparison_key": "k1"}}):
        mlflow.log_metric("train/loss", 0.1, step=1)
        mlflow.log_metrics({{f"test_auroc/{{d}}": 0.9 + 0.01 * ((seed * 7 + len(method) + i) % 5)
                            for i, d in enumerate(("domain_A", "domain_B", "mean"))}})
        mlflow.set_tags({{"evaluated": "true", "invalid_domains": "", "stage": "trained"}})
"""


def test_two_concurrent_writers_lose_no_run(tmp_path, monkeypatch):
    from hdmap_ad.apps import compare
    from hdmap_ad.pipeline import tracking
    from test_compare import EXPERIMENT, settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.ensure_experiment(EXPERIMENT)  # created once, before the writers (as grid does)
    go = tmp_path / "go"
    code = WRITER.format(exp=EXPERIMENT, go=str(go))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    procs = [
        subprocess.Popen([sys.executable, "-c", code, m], env=env, stderr=subprocess.PIPE, text=True)
        for m in ("baseline", "gem")
    ]
    time.sleep(0.5)
    go.touch()  # both start logging at once (after their ~4 s mlflow import)
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert not any("locked" in e for e in errs)
    result = compare.run_compare(settings(), plots_dir=None, log_run=False).to_json()
    assert result["n_runs_found"] == 12 and result["left_out"] == []
    assert {m: len(r) for m, r in result["runs"].items()} == {"baseline": 6, "gem": 6}
    assert {c["n"] for c in result["comparisons"]} == {6}


def test_a_combined_method_is_one_grid_entry_and_compare_pairs_it(workspace):
    """`hdmap-ad grid --methods baseline,topk,topk+hseg --seeds 42,43`: DVC's own sweep parser reads
    topk+hseg as one value, and compare pairs the combination with the baseline as a method of its own."""
    from dvc.utils.hydra import get_hydra_sweeps

    fake = FakeDvc(workspace / "mlflow.db", fail=set())
    lines: list[str] = []
    methods = ["baseline", "topk", "topk+hseg"]
    code = grid.run_grid(
        "params.yaml",
        methods,
        [42, 43],
        ["compare.metrics=[auroc]"],
        jobs=2,
        poll_s=0.01,
        runner=fake,
        out=lines.append,
    )
    assert code == 0, "\n".join(lines)
    queued = fake.calls[1]
    assert queued[3:7] == ["-S", "method=baseline,topk,topk+hseg", "-S", "seed=42,43"]
    sweeps = get_hydra_sweeps({"params.yaml": [queued[4], queued[6]]})  # what `dvc exp run --queue` expands
    combos = {(o[0].split("=")[1], int(o[1].split("=")[1])) for sweep in sweeps for o in [sweep["params.yaml"]]}
    assert combos == {(m, s) for m in methods for s in (42, 43)}
    saved = json.loads((workspace / "reports/comparison.json").read_text())
    assert list(saved["runs"]) == methods and saved["runs"]["topk+hseg"].keys() == {"42", "43"}
    assert "topk+hseg" in (workspace / "reports/comparison.md").read_text()
