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

from hdmap_ad.core import checkpoint
from hdmap_ad.core.config import Params
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.files import atomic_dir, write_json, write_text
from hdmap_ad.core.inference import score_maps
from hdmap_ad.core.model import gaussian_blur
from hdmap_ad.core.paths import EVAL_DETAILS_FILE, EVAL_FILE, MODEL_FILE, PLOTS_DIR, RUN_FILE, SCORES_FILE
from hdmap_ad.core.preprocess import center_crop_offset
from hdmap_ad.core.runtime import console, precision_label, resolve_precision, select_device, set_threads
from hdmap_ad.pipeline import plots, tracking
from hdmap_ad.pipeline.data import PreparedData
from hdmap_ad.pipeline.metrics import HEADLINE_METRICS, image_metrics, pixel_auroc, roc_points_table, summarise

TABLE_COLUMNS = [
    ("auroc", "AUROC"),
    ("ap", "AP"),
    ("f1_max", "F1-max"),
    ("tpr_at_fpr_1", "TPR@FPR1%"),
    ("tpr_at_fpr_5", "TPR@FPR5%"),
    ("pixel_auroc", "pixel AUROC"),
]
assert HEADLINE_METRICS == tuple(k for k, _ in TABLE_COLUMNS)  # the terminal table shows exactly those


def masks_to_score_grid(masks: np.ndarray, params: Params) -> np.ndarray:
    """Bring pixel masks through the same geometry as the maps (resize, crop, score size), resizing
    nearest-neighbour as the original's evaluation resizes its masks (docs/design.md#metrics-pixel): a
    mask stays a set of labelled pixels instead of being interpolated and thresholded again."""
    t = torch.from_numpy((np.asarray(masks) > 0.5).astype(np.float32))[:, None]
    t = F.interpolate(t, size=tuple(params.preprocess.resize), mode="nearest")
    (ch, cw) = params.preprocess.crop
    top, left = center_crop_offset(params.preprocess.resize, params.preprocess.crop)
    t = t[..., top : top + ch, left : left + cw]
    t = F.interpolate(t, size=tuple(params.score.size), mode="nearest")
    return (t[:, 0] > 0.5).numpy().astype(np.uint8)


def blurred_maps(maps: np.ndarray, params: Params) -> np.ndarray:
    """Anomaly maps at the score size (N×S×S) with the score's Gaussian blur: the maps the image score is
    taken from, and those the original's pixel AUROC is computed on."""
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    return gaussian_blur(t, params.score.blur_kernel, params.score.blur_sigma)[:, 0].numpy()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def headline(result: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """eval.json: per domain, `mean` and `pooled`, the headline metrics in percent (2 decimals). A scope
    that is not valid (NaN/Inf scores; a mean that lacks an invalid domain) gets nulls: its numbers and
    the reason are in eval_details.json."""
    out: dict[str, dict[str, float | None]] = {}
    for scope, m in result.items():
        if not isinstance(m, dict):
            continue
        ok = m.get("valid") is not False
        out[scope] = {
            k: (round(100.0 * float(m[k]), 2) if ok and _is_number(m[k]) else None) for k in HEADLINE_METRICS if k in m
        }
    return out


def details_path(eval_file: Path) -> Path:
    """metrics/eval.json -> metrics/eval_details.json (the same for any other name)."""
    eval_file = Path(eval_file)
    return eval_file.with_name(f"{eval_file.stem}_details{eval_file.suffix}")


def read_results(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(headline metrics in percent, details or None) from an eval.json, with its eval_details.json
    beside it when present; also from an eval_details.json itself, or an eval.json written before the
    split (fractions with validity flags)."""
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise HdmapError(f"{path}: not readable as JSON ({str(err).splitlines()[0][:200]})") from None
    scopes = {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}
    if not scopes:
        raise HdmapError(f"{path}: no per-domain metrics in it (expected metrics/eval.json)")
    if any("valid" in v for v in scopes.values()):
        return headline(scopes), scopes
    details = None
    extra = details_path(path)
    if extra.is_file():
        try:
            loaded = json.loads(extra.read_text())
            details = loaded if isinstance(loaded, dict) else None
        except (OSError, ValueError):
            details = None  # the table still shows the metrics; only validity and counts are missing
    return scopes, details


def metrics_table(metrics: dict[str, Any], title: str, details: dict[str, Any] | None = None) -> Table:
    """Rows of eval.json (percent); validity and good/fault counts come from eval_details.json."""
    details = details or {}
    table = Table(title=title)
    table.add_column("domain")
    for _, label in TABLE_COLUMNS:
        table.add_column(label, justify="right")
    table.add_column("good/fault", justify="right")
    for name, m in metrics.items():
        if not isinstance(m, dict):
            continue
        d = details.get(name) if isinstance(details.get(name), dict) else {}
        if d.get("valid") is False:
            table.add_row(name, *["[red]invalid[/]"] * len(TABLE_COLUMNS), f"bad scores: {d.get('n_bad_scores', '?')}")
            continue
        cells = [("—" if not _is_number(m.get(k)) else f"{m[k]:.2f}") for k, _ in TABLE_COLUMNS]
        counts = f"{d.get('n_good', '')}/{d.get('n_fault', '')}" if "n_good" in d else ""
        table.add_row(name, *cells, counts)
    return table


EXAMPLE_ROLES = ("the highest-scoring good map", "the median-scoring fault map")


def _pick_examples(domain: str, labels: np.ndarray, scores: np.ndarray, k: int) -> list[tuple[int, str]]:
    """(index, role): the most suspicious good map and the median-scored faulty map, what a reviewer
    looks at first (the first k of them)."""
    order = []
    good, fault = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    if len(good):
        order.append((int(good[np.argmax(scores[good])]), EXAMPLE_ROLES[0]))
    if len(fault):
        order.append((int(fault[np.argsort(scores[fault])[len(fault) // 2]]), EXAMPLE_ROLES[1]))
    return order[:k]


def crop_region(shape: tuple[int, int], params: Params) -> tuple[float, float, float, float]:
    """(top, left, height, width) in input pixels of what the model sees: the centre crop after the resize."""
    (h, w), (rh, rw), (ch, cw) = shape, params.preprocess.resize, params.preprocess.crop
    top, left = center_crop_offset((rh, rw), (ch, cw))
    sy, sx = h / rh, w / rw
    return top * sy, left * sx, ch * sy, cw * sx


def evaluate(params: Params) -> dict[str, Any]:
    set_threads(params.runtime.num_threads)
    device = select_device(params.runtime.device)
    trained = load_model_and_run(params, device)  # the MLflow run is found before any scoring
    prepared = PreparedData.load(Path(params.data.prepared))
    missing = [d for d in trained.domains if d not in prepared.domains]
    if missing:
        raise HdmapError(f"{params.data.prepared}: no test data for {', '.join(missing)} that the model was trained on")
    # Scoring must follow the trained model's preprocessing; score settings may be changed at evaluation.
    run_params = trained.params.model_copy(update={"score": params.score, "evaluate": params.evaluate})
    precision = resolve_precision(device, params.evaluate.amp, "evaluate.amp")
    trained_at = trained.info.get("precision") or "not recorded"
    console.print(
        f"inference precision: {precision_label(precision)} (evaluate.amp={params.evaluate.amp} on {device}; "
        f"trained at {precision_label(trained_at) if trained_at in ('off', 'bf16', 'fp16') else trained_at})"
    )

    per_domain, rows, curves, dists, examples, roles = {}, [], {}, {}, [], set()
    all_labels, all_scores = [], []
    per_example = max(1, params.evaluate.n_examples // max(1, len(trained.domains)))
    for i, domain in enumerate(trained.domains):
        maps = prepared.maps(domain, "test")
        labels = np.asarray(prepared.labels(domain, "test"))
        masks = prepared.masks(domain)
        scored = score_maps(
            trained.model,
            trained.method,
            maps,
            run_params,
            device,
            params.evaluate.batch_size,
            keep_maps=True,
            domain_id=i,
            description=f"test {domain}",
            amp=precision,
        )
        m = image_metrics(labels, scored.scores)
        if not m["valid"]:
            console.print(
                f"[bold red]{domain}: metrics INVALID — {m.get('n_bad_scores', 0)} NaN/Inf scores "
                f"({m.get('reason', 'non-finite scores')})[/]"
            )
        if masks is not None:
            m["pixel_auroc"] = pixel_auroc(
                masks_to_score_grid(masks, run_params), blurred_maps(scored.maps, run_params)
            )
        if scored.extras and "domain_pred" in scored.extras:
            m["aux_domain_accuracy"] = float(np.mean(scored.extras["domain_pred"] == i))
        per_domain[domain] = m
        paths = prepared.paths(domain, "test")
        rows.append(pd.DataFrame({"path": paths, "domain": domain, "label": labels, "score": scored.scores}))
        finite = np.isfinite(scored.scores)
        curves[domain] = (labels[finite], scored.scores[finite])
        dists[domain] = (scored.scores[finite & (labels == 0)], scored.scores[finite & (labels == 1)])
        for j, role in _pick_examples(domain, labels, np.where(finite, scored.scores, -np.inf), per_example):
            roles.add(role)
            examples.append(
                plots.Example(
                    f"{domain} {Path(paths[j]).name} ({'fault' if labels[j] else 'good'})",
                    np.asarray(maps[j]),
                    scored.maps[j],
                    float(scored.scores[j]),
                    int(labels[j]),
                    mask=None if masks is None else masks[j],
                    region=crop_region(tuple(maps.shape[-2:]), run_params),
                )
            )
        all_labels.append(labels)
        all_scores.append(scored.scores)

    pooled = image_metrics(np.concatenate(all_labels), np.concatenate(all_scores))
    result = summarise(per_domain, pooled)
    result["threshold_note"] = "precision/recall/F1/accuracy use the Youden-J threshold chosen on this test set"
    result["inference_precision"] = precision  # off = float32 (evaluate.amp as resolved on this machine)

    scores = pd.concat(rows, ignore_index=True)
    example_title = "Example maps, per domain: " + " and ".join(r for r in EXAMPLE_ROLES if r in roles)
    # The stage's outputs persist between runs: each is replaced whole, and only once everything is
    # computed, so a failure leaves the previous evaluation in place.
    with atomic_dir(PLOTS_DIR) as folder:
        plot_names = [
            f.relative_to(folder) for f in write_plots(curves, dists, examples, result, folder, example_title)
        ]
    plot_files = [PLOTS_DIR / name for name in plot_names]
    write_text(scores.to_csv(index=False), SCORES_FILE)
    write_json(
        {**result, "units": "fractions in [0, 1]; metrics/eval.json has the headline metrics in percent"},
        EVAL_DETAILS_FILE,
    )
    write_json(headline(result), EVAL_FILE)
    console.print(
        metrics_table(headline(result), f"{trained.params.method} seed {trained.params.seed}: test metrics (%)", result)
    )
    log_to_mlflow(params, trained, result, plot_files)
    return result


def write_plots(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    dists: dict[str, tuple[np.ndarray, np.ndarray]],
    examples: list[plots.Example],
    result: dict[str, Any],
    out_dir: Path = PLOTS_DIR,
    example_title: str = "Example maps",
) -> list[Path]:
    """The figures and the DVC plot data under `out_dir`: data/roc.csv (fpr + one TPR column per domain,
    for `dvc plots`), data/roc_points.csv (every domain's ROC points with their thresholds) and the PNGs.
    Returns the PNG paths."""
    out_dir = Path(out_dir)
    data_dir = out_dir / "data"
    write_text(plots.roc_grid_table(curves).to_csv(index=False, float_format="%.6g"), data_dir / "roc.csv")
    roc_rows = []
    for domain, (labels, scores) in curves.items():
        if len(np.unique(labels)) == 2:
            roc_rows += [{"domain": domain, **p} for p in roc_points_table(labels, scores)]
    write_text(
        pd.DataFrame(roc_rows, columns=["domain", "fpr", "tpr", "threshold"]).to_csv(index=False),
        data_dir / "roc_points.csv",
    )
    thresholds = {d: result[d]["threshold"] for d in curves if result[d].get("threshold") is not None}
    files = [
        plots.plot_roc(curves, out_dir / "roc.png"),
        plots.plot_score_distributions(dists, out_dir / "score_distributions.png", thresholds),
    ]
    if examples:
        files.append(plots.plot_examples(examples, out_dir / "examples.png", example_title))
    return files


def metric_items(result: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics `test_<metric>/<scope>` (scope: a domain, `mean` or `pooled`): the headline metrics
    only, as fractions, finite numbers of valid scopes only. The MLflow UI groups charts by the part
    before the slash, so each metric's section holds every domain."""
    out = {}
    for scope, values in result.items():
        if not isinstance(values, dict) or values.get("valid") is False:
            continue
        for key in HEADLINE_METRICS:
            if _is_number(values.get(key)):
                out[f"test_{key}/{scope}"] = float(values[key])
    return out


def load_model_and_run(params: Params, device: torch.device) -> checkpoint.TrainedModel:
    """models/model.safetensors, with `info["run_id"]` set to the MLflow run that trained it (models/run.json,
    else the run tagged with the model's hash). No such run, or no usable store, is an error here,
    before the slow scoring: results that cannot be logged must not pass silently."""
    from hdmap_ad.pipeline.store_check import check_store

    uri = tracking.tracking_uri(params.mlflow.tracking_uri)
    check_store(uri, write=False)  # within seconds, before anything slow
    trained = checkpoint.load_trained(MODEL_FILE, device)
    trained.info["run_id"] = tracking.find_run(
        MODEL_FILE,
        trained.info["sha256"],
        params.mlflow.experiment,
        tracking.tracking_uri(params.mlflow.tracking_uri),
        RUN_FILE,
        fallback_run_id=trained.info.get("run_id"),
    )
    import mlflow

    # and takes a write (a read-only sqlite file is otherwise found only after scoring)
    check_store(uri, mlflow.MlflowClient(uri).get_run(trained.info["run_id"]).info.experiment_id, write=True)
    return trained


def log_to_mlflow(
    params: Params, trained: checkpoint.TrainedModel, result: dict[str, Any], plot_files: list[Path]
) -> None:
    """Log into the training run `load_model_and_run` found."""
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(params.mlflow.tracking_uri))
    with mlflow.start_run(run_id=trained.info["run_id"]):
        mlflow.log_metrics(metric_items(result))
        invalid = [d for d, v in result.items() if isinstance(v, dict) and v.get("valid") is False]
        mlflow.set_tags(
            {
                "evaluated": "true",
                "invalid_domains": ",".join(invalid),
                "eval_precision": str(result.get("inference_precision", "")),
            }
        )
        mlflow.log_artifact(str(EVAL_FILE), artifact_path="eval")
        mlflow.log_artifact(str(EVAL_DETAILS_FILE), artifact_path="eval")
        mlflow.log_artifact(str(SCORES_FILE), artifact_path="eval")
        for f in plot_files:
            mlflow.log_artifact(str(f), artifact_path="plots")
