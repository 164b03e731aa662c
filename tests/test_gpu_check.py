"""`hdmap-ad gpu-check` on the CPU at tiny shapes: the same parts it runs on a GPU (training at two
precisions with the feature cache on and off, evaluate, predict, the pyfunc model, an interrupted and
resumed run), each in its own process, and its report. The benchmark part is `hdmap-ad bench`, which
tests/test_bench.py runs; here it is left out (`--no-bench`) to keep the suite short."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import shipped
from hdmap_ad.apps.cli import main
from hdmap_ad.apps.gpucheck.report import agreement, metrics_parity


@pytest.mark.slow
def test_gpu_check_runs_every_part_on_cpu_and_reports(tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["gpu-check", "--params", str(shipped.params_file()), "--device", "cpu", "--no-bench", "--out", str(out)])
    assert rc == 0, capsys.readouterr().out
    report = json.loads((out / "gpu-check.json").read_text())
    checks = {c["check"]: c for c in report["checks"]}
    assert all(c["ok"] for c in checks.values()), checks
    assert {
        "train + evaluate, bf16",
        "train + evaluate, float32",
        "resume (bf16)",
        "MLflow pyfunc model = evaluate",
        "predict = evaluate (bf16-trained model, float32 inference)",
    } <= set(checks)

    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) == {"bf16", "float32"} and report["skipped"] == ["fp16 + GradScaler: fp16 autocast is CUDA-only"]
    assert runs["bf16"]["precision_resolved"] == "bf16" and runs["float32"]["precision_resolved"] == "off"
    assert runs["bf16"]["feature_cache"].startswith("on") and runs["float32"]["feature_cache"].startswith("off")
    for r in runs.values():
        assert r["images_per_s"] > 0 and r["train_memory"]["peak_rss_mb"] > 0 and r["bad_steps"] == 0
        assert r["inference_precision"] == "off"
    # the two precisions trained different weights, and the report puts their metrics side by side
    parity = {(p["metric"], p["domain"]): p for p in report["parity"]}
    assert parity[("auroc", "mean")]["float32"] == runs["float32"]["metrics"]["mean"]["auroc"]
    assert parity[("auroc", "mean")]["bf16"] == runs["bf16"]["metrics"]["mean"]["auroc"]

    # resume on CPU is exact; predict and the served model give evaluate's scores
    assert (
        report["resume"]["identical"] and report["resume"]["state_step"] == report["resume"]["stopped_before_step"] - 1
    )
    assert report["predict"]["same"]["max_rel_diff"] == 0.0 and report["pyfunc"]["max_rel_diff"] == 0.0
    assert report["predict"]["same"]["n"] == report["pyfunc"]["n"] == 8  # 4 good + 4 fault test maps
    bf16 = report["predict"]["bf16 inference"]
    assert 0 < bf16["max_rel_diff"] < 0.05  # bf16 inference did run, and is close
    assert report["bench"] is None and report["command"].endswith(f"--no-bench --out {out}")

    md = (out / "gpu-check.md").read_text()
    for section in ("## Checks", "## Training runs", "## Metrics by training precision", "## Inference, resume"):
        assert section in md
    assert "| resume (bf16) | yes |" in md


def test_agreement_counts_reordered_pairs_and_relative_differences():
    ref = pd.Series([1.0, 2.0, 3.0, 4.0], index=list("abcd"))
    other = pd.Series([1.0, 2.2, 2.1, 4.0, 9.0], index=list("abcde"))  # b and c swap order; e is not in ref
    a = agreement(ref, other)
    assert a["n"] == 4
    assert a["max_rel_diff"] == pytest.approx(0.9 / 3.0)  # c: 3.0 -> 2.1
    assert a["pairs_same_order"] == pytest.approx(5 / 6)  # one of the 6 pairs reversed


def test_metrics_parity_is_each_precision_against_float32():
    runs = [
        {"name": "float32", "metrics": {"domain_A": {"auroc": 70.0, "pixel_auroc": 60.0}}},
        {"name": "bf16", "metrics": {"domain_A": {"auroc": 70.5, "pixel_auroc": 59.0}}},
    ]
    rows = {(r["metric"], r["domain"]): r for r in metrics_parity(runs)}
    assert rows[("auroc", "domain_A")]["bf16 - float32"] == pytest.approx(0.5)
    assert rows[("pixel_auroc", "domain_A")]["bf16 - float32"] == pytest.approx(-1.0)


@pytest.mark.slow
def test_a_failing_part_is_a_failed_check_and_the_report_is_still_written(tmp_path):
    out = tmp_path / "report"
    missing = tmp_path / "no-such-weights.safetensors"
    rc = main(
        [
            "gpu-check",
            "--params",
            str(shipped.params_file()),
            "--device",
            "cpu",
            "--no-bench",
            "--weights",
            str(missing),
            "--out",
            str(out),
        ]
    )
    assert rc == 1
    report = json.loads((out / "gpu-check.json").read_text())
    failed = [c for c in report["checks"] if not c["ok"]]
    assert [c["check"] for c in failed] == ["train + evaluate, bf16", "train + evaluate, float32"]
    assert all(str(missing.name) in c["detail"] for c in failed)  # the cause, from the part's log
    assert report["runs"] == [] and report["resume"] is None and report["predict"] is None
    assert "**NO**" in (out / "gpu-check.md").read_text()
