"""Mixed precision on CPU (docs/design.md#dev-precision): what train.amp / evaluate.amp resolve to, bf16 autocast
sharing the CUDA code path, float32 where it matters (distances, cosine, loss, maps, blur, top-k), exact
resume under bf16, and bf16 inference of a float32 model against float32 inference. Tiny models only."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch

import shipped
import tiny
from hdmap_ad.core import checkpoint, runtime
from hdmap_ad.core.config import ScoreParams, load_params
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.model import anomaly_map, global_cosine_hm_loss, group_distances, image_score

TINY = [
    *tiny.MODEL,
    "train.steps=5",
    "train.batch_size=4",
    "runtime.log_every=1",
    "train.val_every=1000",
    "runtime.checkpoint_every=2",
    "train.warmup_steps=1",
    "evaluate.batch_size=16",
    "evaluate.n_examples=2",
    "runtime.device=cpu",
    "data.domains=[domain_A, domain_C]",
    "train.amp=auto",
    "evaluate.amp=auto",
]
CPU = torch.device("cpu")


def tiny_params(prepared_dir, *extra: str):
    return load_params(shipped.params_file(), [*TINY, f"data.prepared={prepared_dir}", *extra])


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


# --- what a setting resolves to ---------------------------------------------------------------------


def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.resolve_precision(CPU, "auto") == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.resolve_precision(CPU, "auto") == "off"
    assert runtime.resolve_precision(CPU, "bf16") == "bf16"  # asked for: emulated where not native
    assert runtime.resolve_precision(CPU, "off") == "off"
    with pytest.raises(HdmapError, match=r"evaluate.amp=fp16 is CUDA-only"):
        runtime.resolve_precision(CPU, "fp16", "evaluate.amp")
    assert isinstance(runtime.autocast(CPU, "auto"), type(runtime.autocast(CPU, "off")))  # float32: no autocast
    with runtime.autocast(CPU, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_native_bf16_detection_agrees_with_the_cpu_flags():
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
    if not flags:
        pytest.skip("no x86 flags in /proc/cpuinfo")
    assert runtime.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


# --- float32 where it matters -----------------------------------------------------------------------


def test_float32_terms_stay_float32_under_cpu_bf16_autocast():
    params = load_params(shipped.params_file(), TINY)
    torch.manual_seed(0)
    model, _ = checkpoint.build(params, ["domain_A"], CPU)
    images = torch.randn(2, 3, 28, 84)
    cfg = ScoreParams(size=(32, 32))
    with runtime.autocast(CPU, "bf16"):
        recon = model(images)
        assert recon.dec_groups[0].dtype == torch.bfloat16  # the matmuls did run in bf16
        dist = group_distances(recon)
        loss, info = global_cosine_hm_loss(recon, ratio=0.5)
        amap = anomaly_map(dist, (28, 84))
        score = image_score(amap, cfg)
    assert dist.dtype == loss.dtype == info["per_group"].dtype == amap.dtype == score.dtype == torch.float32
    assert torch.equal(score, image_score(amap, cfg))  # blur and top-k: the same as outside autocast
    loss.backward()
    assert all(
        p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())
        for p in model.trainable_parameters()
    )


# --- training and resume in bf16 --------------------------------------------------------------------


def test_bf16_training_is_finite_and_records_the_resolved_precision(workdir, prepared_dir, monkeypatch):
    from hdmap_ad.pipeline.training import MODEL_FILE, train

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)  # auto -> bf16, as on an AMX machine
    summary = train(tiny_params(prepared_dir, "runtime.resume=never"))
    bf16_state = checkpoint.load(MODEL_FILE)
    assert bf16_state["precision"] == "bf16" and bf16_state["config"]["train"]["amp"] == "auto"
    run = mlflow.MlflowClient().get_run(summary["run_id"])
    assert run.data.params["train.amp_resolved"] == "bf16" and run.data.params["train.amp"] == "auto"
    losses = [m.value for m in mlflow.MlflowClient().get_metric_history(summary["run_id"], "train_loss")]
    assert len(losses) == 5 and all(np.isfinite(losses)) and summary["bad_steps"] == 0
    assert all(np.isfinite(v) for v in summary["val"].values())

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)  # the same params elsewhere: float32
    train(tiny_params(prepared_dir, "runtime.resume=never"))
    fp32_state = checkpoint.load(MODEL_FILE)
    assert fp32_state["precision"] == "off"
    assert any(not torch.equal(bf16_state["model"][k], fp32_state["model"][k]) for k in fp32_state["model"])


def test_a_state_does_not_resume_at_another_resolved_precision(workdir, prepared_dir, monkeypatch, capsys):
    from hdmap_ad.pipeline.training import train

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    train(tiny_params(prepared_dir, "runtime.resume=auto"))
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    capsys.readouterr()
    train(tiny_params(prepared_dir, "runtime.resume=auto"))
    err = capsys.readouterr().err
    assert "precision: float32 (train.amp=auto on cpu)" in err
    assert "starting afresh" in err and "resuming from" not in err


# --- bf16 inference of a float32 model --------------------------------------------------------------


@pytest.mark.slow
def test_bf16_inference_of_a_float32_model_matches_float32(workdir, prepared_dir):
    from hdmap_ad.core.inference import score_maps
    from hdmap_ad.pipeline.data import PreparedData
    from hdmap_ad.pipeline.training import MODEL_FILE, train

    train(tiny_params(prepared_dir, "train.amp=off", "runtime.resume=never", "train.steps=20"))
    trained = checkpoint.load_trained(MODEL_FILE, CPU)
    prepared = PreparedData.load(prepared_dir)
    maps = np.concatenate([prepared.maps(d, split) for d in ("domain_A", "domain_C") for split in ("train", "test")])
    f32 = score_maps(trained.model, trained.method, maps, trained.params, CPU, 16, amp="off").scores
    b16 = score_maps(trained.model, trained.method, maps, trained.params, CPU, 16, amp="bf16").scores
    assert not np.array_equal(f32, b16)  # bf16 did run
    rel = np.abs(b16 - f32) / np.abs(f32)
    assert rel.max() <= 1e-2, rel.max()
    i, j = np.triu_indices(len(f32), k=1)
    same_order = np.sign(f32[i] - f32[j]) == np.sign(b16[i] - b16[j])
    assert same_order.mean() >= 0.99, same_order.mean()


def test_evaluate_reports_its_precision(workdir, prepared_dir, capsys):
    from hdmap_ad.pipeline import evaluation
    from hdmap_ad.pipeline.training import train

    params = tiny_params(prepared_dir, "train.amp=off", "runtime.resume=never", "train.steps=2", "evaluate.amp=bf16")
    summary = train(params)
    capsys.readouterr()
    result = evaluation.evaluate(params)
    assert (
        "inference precision: bf16 autocast (evaluate.amp=bf16 on cpu; trained at float32)" in capsys.readouterr().err
    )
    assert result["inference_precision"] == "bf16"
    assert json.loads((workdir / "metrics/eval_details.json").read_text())["inference_precision"] == "bf16"
    assert mlflow.MlflowClient().get_run(summary["run_id"]).data.tags["eval_precision"] == "bf16"
