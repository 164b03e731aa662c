"""`hdmap-ad bench` and the exactness of the encoder-feature cache.

The smoke test runs the real command (each phase in its own subprocess) on a tiny encoder. The
cache tests train the same seed with `runtime.feature_cache` on and off through
`training.train_step` (the step the training loop and the benchmark run) and compare loss
trajectories and weights; tests/test_training.py does the same through `train()` and its metrics.

What holds on CPU (float32, MKL/oneDNN GEMMs): a sample's encoder features depend on the *size*
of the batch it is encoded in (the GEMM kernel and blocking are chosen by the row count B·T), but
not on its batch mates nor on its position in the batch (`test_features_depend_on_batch_size_only`).
`features.Cached` therefore encodes every chunk at the training batch size, padding the ragged
last chunk, which makes cache on and cache off bitwise equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import shipped
import tiny
from hdmap_ad.apps.bench import ours
from hdmap_ad.apps.cli import main
from hdmap_ad.apps.gpucheck.report import bench_summary
from hdmap_ad.core.config import load_params
from hdmap_ad.core.features import make_feature_source

REPO = Path(__file__).resolve().parents[1]
PARAMS = shipped.params_file()
TINY = f"model.encoder_overrides={json.dumps(tiny.ENCODER)}"
CPU = torch.device("cpu")


@pytest.mark.slow
def test_bench_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "--params",
            str(PARAMS),
            "--set",
            TINY,
            "--size",
            "28x84",
            "--batch",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--no-anomalib",
            "--device",
            "cpu",
            "--precision",
            "float32,bf16",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert {"command", "device", "threads", "settings", "matmul_peak", "cases", "paper_cache", "notes"} <= set(result)
    assert result["command"].startswith("hdmap-ad bench") and result["anomalib"] is None
    assert "--precision float32,bf16" in result["command"]
    assert result["matmul_peak"]["gflops"] > 0
    peaks = result["matmul_peaks"]
    assert peaks["float32"]["dtype"] == "float32" and peaks["bf16"]["dtype"] == "bf16" and peaks["bf16"]["gflops"] > 0
    case, bf16 = result["cases"]
    assert (case["precision"], bf16["precision"]) == ("float32", "bf16")
    # "% peak" is against the matmul peak of the case's own precision
    m = bf16["phases"]["ours_infer"]
    assert m["pct_of_matmul_peak"] == pytest.approx(100 * m["gflops_achieved"] / peaks["bf16"]["gflops"])
    assert {(r["phase"], r["precision"]) for r in result["precision_speedups"]} == {
        (ph, "bf16") for ph in ("ours_train_cache_on", "ours_train_cache_off", "ours_infer")
    }
    assert case["crop"] == [28, 84] and case["batch"] == 2 and case["tokens_per_image"] == 5 + 2 * 6
    assert set(case["phases"]) == {"ours_train_cache_on", "ours_train_cache_off", "ours_infer"}
    for name, m in case["phases"].items():
        for key in ("images_per_s", "ms_per_image", "step_s", "flops_per_image", "gflops_achieved", "peak_rss_mb"):
            assert m[key] > 0, (name, key, m[key])
        assert m["peak_mb"] >= 0 and len(m["steps_s"]) == 2
    assert case["phases"]["ours_train_cache_on"]["feature_cache"] == "on"
    assert case["phases"]["ours_train_cache_off"]["feature_cache"] == "off"
    assert case["phases"]["ours_train_cache_on"]["cache_mb"] > 0
    # cache-on steps skip the encoder: fewer FLOPs per image than cache-off steps
    assert (
        case["phases"]["ours_train_cache_on"]["flops_per_image"]
        < case["phases"]["ours_train_cache_off"]["flops_per_image"]
    )
    # gpu-check's report reads this result: one row per case and phase, % peak against the same precision
    summary = bench_summary(result)
    assert len(summary["rows"]) == 6 and summary["matmul_peak_gflops"]["bf16"] == peaks["bf16"]["gflops"]
    row = next(r for r in summary["rows"] if (r["precision"], r["phase"]) == ("bf16", "ours_infer"))
    assert row["pct_of_matmul_peak"] == bf16["phases"]["ours_infer"]["pct_of_matmul_peak"]
    assert all(v is None for v in case["ratios"].values())  # no anomalib, no ratios
    paper = result["paper_cache"]
    assert paper["n_maps"] == 4000 and paper["crop"] == [392, 392]
    # ViT-B/14 at 392²: (5 + 784 + 2·784) tokens × 768 channels per map
    assert paper["cpu_gib"] == pytest.approx(4000 * (789 + 2 * 784) * 768 * 4 / 2**30)
    assert paper["cuda_gib"] == pytest.approx(paper["cpu_gib"] / 2)


def _spec(crop: tuple[int, int], batch: int, overrides: dict | None = None) -> dict:
    params = load_params(PARAMS, [f"model.encoder_overrides={json.dumps(overrides or {})}"])
    return {
        "resolved": params.resolved(),
        "device": "cpu",
        "threads": 0,
        "compile": False,
        "raw_size": [31, 95],
        "case": {"crop": list(crop), "resize": [crop[0] + 14, crop[1] + 14], "batch": batch, "encoder": "small"},
    }


def _trajectory(spec: dict, cache: str, n_maps: int, steps: int) -> tuple[list[float], list[torch.Tensor]]:
    params = ours.params_for(spec, feature_cache=cache)
    model, method, optimizer = ours.build_ours(params, CPU)
    model.train()
    method.train()
    features = make_feature_source(model, ours.synthetic_maps(n_maps, spec), params, CPU)
    assert features.describe() == cache
    step = ours.ours_train_step(model, method, optimizer, features, params, CPU, n_maps)
    losses = [step(i) for i in range(steps)]
    return losses, [p.detach().clone() for p in model.trainable_parameters()]


@pytest.mark.slow  # ViT-S shapes, 47 s; the fast loop checks the same promise with the tiny encoder
# (tests/test_training.py::test_feature_cache_on_and_off_give_the_same_metrics)
def test_cache_is_bitwise_exact_when_the_batch_size_divides_the_maps():
    spec = _spec((56, 196), batch=4)  # ViT-S/14 shapes of the quick profile, random weights
    on, p_on = _trajectory(spec, "on", n_maps=8, steps=6)
    off, p_off = _trajectory(spec, "off", n_maps=8, steps=6)
    assert on == off
    assert all(torch.equal(a, b) for a, b in zip(p_on, p_off))


@pytest.mark.slow
def test_cache_with_a_ragged_tail_is_bitwise_exact():
    # 7 maps, batch 4: the last chunk (3 maps) is padded to 4 for encoding; training batches of 4
    # mix maps from both chunks over the epochs.
    spec = _spec((56, 196), batch=4)
    on, p_on = _trajectory(spec, "on", n_maps=7, steps=8)
    off, p_off = _trajectory(spec, "off", n_maps=7, steps=8)
    assert on == off
    assert all(torch.equal(a, b) for a, b in zip(p_on, p_off))


def test_features_depend_on_batch_size_only():
    """At a fixed batch size, a sample's features are the same whatever its batch mates and position."""
    from hdmap_ad.core.model import Dinomaly, DinomalyConfig
    from hdmap_ad.core.preprocess import preprocess

    torch.manual_seed(0)
    model = Dinomaly(DinomalyConfig(encoder="small", image_size=(56, 196))).eval()
    x = preprocess(
        torch.from_numpy(np.random.default_rng(0).random((16, 31, 95), dtype=np.float32)), (70, 210), (56, 196)
    )
    b = 4
    ref = model.encode(x[:b])
    for pos in range(b):
        idx = list(range(8, 8 + b))
        idx[pos] = 0
        got = model.encode(x[idx])
        assert torch.equal(got.bottleneck_in[pos], ref.bottleneck_in[0])
        assert all(torch.equal(g[pos], r[0]) for g, r in zip(got.groups, ref.groups))
