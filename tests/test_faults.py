"""Hostile input and injected faults, through the `hdmap-ad` command: one `error:` line naming the file
or value, an exit status that tells the truth, and nothing already written lost."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from fixtures_pipeline import TinyPipeline

BIN = Path(sys.executable).parent


def hdmap(args: list, pipeline: TinyPipeline, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "hdmap-ad"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or pipeline.root,
        env=pipeline.env(**env),
        timeout=600,
    )


def errors(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def _good_map(pipeline: TinyPipeline) -> Path:
    return sorted((pipeline.data_root / "domain_A" / "test" / "good").glob("*.tif*"))[0]


@pytest.mark.slow
def test_predict_counts_a_map_whose_score_overflows_as_failed(tiny_pipeline, tmp_path):
    folder = tmp_path / "domain_A"
    folder.mkdir()
    huge = folder / "huge.tiff"
    tifffile.imwrite(huge, np.full((31, 95), 3e38, dtype=np.float32))
    good = _good_map(tiny_pipeline)
    out = tmp_path / "p.csv"
    common = ["predict", "--params", tiny_pipeline.params_file, "--device", "cpu", "--model", tiny_pipeline.checkpoint]
    p = hdmap([*common, "--out", out, good, huge], tiny_pipeline)
    assert p.returncode == 2
    assert errors(p.stderr) == [
        f"error: {huge}: the model's score is NaN/Inf (largest absolute value in the map 3e+38); "
        "values this large overflow the model's arithmetic"
    ]
    assert "scored 1 map(s)" in p.stderr and "1 failed" in p.stderr
    rows = pd.read_csv(out, keep_default_na=False)
    assert list(rows["path"]) == [str(good)] and np.isfinite(rows["score"]).all()
    # nothing scorable: no CSV replaced, exit 2
    out.write_text("kept\n")
    p = hdmap([*common, "--out", out, huge], tiny_pipeline)
    assert p.returncode == 2 and errors(p.stderr)[-1].startswith("error: no map could be scored (1 input(s) failed)")
    assert out.read_text() == "kept\n"


@pytest.mark.slow
def test_predict_refuses_another_map_size_unless_asked_to_resize(tiny_pipeline, tmp_path):
    small = tmp_path / "domain_A" / "small.tiff"
    small.parent.mkdir()
    tifffile.imwrite(small, np.full((20, 40), 0.2, dtype=np.float32))
    good = _good_map(tiny_pipeline)
    out = tmp_path / "p.csv"
    common = ["predict", "--params", tiny_pipeline.params_file, "--device", "cpu", "--model", tiny_pipeline.checkpoint]
    p = hdmap([*common, "--out", out, good, small], tiny_pipeline)
    assert p.returncode == 2
    assert errors(p.stderr) == [
        f"error: {small}: shape 20x40, the model was trained on 31x95 maps (--resize scores it after resizing)"
    ]
    assert list(pd.read_csv(out)["path"]) == [str(good)]
    p = hdmap([*common, "--out", out, "--resize", good, small], tiny_pipeline)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "warning: 1 map(s) of shape 20x40, the model was trained on 31x95" in p.stderr
    assert list(pd.read_csv(out)["path"]) == [str(good), str(small)]


@pytest.mark.slow
def test_prepare_names_a_file_whose_name_is_not_utf8(tiny_pipeline, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(tiny_pipeline.data_root, work / "data" / "raw" / "synthetic")
    shutil.copytree(tiny_pipeline.root / "data" / "prepared", work / "data" / "prepared")
    shutil.copy(tiny_pipeline.params_file, work / "params.yaml")
    before = tree_digest(work / "data" / "prepared")
    folder = work / "data" / "raw" / "synthetic" / "domain_A" / "train" / "good"
    bad = os.path.join(os.fsencode(folder), b"map_\xff.tiff")
    shutil.copy(next(folder.glob("*.tif*")), bad)
    p = hdmap(["prepare"], tiny_pipeline, cwd=work)
    assert p.returncode == 2
    assert errors(p.stderr) == [
        "error: data/raw/synthetic/domain_A/train/good/map_\\xff.tiff: file name is not valid UTF-8; rename the file"
    ]
    assert tree_digest(work / "data" / "prepared") == before


def test_full_disk_while_saving_the_model_is_one_line_and_keeps_the_old_model(
    tiny_pipeline, tmp_path, monkeypatch, capsys
):
    import safetensors.torch

    from hdmap_ad.apps.cli import main
    from hdmap_ad.pipeline.training import MODEL_FILE, PENDING_DIR, STATE_FILE

    work = tmp_path / "work"
    shutil.copytree(tiny_pipeline.root / "data" / "prepared", work / "data" / "prepared")
    (work / MODEL_FILE).parent.mkdir(parents=True)
    shutil.copy(tiny_pipeline.checkpoint, work / MODEL_FILE)
    shutil.copy(tiny_pipeline.params_file, work / "params.yaml")
    old = (work / MODEL_FILE).read_bytes()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    real = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        if Path(filename).name.startswith(f".{MODEL_FILE.name}."):  # the model file; the resume state is written
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    capsys.readouterr()
    assert main(["train", "--set", "train.steps=6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    pending = PENDING_DIR / MODEL_FILE.name
    assert err[-1] == (
        f"error: {pending}: cannot write the checkpoint (No space left on device); {pending} was not written; "
        f"{MODEL_FILE} is unchanged and the training state is kept in {STATE_FILE}: once there is room, "
        "`dvc repro` (or `hdmap-ad train` with the same settings) continues from there without retraining"
    )
    assert (work / MODEL_FILE).read_bytes() == old
    assert [f.name for f in (work / MODEL_FILE).parent.rglob(".*")] == []  # no partial file left


def test_a_store_failure_after_training_keeps_everything_and_a_rerun_logs_it(
    tiny_pipeline, tmp_path, monkeypatch, capsys
):
    import mlflow
    import requests

    from hdmap_ad.apps.cli import main
    from hdmap_ad.pipeline import serving
    from hdmap_ad.pipeline.training import MODEL_FILE, PENDING_DIR, STATE_FILE, TRAIN_METRICS

    work = tmp_path / "work"
    for part in ("data/prepared", "models", "metrics"):
        shutil.copytree(tiny_pipeline.root / part, work / part)
    shutil.copy(tiny_pipeline.params_file, work / "params.yaml")
    monkeypatch.chdir(work)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = {f: (work / f).read_bytes() for f in (MODEL_FILE, TRAIN_METRICS)}
    real = serving.log_pyfunc_model

    def store_gone(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Connection refused")

    monkeypatch.setattr(serving, "log_pyfunc_model", store_gone)
    settings = ["--set", "train.steps=6", "--set", "runtime.resume=auto"]
    capsys.readouterr()
    assert main(["train", *settings]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"error: MLflow store {uri}: logging failed (connection refused); {MODEL_FILE} and {TRAIN_METRICS} are "
        f"unchanged (dvc.lock still describes them); the trained model and its metrics wait in {PENDING_DIR}/, the "
        f"training state in {STATE_FILE}: once the store works again, `dvc repro` (or `hdmap-ad train` with the "
        "same settings) continues from there and logs them without retraining"
    )
    assert {f: (work / f).read_bytes() for f in before} == before
    pending = (PENDING_DIR / MODEL_FILE.name).read_bytes()
    assert (PENDING_DIR / TRAIN_METRICS.name).is_file()
    run = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("hdmap-tiny-test").experiment_id]
    )[0]
    assert run.info.status == "FAILED"
    # the store is back: the same command resumes at the last step, logs, and publishes that model
    monkeypatch.setattr(serving, "log_pyfunc_model", real)
    assert main(["train", *settings]) == 0
    out = capsys.readouterr()
    assert "resuming from" in out.out + out.err and "at step 6/6" in out.out + out.err
    assert (work / MODEL_FILE).read_bytes() == pending
    assert mlflow.MlflowClient(uri).get_run(run.info.run_id).info.status == "FINISHED"
    assert json.loads((work / "models" / "run.json").read_text())["run_id"] == run.info.run_id
