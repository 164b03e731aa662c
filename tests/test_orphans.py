"""A RUNNING run whose process is gone is ended (KILLED, with a note) by the next `hdmap-ad compare`
(or train); runs whose process lives, or that this host cannot check, are left alone."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_pipeline import EXPERIMENT, TinyPipeline

BIN = Path(sys.executable).parent


def _dead_pid() -> tuple[int, float]:
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, started


@pytest.mark.slow
def test_compare_ends_runs_whose_process_is_gone(tiny_pipeline: TinyPipeline, tmp_path):
    import mlflow

    from hdmap_ad.pipeline.orphans import HOST_TAG, NOTE_TAG, PID_TAG, STARTED_TAG, process_tags

    work = tmp_path / "w"
    shutil.copytree(tiny_pipeline.root, work)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    pid, started = _dead_pid()
    host = socket.gethostname()
    runs = {
        "orphan": {PID_TAG: str(pid), HOST_TAG: host, STARTED_TAG: f"{started:.2f}"},
        "alive": process_tags(),  # this test process, running while compare looks
        "elsewhere": {PID_TAG: str(pid), HOST_TAG: "another-host", STARTED_TAG: "0"},
        "untagged": {},
        # a live pid that belongs to another process than the one that started the run (pid reuse)
        "reused": {**process_tags(), STARTED_TAG: "12345.00"},
    }
    ids = {
        name: client.create_run(exp, run_name=name, tags={**tags, "method": "baseline"}).info.run_id
        for name, tags in runs.items()
    }
    env = {**tiny_pipeline.env(), "MLFLOW_TRACKING_URI": uri}
    p = subprocess.run(
        [str(BIN / "hdmap-ad"), "compare"], capture_output=True, text=True, cwd=work, env=env, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    status = {name: client.get_run(i).info.status for name, i in ids.items()}
    assert status == {
        "orphan": "KILLED",
        "alive": "RUNNING",
        "elsewhere": "RUNNING",
        "untagged": "RUNNING",
        "reused": "KILLED",
    }
    note = client.get_run(ids["orphan"]).data.tags[NOTE_TAG]
    assert note.startswith(f"process {pid} on {host} was gone at ") and note.endswith(
        "ended as KILLED by hdmap-ad compare"
    )
    out = " ".join(p.stdout.split())
    assert f"MLflow run orphan ({ids['orphan']}) was RUNNING, but its process is gone: marked KILLED" in out
    for name in ("alive", "elsewhere", "untagged"):
        assert f"({ids[name]}) was RUNNING" not in out
    for i in ids.values():
        client.set_terminated(i, "KILLED")


@pytest.mark.slow
def test_train_records_its_process_and_ends_orphans(tiny_pipeline: TinyPipeline, tmp_path):
    import mlflow

    from hdmap_ad.pipeline.orphans import HOST_TAG, PID_TAG, STARTED_TAG

    work = tmp_path / "w"
    shutil.copytree(tiny_pipeline.root, work)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    pid, started = _dead_pid()
    tags = {PID_TAG: str(pid), HOST_TAG: socket.gethostname(), STARTED_TAG: f"{started:.2f}"}
    orphan = client.create_run(exp, run_name="killed-train", tags=tags).info.run_id
    env = {**tiny_pipeline.env(), "MLFLOW_TRACKING_URI": uri}
    p = subprocess.run(
        [str(BIN / "hdmap-ad"), "train", "--set", "train.steps=6"],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert client.get_run(orphan).info.status == "KILLED"
    assert f"MLflow run killed-train ({orphan}) was RUNNING, but its process is gone: marked KILLED" in " ".join(
        (p.stdout + p.stderr).split()
    )
    new = json.loads((work / "models" / "run.json").read_text())["run_id"]
    recorded = client.get_run(new).data.tags
    assert recorded[HOST_TAG] == socket.gethostname() and recorded[PID_TAG].isdigit() and STARTED_TAG in recorded
    assert client.get_run(new).info.status == "FINISHED"
