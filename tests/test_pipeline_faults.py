"""Faults through DVC, as a user meets them: a failing or killed train keeps the last good outputs, a
second `dvc exp run` stops the first, and a killed training resumes to the same metrics.

Its own throw-away repository (tests/dvc_repo.py), so it runs beside the other pipeline modules.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dvc_repo import dvc, env_for, mlflow_runs, restore_params, sh, snapshot, wait_for

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_a_failing_train_keeps_the_last_good_model_and_metrics(repo):
    before = snapshot(repo)
    out = dvc(repo, "exp", "run", "-S", "train.batch_size=100000", check=False)
    assert out.returncode != 0 and "larger than the training set" in out.stdout + out.stderr
    # configure succeeded (its output is the new config); train failed: everything after it is kept
    after = snapshot(repo)
    assert after.pop("models/train_config.json") != before.pop("models/train_config.json")
    assert after == before
    restore_params(repo)


def test_a_killed_train_keeps_the_last_good_model_and_metrics(repo):
    before = snapshot(repo)
    start = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "exp", "run", "-S", "seed=5", "-S", "train.steps=400"],
        cwd=repo,
        env=env_for(repo),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    state = repo / "models/train_state/last.safetensors"
    try:
        assert wait_for(lambda: state.is_file() and state.stat().st_mtime > start, proc), "training never checkpointed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    after = snapshot(repo)
    after.pop("models/train_config.json"), before.pop("models/train_config.json")  # configure had finished
    assert after == before
    restore_params(repo)


def test_a_second_exp_run_in_the_workspace_stops_the_first(repo):
    """DVC's second `exp run` fails on its lock after writing its -S values into params.yaml; the first
    must then stop, at its next checkpoint, rather than record seed 12 beside a model trained with seed 11."""
    start = time.time()
    first = subprocess.Popen(
        [sys.executable, "-m", "dvc", "exp", "run", "-S", "seed=11", "-S", "train.steps=400"],
        cwd=repo,
        env=env_for(repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    state = repo / "models/train_state/last.safetensors"
    assert wait_for(lambda: state.is_file() and state.stat().st_mtime > start, first), "training never started"
    second = dvc(repo, "exp", "run", "-S", "seed=12", check=False)
    assert second.returncode != 0
    output, _ = first.communicate(timeout=600)
    assert first.returncode != 0, output[-3000:]
    assert "params.yaml changed while this run was in progress" in output, output[-3000:]
    assert "dvc exp run --queue" in output
    from hdmap_ad.core.checkpoint import load

    assert load(state)["step"] < 400  # stopped at a checkpoint, not after the whole training
    runs = mlflow_runs(repo)
    finished = runs[runs["status"] == "FINISHED"]
    assert not set(finished["tags.seed"]) & {"11", "12"}
    restore_params(repo)


def test_killed_training_resumes_to_the_same_metrics(repo, tmp_path):
    """Kill `train` after a checkpoint, rerun: it resumes and ends where an uninterrupted run does."""
    from hdmap_ad.core import checkpoint

    train = ["hdmap-ad", "train", "--set", "seed=7", "--set", "train.steps=12", "--set", "mlflow.experiment=resume"]
    shutil.rmtree(repo / "models/train_state", ignore_errors=True)  # earlier tests' killed runs
    sh(repo, *train)  # the uninterrupted reference
    reference = json.loads((repo / "metrics/train.json").read_text())
    reference_thresholds = checkpoint.load(repo / "models/model.safetensors")["thresholds"]
    shutil.rmtree(repo / "models/train_state", ignore_errors=True)
    env = env_for(repo)
    proc = subprocess.Popen(
        train,
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    state = repo / "models/train_state/last.safetensors"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            from hdmap_ad.core.checkpoint import load

            if load(state)["step"] >= 4:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.2)
    proc.wait(timeout=60)
    assert proc.returncode != 0, "training finished before it could be killed; make it longer"
    out = sh(repo, *train)
    assert "resuming from" in out.stderr
    resumed = json.loads((repo / "metrics/train.json").read_text())
    assert resumed["val_auroc"] == reference["val_auroc"]
    assert checkpoint.load(repo / "models/model.safetensors")["thresholds"] == pytest.approx(
        reference_thresholds, abs=1e-9
    )
