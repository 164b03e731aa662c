"""The training loop: batch order, health checks on NaN/Inf, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from hdmap_ad.core import checkpoint
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.methods.baseline import Baseline
from hdmap_ad.pipeline.train_steps import batch_indices
from hdmap_ad.pipeline.training import STATE_FILE, TRAIN_METRICS, train

REPO = Path(__file__).resolve().parents[1]
TRAINING = [
    "train.steps=6",
    "runtime.log_every=1",
    "train.val_every=3",
    "runtime.checkpoint_every=1",
    "train.warmup_steps=2",
    "runtime.device=auto",
]


@pytest.fixture()
def workdir(tmp_path, monkeypatch, prepared_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def tiny_params(prepared_dir: Path, *extra: str):
    return tiny.params(*TRAINING, *extra, prepared=prepared_dir)


def test_batches_are_shuffled_epochs_and_a_function_of_the_step():
    n, bs = 10, 4
    first_epoch = np.concatenate([batch_indices(n, bs, s, seed=1) for s in range(2)])
    assert len(set(first_epoch)) == 8  # without replacement, ragged tail dropped
    assert np.array_equal(batch_indices(n, bs, 5, seed=1), batch_indices(n, bs, 5, seed=1))
    assert not np.array_equal(batch_indices(n, bs, 2, seed=1), batch_indices(n, bs, 0, seed=1))
    assert not np.array_equal(batch_indices(n, bs, 0, seed=1), batch_indices(n, bs, 0, seed=2))


def test_same_seed_same_metrics(workdir, prepared_dir):
    a = train(tiny_params(prepared_dir, "runtime.resume=never"))
    b = train(tiny_params(prepared_dir, "runtime.resume=never"))
    assert a["val"] == b["val"] and a["thresholds"] == b["thresholds"]


def test_feature_cache_on_and_off_give_the_same_metrics(workdir, prepared_dir):
    # batch 3 does not divide the training maps: the cache's last chunk is a padded one
    on = train(tiny_params(prepared_dir, "runtime.resume=never", "runtime.feature_cache=on", "train.batch_size=3"))
    state_on = checkpoint.load(workdir / "models/model.safetensors")["model"]
    off = train(tiny_params(prepared_dir, "runtime.resume=never", "runtime.feature_cache=off", "train.batch_size=3"))
    state_off = checkpoint.load(workdir / "models/model.safetensors")["model"]
    assert on["val"] == off["val"] and on["thresholds"] == off["thresholds"]
    assert all(torch.equal(state_on[k], state_off[k]) for k in state_on)


@pytest.mark.slow
def test_a_state_resumes_only_with_the_same_code(workdir, prepared_dir, monkeypatch, capsys):
    from hdmap_ad.pipeline import fingerprint

    train(tiny_params(prepared_dir, "runtime.resume=auto"))
    capsys.readouterr()
    train(tiny_params(prepared_dir, "runtime.resume=auto"))
    assert "resuming from" in capsys.readouterr().err
    monkeypatch.setattr(fingerprint, "code_digest", lambda: "edited-code")
    train(tiny_params(prepared_dir, "runtime.resume=auto"))
    err = capsys.readouterr().err
    assert "different configuration, code or data; starting afresh" in err and "resuming from" not in err


def test_a_state_under_its_old_name_is_renamed_and_resumed(workdir, prepared_dir, capsys):
    """models/train_state/last.pt (the state's name before the rename, same content) is taken over."""
    train(tiny_params(prepared_dir, "runtime.resume=auto"))
    assert STATE_FILE == Path("models/train_state/last.safetensors") and STATE_FILE.is_file()
    legacy = STATE_FILE.with_name("last.pt")
    STATE_FILE.rename(legacy)
    capsys.readouterr()
    train(tiny_params(prepared_dir, "runtime.resume=auto"))
    err = " ".join(capsys.readouterr().err.split())
    assert f"renamed {legacy} to {STATE_FILE}" in err and f"resuming from {STATE_FILE} at step 6/6" in err
    assert STATE_FILE.is_file() and not legacy.exists()


@pytest.mark.slow
def test_a_finished_state_with_other_score_settings_gets_a_run_of_its_own(workdir, prepared_dir, capsys):
    """Changing score.* keeps the weights (the state resumes at its last step) but changes what the run
    is compared by: the earlier run keeps its params and results, the new settings get a new run."""
    import mlflow

    first = train(tiny_params(prepared_dir, "runtime.resume=auto"))
    again = train(tiny_params(prepared_dir, "runtime.resume=auto"))
    assert again["run_id"] == first["run_id"]  # same settings: the same run
    capsys.readouterr()
    other = train(tiny_params(prepared_dir, "runtime.resume=auto", "score.top_ratio=0.05"))
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines where the console is not a terminal
    assert "resuming from" in err and "into a new MLflow run" in err
    assert other["run_id"] != first["run_id"]
    client = mlflow.MlflowClient()
    old, new = client.get_run(first["run_id"]), client.get_run(other["run_id"])
    assert old.data.params["score.top_ratio"] == "0.01" and new.data.params["score.top_ratio"] == "0.05"
    assert old.data.tags["comparison_key"] != new.data.tags["comparison_key"]
    assert new.data.tags["resumed_from_run"] == first["run_id"]


def _nan_at(steps: set[int], monkeypatch) -> None:
    original = Baseline.loss

    def loss(self, recon, domain_ids, step):
        value, info = original(self, recon, domain_ids, step)
        return (value * float("nan") if step in steps else value), info

    monkeypatch.setattr(Baseline, "loss", loss)


def test_non_finite_steps_are_skipped_counted_and_logged(workdir, prepared_dir, monkeypatch, capsys):
    import mlflow

    _nan_at({2, 4}, monkeypatch)
    with pytest.warns(UserWarning, match="non-finite loss"):
        summary = train(tiny_params(prepared_dir))
    assert summary["bad_steps"] == 2
    history = mlflow.MlflowClient().get_metric_history(summary["run_id"], "train_bad_steps")
    assert max(m.value for m in history) == 2
    written = json.loads(TRAIN_METRICS.read_text())
    assert written["bad_steps"] == 2
    # train.json is what people compare: no run id, no thresholds; validation AUROC in percent
    assert set(written) == {"steps", "bad_steps", "val_auroc"}
    assert written["val_auroc"]["mean"] == pytest.approx(100 * summary["val"]["val_auroc/mean"], abs=0.005 + 1e-9)
    val_history = mlflow.MlflowClient().get_metric_history(summary["run_id"], "val_auroc/mean")
    assert [m.step for m in val_history] == [3, 6]
    # plain logs: one line per validation (per domain and mean), progress lines with rate and ETA
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("validation @ ")]
    assert [line.split(":")[0] for line in lines] == ["validation @ 3/6", "validation @ 6/6"]
    assert all("domain_A" in line and "domain_D" in line and "mean" in line for line in lines)
    assert "it/s" in err and "ETA" in err


def test_plain_progress_lines_give_rate_and_eta(monkeypatch, capsys):
    from hdmap_ad.core import runtime

    times = [100.0, 100.0, 110.0]  # created and entered at t=100; 5 steps done 10 s later
    monkeypatch.setattr(runtime.StepProgress, "clock", staticmethod(lambda: times.pop(0)))
    with runtime.StepProgress(25, "train x", every=5, start=10) as bar:
        assert not bar.interactive
        bar.update(5, "loss 0.5")
    line = capsys.readouterr().err.strip()
    assert line == "train x 15/25 loss 0.5 | 2.00 s/it, elapsed 0:10, ETA 0:20"


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(workdir, prepared_dir, monkeypatch):
    _nan_at({3, 4, 5}, monkeypatch)
    with pytest.warns(UserWarning), pytest.raises(HdmapError, match="3 non-finite steps in a row"):
        train(tiny_params(prepared_dir, "train.max_bad_steps=3"))
    state = checkpoint.load(STATE_FILE)
    assert state["step"] == 3  # saved after the last good update, never after a bad one
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.slow
def test_settings_are_params_and_curves_sort_below_the_headline_metrics(workdir, prepared_dir):
    """Tiny focal and fixed-weight scale runs: focal's γ and the normalised scale weights are the runs' params,
    not metrics; the metrics are the validation section (`val_auroc/…`) and slash-free training curves, which
    the MLflow chart view puts after every named section (its default section comes last)."""
    import mlflow

    focal_id = train(tiny_params(prepared_dir, "method=focal", "focal.gamma=2.5"))["run_id"]
    scale_id = train(tiny_params(prepared_dir, "method=scale", "scale.learnable=false", "scale.weights=[1,3]"))[
        "run_id"
    ]
    client = mlflow.MlflowClient()  # after training: it set this test's store as the tracking URI
    focal, scale = client.get_run(focal_id).data, client.get_run(scale_id).data
    assert focal.params["focal.gamma"] == "2.5"
    assert float(scale.params["scale.alpha_0"]) == pytest.approx(0.25)
    assert float(scale.params["scale.alpha_1"]) == pytest.approx(0.75)
    for data in (focal, scale):
        assert not [k for k in data.metrics if "gamma" in k or "alpha" in k]  # constants are no curves
        assert {"train_loss", "train_grad_total_norm", "train_hard_mining_threshold", "val_auroc/mean"} - {
            "train_hard_mining_threshold" if data is focal else ""
        } <= set(data.metrics)
        sections = {k.rsplit("/", 1)[0] for k in data.metrics if "/" in k}
        assert sections == {"val_auroc"}  # every other metric is in MLflow's default section, shown last
    assert {"train_focal_loss_0", "train_focal_loss_1"} <= set(focal.metrics)


def test_a_params_file_caught_mid_rewrite_stops_the_run_as_changed(tmp_path):
    """train re-reads params.yaml at each checkpoint while another `dvc exp run` may be rewriting it: a file
    caught half written (cut anywhere) must stop the run with the one "changed while in progress" line, never
    with a YAML or validation error that hides the reason."""
    import shipped
    from hdmap_ad.core.config import load_params
    from hdmap_ad.pipeline.fingerprint import check_config_unchanged

    text = shipped.text("params.yaml")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(text)
    params = load_params(params_file)
    expected = tmp_path / "train_config.json"
    expected.write_text(json.dumps(params.training_config()))
    check_config_unchanged(params, expected, params_file)  # unchanged: no error
    stopped = 0
    for cut in np.linspace(0, len(text) - 1, 41).astype(int):
        params_file.write_text(text[:cut])
        try:
            check_config_unchanged(params, expected, params_file)
        except HdmapError as err:
            assert "params.yaml changed while this run was in progress" in str(err), (cut, str(err))
            stopped += 1
    assert stopped >= 35  # most cuts lose a training setting or break the YAML
