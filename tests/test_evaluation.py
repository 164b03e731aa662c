"""The evaluate stage's outputs as people read them: eval.json (headline metrics in percent), the
details beside it, the MLflow metric names and dataset input, the DVC plot data, `hdmap-ad show`, and
outputs that survive a failed evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import shipped
import tiny
from hdmap_ad.apps.cli import main
from hdmap_ad.core.config import load_params
from hdmap_ad.pipeline import evaluation, plots, training
from hdmap_ad.pipeline.data import PreparedData
from hdmap_ad.pipeline.metrics import image_metrics, summarise

DOMAINS = ["domain_A", "domain_B", "domain_C", "domain_D"]
HEADLINE = {"auroc", "ap", "f1_max", "tpr_at_fpr_1", "tpr_at_fpr_5", "pixel_auroc"}
SETTINGS = [
    "method=baseline",
    "seed=3",
    "profile=quick",
    "preprocess.resize=[32, 96]",
    "train.val_every=2",
    "runtime.checkpoint_every=4",
    "train.amp=off",
    "runtime.resume=never",
    "evaluate.n_examples=8",
    "mlflow.experiment=eval-test",
    "mlflow.tracking_uri=null",
]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, prepared_dir):
    """One tiny model trained and evaluated over the four domains (masks present); tests read its outputs."""
    root = tmp_path_factory.mktemp("evaluated")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("DVC_ROOT", str(root))
        params = tiny.params(*SETTINGS, f"data.domains={DOMAINS}", prepared=prepared_dir)
        summary = training.train(params)
        evaluation.evaluate(params)
    return root, params, summary


@pytest.mark.parametrize("method", ["gem", "scale", "topk"])
def test_every_method_trains_and_evaluates(tmp_path, monkeypatch, prepared_dir, method):
    """The methods tests/test_pipeline.py does not run through DVC: trained, evaluated and recorded as themselves."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    params = tiny.params(*SETTINGS, f"method={method}", "data.domains=[domain_A, domain_C]", prepared=prepared_dir)
    summary = training.train(params)
    evaluation.evaluate(params)
    headline = _read(tmp_path, "metrics/eval.json")
    assert all(0.0 <= headline[d]["auroc"] <= 100.0 for d in ("domain_A", "domain_C", "mean"))
    run = mlflow.MlflowClient().get_run(summary["run_id"])
    assert run.data.tags["method"] == method and run.data.tags["evaluated"] == "true"
    assert run.data.params["method"] == method


@pytest.fixture()
def inside(evaluated, monkeypatch):
    root, params, summary = evaluated
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(root))
    return root, params, summary


def _read(root: Path, name: str):
    return json.loads((root / name).read_text())


def test_eval_json_holds_only_the_headline_metrics_in_percent(inside):
    root, _, _ = inside
    headline, details = _read(root, "metrics/eval.json"), _read(root, "metrics/eval_details.json")
    assert list(headline) == [*DOMAINS, "mean", "pooled"]
    for scope, values in headline.items():
        assert {"auroc", "ap", "f1_max", "tpr_at_fpr_1", "tpr_at_fpr_5"} <= set(values) <= HEADLINE, scope
        for key, value in values.items():
            assert isinstance(value, float) and 0.0 <= value <= 100.0 and round(value, 2) == value, (scope, key)
            assert value == pytest.approx(100 * details[scope][key], abs=0.005 + 1e-9), (scope, key)
    assert "pixel_auroc" in headline["domain_A"] and "pixel_auroc" not in headline["pooled"]


def test_eval_details_hold_counts_thresholds_and_validity(inside):
    root, _, _ = inside
    details = _read(root, "metrics/eval_details.json")
    for key in ("tp", "fp", "tn", "fn", "threshold", "valid", "n_good", "n_fault", "precision", "threshold_note"):
        assert key in details["domain_A"], key
    assert details["domain_A"]["n_good"] == 6 and details["domain_A"]["valid"] is True
    assert 0.0 <= details["mean"]["auroc"] <= 1.0  # fractions here, like the numbers logged to MLflow


def test_train_json_holds_steps_and_validation_auroc_only(inside):
    root, _, summary = inside
    train_json = _read(root, "metrics/train.json")
    assert set(train_json) == {"steps", "bad_steps", "val_auroc"}
    assert list(train_json["val_auroc"]) == [*DOMAINS, "mean"]
    assert train_json["val_auroc"]["mean"] == pytest.approx(100 * summary["val"]["val_auroc/mean"], abs=0.005 + 1e-9)
    assert summary["run_id"]  # the CLI prints it


def test_mlflow_metrics_group_by_metric_and_the_run_records_its_dataset(inside, prepared_dir):
    import mlflow

    root, params, summary = inside
    details = _read(root, "metrics/eval_details.json")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    run = mlflow.MlflowClient().get_run(summary["run_id"])
    metrics = run.data.metrics
    assert metrics["test_auroc/domain_A"] == pytest.approx(details["domain_A"]["auroc"], abs=1e-12)
    assert metrics["test_tpr_at_fpr_1/mean"] == pytest.approx(details["mean"]["tpr_at_fpr_1"], abs=1e-12)
    assert "test_pixel_auroc/domain_C" in metrics and "val_auroc/mean" in metrics and "val_auroc/domain_D" in metrics
    tested = {k for k in metrics if k.startswith("test")}
    assert all(k.split("/")[0][len("test_") :] in HEADLINE for k in tested), sorted(tested)
    assert len(tested) == 6 * 4 + 6 + 5  # per domain, mean, pooled (no pixel AUROC pooled)
    assert not [k for k in metrics if k.startswith(("test/", "val/"))]
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == PreparedData.load(prepared_dir).data_digest()
    assert dataset_input.dataset.name == str(params.data_root)


def test_dvc_roc_data_has_one_tpr_column_per_domain(inside):
    root, _, _ = inside
    roc = pd.read_csv(root / "plots/data/roc.csv")
    assert list(roc.columns) == ["fpr", *DOMAINS]
    assert roc["fpr"].is_monotonic_increasing and roc["fpr"].iloc[0] == 0 and roc["fpr"].iloc[-1] == 1
    for d in DOMAINS:
        assert roc[d].is_monotonic_increasing and roc[d].iloc[-1] == 1
    points = pd.read_csv(root / "plots/data/roc_points.csv")
    assert list(points.columns) == ["domain", "fpr", "tpr", "threshold"] and set(points["domain"]) == set(DOMAINS)
    assert sorted(p.name for p in (root / "plots").iterdir()) == [
        "data",
        "examples.png",
        "roc.png",
        "score_distributions.png",
    ]


def test_a_failed_evaluate_leaves_the_previous_outputs(inside, monkeypatch):
    root, params, _ = inside
    files = [
        "metrics/eval.json",
        "metrics/eval_details.json",
        "metrics/scores.csv",
        "plots/examples.png",
        "plots/data/roc.csv",
    ]
    before = {f: (root / f).read_bytes() for f in files}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "plot_examples", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        evaluation.evaluate(params)
    assert {f: (root / f).read_bytes() for f in files} == before
    assert not [p.name for p in root.iterdir() if p.name.startswith(".plots")]


def test_show_reads_eval_json_and_its_details(inside, capsys):
    root, _, _ = inside
    assert main(["show", str(root / "metrics/eval.json")]) == 0
    out = capsys.readouterr().out
    assert "domain_D" in out and "pooled" in out and "6/6" in out  # the counts come from eval_details.json
    headline = _read(root, "metrics/eval.json")
    assert f"{headline['mean']['auroc']:.2f}" in out


def test_show_names_a_missing_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["show", "missing.json"]) == 2
    assert capsys.readouterr().err.strip() == "error: missing.json: file not found"
    assert main(["show"]) == 2
    assert capsys.readouterr().err.strip() == "error: metrics/eval.json: no evaluation yet (run `dvc repro`)"


def test_invalid_domain_and_mean_are_null_in_eval_json_and_not_logged():
    labels = np.array([0, 0, 0, 1, 1, 1])
    good = image_metrics(labels, np.array([0.1, 0.2, 0.3, 0.5, 0.6, 0.25]))
    bad = image_metrics(labels, np.array([0.1, np.nan, 0.3, 0.5, 0.6, 0.7]))
    result = summarise(
        {"domain_A": good, "domain_B": bad}, image_metrics(labels, np.array([0.1, 0.2, 0.3, 0.5, 0.6, 0.7]))
    )
    headline = evaluation.headline(result)
    assert headline["domain_A"]["auroc"] == round(100 * good["auroc"], 2)
    assert all(v is None for v in headline["domain_B"].values())
    assert all(v is None for v in headline["mean"].values())  # a mean over fewer domains is not comparable
    logged = evaluation.metric_items(result)
    assert "test_auroc/domain_A" in logged and "test_auroc/pooled" in logged
    assert not [k for k in logged if k.endswith(("/domain_B", "/mean"))]
    assert all(math.isfinite(v) for v in logged.values())
    table = evaluation.metrics_table(headline, "t", result)
    assert table.row_count == 4


def test_masks_are_resized_nearest_neighbour_by_hand():
    """A 1×3 mask [0, 1, 0] brought to 14 columns: nearest takes column j from source floor(3j/14), so columns
    5..9 are fault; bilinear-then-threshold (the former form) gives 5..8 only (column 9 interpolates to 0.46)."""
    import torch
    import torch.nn.functional as F

    params = load_params(
        shipped.params_file(), ["preprocess.resize=[14, 14]", "preprocess.crop=[14, 14]", "score.size=[14, 14]"]
    )
    grid = evaluation.masks_to_score_grid(np.array([[[0, 1, 0]]], dtype=np.uint8), params)
    expected_row = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=np.uint8)
    assert grid.shape == (1, 14, 14) and grid.dtype == np.uint8
    assert (grid[0] == expected_row).all()
    bilinear = F.interpolate(torch.tensor([[[[0.0, 1.0, 0.0]]]]), size=(14, 14), mode="bilinear", align_corners=False)
    assert ((bilinear[0, 0, 0] >= 0.5).numpy() != expected_row).sum() == 1  # the two forms differ here


def test_pixel_auroc_is_taken_on_the_blurred_maps(inside):
    """eval_details' pixel AUROC is that of the score's blurred maps against nearest-resized masks, and differs
    from the one on the unblurred maps (so the blur is not a no-op here)."""
    import torch

    from hdmap_ad.core import checkpoint
    from hdmap_ad.core.inference import score_maps
    from hdmap_ad.core.model import gaussian_blur
    from hdmap_ad.pipeline.metrics import pixel_auroc

    root, params, _ = inside
    details = _read(root, "metrics/eval_details.json")
    trained = checkpoint.load_trained(root / "models/model.safetensors", torch.device("cpu"))
    prepared = PreparedData.load(Path(params.data.prepared))
    domain = "domain_A"
    scored = score_maps(
        trained.model,
        trained.method,
        prepared.maps(domain, "test"),
        trained.params,
        torch.device("cpu"),
        16,
        keep_maps=True,
        domain_id=0,
    )
    masks = evaluation.masks_to_score_grid(prepared.masks(domain), params)
    blurred = gaussian_blur(torch.from_numpy(scored.maps)[:, None], params.score.blur_kernel, params.score.blur_sigma)[
        :, 0
    ].numpy()
    assert details[domain]["pixel_auroc"] == pytest.approx(pixel_auroc(masks, blurred), abs=1e-12)
    assert abs(pixel_auroc(masks, scored.maps) - pixel_auroc(masks, blurred)) > 1e-4
