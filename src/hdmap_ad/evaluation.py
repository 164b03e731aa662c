"""The evaluate stage: score every test map per domain, write metrics, scores, plots; log to MLflow."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from rich.table import Table

from hdmap_ad import checkpoint, plots, tracking
from hdmap_ad.config import Params
from hdmap_ad.data import PreparedData
from hdmap_ad.errors import HdmapError
from hdmap_ad.files import write_json, write_text
from hdmap_ad.inference import score_maps
from hdmap_ad.metrics import image_metrics, pixel_auroc, roc_points_table, summarise
from hdmap_ad.runtime import console, select_device, set_threads
from hdmap_ad.training import MODEL_FILE

EVAL_FILE = Path("metrics/eval.json")
SCORES_FILE = Path("metrics/scores.csv")
PLOTS_DIR = Path("plots")
TABLE_COLUMNS = [("auroc", "AUROC"), ("ap", "AP"), ("f1_max", "F1-max"), ("tpr_at_fpr_1", "TPR@FPR1%"),
                 ("tpr_at_fpr_5", "TPR@FPR5%"), ("pixel_auroc", "pixel AUROC")]


def masks_to_score_grid(masks: np.ndarray, params: Params) -> np.ndarray:
    """Bring pixel masks through the same geometry as the maps (resize, crop, score size)."""
    t = torch.from_numpy(np.asarray(masks, dtype=np.float32))[:, None]
    t = F.interpolate(t, size=tuple(params.preprocess.resize), mode="bilinear", align_corners=False)
    (h, w), (ch, cw) = params.preprocess.resize, params.preprocess.crop
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    t = t[..., top:top + ch, left:left + cw]
    t = F.interpolate(t, size=tuple(params.score.size), mode="bilinear", align_corners=False)
    return (t[:, 0] >= 0.5).numpy().astype(np.uint8)


def metrics_table(result: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    table.add_column("domain")
    for _, label in TABLE_COLUMNS:
        table.add_column(label, justify="right")
    table.add_column("good/fault", justify="right")
    for name, m in result.items():
        if not isinstance(m, dict):
            continue
        if m.get("valid") is False:
            table.add_row(name, *["[red]invalid[/]"] * len(TABLE_COLUMNS), f"bad scores: {m.get('n_bad_scores', '?')}")
            continue
        cells = [("—" if m.get(k) is None else f"{100 * m[k]:.2f}") for k, _ in TABLE_COLUMNS]
        counts = f"{m.get('n_good', '')}/{m.get('n_fault', '')}" if "n_good" in m else ""
        table.add_row(name, *cells, counts)
    return table


def _pick_examples(domain: str, labels: np.ndarray, scores: np.ndarray, k: int) -> list[int]:
    """The most suspicious good map and the median-scored faulty map: what a reviewer looks at first."""
    order = []
    good, fault = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    if len(good):
        order.append(int(good[np.argmax(scores[good])]))
    if len(fault):
        order.append(int(fault[np.argsort(scores[fault])[len(fault) // 2]]))
    return order[:k]


def evaluate(params: Params) -> dict[str, Any]:
    set_threads(params.train.num_threads)
    device = select_device(params.train.device)
    trained = checkpoint.load_trained(MODEL_FILE, device)
    prepared = PreparedData.load(Path(params.data.prepared))
    missing = [d for d in trained.domains if d not in prepared.domains]
    if missing:
        raise HdmapError(f"{params.data.prepared}: no test data for {', '.join(missing)} that the model was trained on")
    # Scoring must follow the trained model's preprocessing; score settings may be changed at evaluation.
    run_params = trained.params.model_copy(update={"score": params.score, "evaluate": params.evaluate})

    per_domain, rows, curves, dists, examples = {}, [], {}, {}, []
    all_labels, all_scores = [], []
    per_example = max(1, params.evaluate.n_examples // max(1, len(trained.domains)))
    for i, domain in enumerate(trained.domains):
        maps = prepared.maps(domain, "test")
        labels = np.asarray(prepared.labels(domain, "test"))
        masks = prepared.masks(domain)
        scored = score_maps(trained.model, trained.method, maps, run_params, device, params.evaluate.batch_size,
                            keep_maps=True, domain_id=i, description=f"test {domain}")
        m = image_metrics(labels, scored.scores)
        if not m["valid"]:
            console.print(f"[bold red]{domain}: metrics INVALID — {m.get('n_bad_scores', 0)} NaN/Inf scores "
                          f"({m.get('reason', 'non-finite scores')})[/]")
        if masks is not None:
            m["pixel_auroc"] = pixel_auroc(masks_to_score_grid(masks, run_params), scored.maps)
        if scored.extras and "domain_pred" in scored.extras:
            m["aux_domain_accuracy"] = float(np.mean(scored.extras["domain_pred"] == i))
        per_domain[domain] = m
        paths = prepared.paths(domain, "test")
        rows.append(pd.DataFrame({"path": paths, "domain": domain, "label": labels, "score": scored.scores}))
        finite = np.isfinite(scored.scores)
        curves[domain] = (labels[finite], scored.scores[finite])
        dists[domain] = (scored.scores[finite & (labels == 0)], scored.scores[finite & (labels == 1)])
        for j in _pick_examples(domain, labels, np.where(finite, scored.scores, -np.inf), per_example):
            examples.append((f"{domain} {Path(paths[j]).name} ({'fault' if labels[j] else 'good'})",
                             np.asarray(maps[j]), scored.maps[j], float(scored.scores[j]), int(labels[j])))
        all_labels.append(labels)
        all_scores.append(scored.scores)

    pooled = image_metrics(np.concatenate(all_labels), np.concatenate(all_scores))
    result = summarise(per_domain, pooled)
    result["threshold_note"] = "precision/recall/F1/accuracy use the Youden-J threshold chosen on this test set"

    scores = pd.concat(rows, ignore_index=True)
    write_text(scores.to_csv(index=False), SCORES_FILE)
    write_json(result, EVAL_FILE)
    plot_files = write_plots(curves, dists, examples, result)
    console.print(metrics_table({k: v for k, v in result.items() if k != "threshold_note"},
                                f"{trained.params.method} seed {trained.params.seed}: test metrics (%)"))
    log_to_mlflow(params, trained, result, plot_files)
    return result


def write_plots(curves, dists, examples, result) -> list[Path]:
    data_dir = PLOTS_DIR / "data"
    roc_rows = []
    for domain, (labels, scores) in curves.items():
        if len(np.unique(labels)) == 2:
            roc_rows += [{"domain": domain, **p} for p in roc_points_table(labels, scores)]
    write_text(pd.DataFrame(roc_rows, columns=["domain", "fpr", "tpr", "threshold"]).to_csv(index=False), data_dir / "roc.csv")
    thresholds = {d: result[d]["threshold"] for d in curves if result[d].get("threshold") is not None}
    files = [plots.plot_roc(curves, PLOTS_DIR / "roc.png"),
             plots.plot_score_distributions(dists, PLOTS_DIR / "score_distributions.png", thresholds)]
    if examples:
        files.append(plots.plot_examples(examples, PLOTS_DIR / "examples.png"))
    return files


def metric_items(result: dict[str, Any]) -> dict[str, float]:
    """Flatten eval.json into MLflow metric names test/<domain>/<metric>, finite numbers only."""
    out = {}
    for scope, values in result.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[f"test/{scope}/{key}"] = float(value)
    return out


def log_to_mlflow(params: Params, trained: checkpoint.TrainedModel, result: dict[str, Any], plot_files: list[Path]) -> None:
    import mlflow

    run_id = trained.info.get("run_id")
    tracking.ensure_experiment(params.mlflow.experiment, params.mlflow.tracking_uri)
    if not run_id or not tracking.run_exists(run_id):
        console.print(f"[yellow]MLflow run {run_id} of {MODEL_FILE} not found in {tracking.tracking_uri(params.mlflow.tracking_uri)}; metrics not logged[/]")
        return
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metric_items(result))
        invalid = [d for d, v in result.items() if isinstance(v, dict) and v.get("valid") is False]
        mlflow.set_tags({"evaluated": "true", "invalid_domains": ",".join(invalid)})
        mlflow.log_artifact(str(EVAL_FILE), artifact_path="eval")
        mlflow.log_artifact(str(SCORES_FILE), artifact_path="eval")
        for f in plot_files:
            mlflow.log_artifact(str(f), artifact_path="plots")
