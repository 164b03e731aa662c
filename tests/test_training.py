"""The training loop: batch order, health checks on NaN/Inf, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hdmap_ad.config import load_params
from hdmap_ad.errors import HdmapError
from hdmap_ad.methods.baseline import Baseline
from hdmap_ad.training import STATE_FILE, TRAIN_METRICS, batch_indices, train

REPO = Path(__file__).resolve().parents[1]
TINY = ["preprocess.resize=[28, 84]", "preprocess.crop=[28, 84]",
        "model.encoder_overrides={depth: 10, embed_dim: 32, num_heads: 2}",
        "train.steps=6", "train.batch_size=4", "train.log_every=1", "train.val_every=3",
        "train.checkpoint_every=1", "train.warmup_steps=2", "evaluate.batch_size=16"]


@pytest.fixture()
def workdir(tmp_path, monkeypatch, prepared_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def tiny_params(prepared_dir: Path, *extra: str):
    return load_params(REPO / "params.yaml", [*TINY, f"data.prepared={prepared_dir}", *extra])


def test_batches_are_shuffled_epochs_and_a_function_of_the_step():
    n, bs = 10, 4
    first_epoch = np.concatenate([batch_indices(n, bs, s, seed=1) for s in range(2)])
    assert len(set(first_epoch)) == 8  # without replacement, ragged tail dropped
    assert np.array_equal(batch_indices(n, bs, 5, seed=1), batch_indices(n, bs, 5, seed=1))
    assert not np.array_equal(batch_indices(n, bs, 2, seed=1), batch_indices(n, bs, 0, seed=1))
    assert not np.array_equal(batch_indices(n, bs, 0, seed=1), batch_indices(n, bs, 0, seed=2))


def test_same_seed_same_metrics(workdir, prepared_dir):
    a = train(tiny_params(prepared_dir, "train.resume=never"))
    b = train(tiny_params(prepared_dir, "train.resume=never"))
    assert a["val_mean_auroc"] == b["val_mean_auroc"] and a["thresholds"] == b["thresholds"]


def test_feature_cache_on_and_off_give_the_same_metrics(workdir, prepared_dir):
    # batch 3 does not divide the training maps: the cache's last chunk is a padded one
    on = train(tiny_params(prepared_dir, "train.resume=never", "train.feature_cache=on", "train.batch_size=3"))
    state_on = torch.load(workdir / "models/model.pt", weights_only=False)["model"]
    off = train(tiny_params(prepared_dir, "train.resume=never", "train.feature_cache=off", "train.batch_size=3"))
    state_off = torch.load(workdir / "models/model.pt", weights_only=False)["model"]
    assert on["val_mean_auroc"] == off["val_mean_auroc"] and on["thresholds"] == off["thresholds"]
    assert all(torch.equal(state_on[k], state_off[k]) for k in state_on)


def test_a_state_resumes_only_with_the_same_code(workdir, prepared_dir, monkeypatch, capsys):
    from hdmap_ad import training

    train(tiny_params(prepared_dir, "train.resume=auto"))
    capsys.readouterr()
    train(tiny_params(prepared_dir, "train.resume=auto"))
    assert "resuming from" in capsys.readouterr().err
    monkeypatch.setattr(training, "code_digest", lambda: "edited-code")
    train(tiny_params(prepared_dir, "train.resume=auto"))
    err = capsys.readouterr().err
    assert "different configuration, code or data; starting afresh" in err and "resuming from" not in err


def _nan_at(steps: set[int], monkeypatch) -> None:
    original = Baseline.loss

    def loss(self, recon, domain_ids, step):
        value, info = original(self, recon, domain_ids, step)
        return (value * float("nan") if step in steps else value), info

    monkeypatch.setattr(Baseline, "loss", loss)


def test_non_finite_steps_are_skipped_counted_and_logged(workdir, prepared_dir, monkeypatch):
    import mlflow

    _nan_at({2, 4}, monkeypatch)
    with pytest.warns(UserWarning, match="non-finite loss"):
        summary = train(tiny_params(prepared_dir))
    assert summary["bad_steps"] == 2
    history = mlflow.MlflowClient().get_metric_history(summary["run_id"], "train/bad_steps")
    assert max(m.value for m in history) == 2
    assert json.loads(TRAIN_METRICS.read_text())["bad_steps"] == 2


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(workdir, prepared_dir, monkeypatch):
    _nan_at({3, 4, 5}, monkeypatch)
    with pytest.warns(UserWarning), pytest.raises(HdmapError, match="3 non-finite steps in a row"):
        train(tiny_params(prepared_dir, "train.max_bad_steps=3"))
    state = torch.load(STATE_FILE, weights_only=False)
    assert state["step"] == 3  # saved after the last good update, never after a bad one
    assert all(torch.isfinite(v).all() for v in state["model"].values())
