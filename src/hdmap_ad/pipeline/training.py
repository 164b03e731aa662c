"""The one training loop: any method, seeded, resumable, with health checks and MLflow logging.
(Over 450 lines: the steps of one training read best in one place.)

`train` reads as its steps: set up (device, data, precision), resume (a matching training state), build
the trainer, choose and open the MLflow run, the loop, save the model, log it. One optimisation step is
pipeline/train_steps.py; what a run must match (code, configuration) is pipeline/fingerprint.py."""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hdmap_ad.core import checkpoint, methods
from hdmap_ad.core.config import Params, flatten
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.features import FeatureSource, make_feature_source
from hdmap_ad.core.files import write_json
from hdmap_ad.core.inference import score_maps
from hdmap_ad.core.model import Dinomaly
from hdmap_ad.core.optim import StableAdamW, warm_cosine_lr
from hdmap_ad.core.paths import LEGACY_SUFFIX, MODEL_FILE, RUN_FILE, STATE_FILE, TRAIN_METRICS
from hdmap_ad.core.runtime import (
    StepProgress,
    console,
    precision_label,
    resolve_precision,
    rng_state,
    seed_everything,
    select_device,
    set_rng_state,
    set_threads,
)
from hdmap_ad.pipeline import tracking
from hdmap_ad.pipeline.data import PreparedData
from hdmap_ad.pipeline.fingerprint import check_config_unchanged, run_fingerprint
from hdmap_ad.pipeline.metrics import image_metrics
from hdmap_ad.pipeline.train_steps import batch_indices, build_optimizer, set_lr, train_step


@dataclass
class TrainSet:
    maps: np.ndarray  # N×H×W, all selected domains' train maps
    domain_ids: np.ndarray  # N
    domains: list[str]
    val: dict[str, tuple[np.ndarray, np.ndarray]]  # domain -> (maps, labels): seeded stratified subset of test


def load_train_set(prepared: PreparedData, params: Params) -> TrainSet:
    domains = list(params.data.domains)
    missing = [d for d in domains if d not in prepared.domains]
    if missing:
        raise HdmapError(
            f"{params.data.prepared}: prepared data lacks {', '.join(missing)} (rerun `dvc repro prepare`)"
        )
    maps = [np.asarray(prepared.maps(d, "train"), dtype=np.float32) for d in domains]
    n_train = sum(len(m) for m in maps)
    if params.train.batch_size > n_train:
        raise HdmapError(
            f"train.batch_size {params.train.batch_size} is larger than the training set ({n_train} maps "
            f"in {', '.join(domains)}); use at most {n_train}"
        )
    ids = [np.full(len(m), i, dtype=np.int64) for i, m in enumerate(maps)]
    rng = np.random.default_rng(params.seed)
    val = {}
    for d in domains:
        labels = prepared.labels(d, "test")
        chosen = []
        for label in (0, 1):  # stratified: the same fraction of good and faulty maps
            idx = np.flatnonzero(labels == label)
            k = max(1, round(params.data.val_ratio * len(idx)))
            chosen.append(np.sort(rng.choice(idx, size=k, replace=False)))
        pick = np.concatenate(chosen)
        val[d] = (np.asarray(prepared.maps(d, "test")[pick], dtype=np.float32), labels[pick])
    return TrainSet(np.concatenate(maps), np.concatenate(ids), domains, val)


def validate(
    model, method, train_set: TrainSet, params: Params, device: torch.device
) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-domain AUROC on the validation subset, and Youden thresholds (per domain and pooled)."""
    metrics, thresholds, all_labels, all_scores = {}, {}, [], []
    for i, d in enumerate(train_set.domains):
        maps, labels = train_set.val[d]
        scored = score_maps(
            model,
            method,
            maps,
            params,
            device,
            params.evaluate.batch_size,
            domain_id=i,
            description=f"val {d}",
            amp=params.train.amp,
        )  # thresholds at the training precision
        m = image_metrics(labels, scored.scores)
        metrics[f"val_auroc/{d}"] = m["auroc"] if m["valid"] else float("nan")
        thresholds[d] = m["threshold"]
        all_labels.append(labels)
        all_scores.append(scored.scores)
    pooled = image_metrics(np.concatenate(all_labels), np.concatenate(all_scores))
    thresholds["pooled"] = pooled["threshold"]
    values = [v for v in metrics.values() if math.isfinite(v)]
    metrics["val_auroc/mean"] = float(np.mean(values)) if len(values) == len(metrics) else float("nan")
    return metrics, thresholds


def val_line(step: int, total: int, val_metrics: dict[str, float]) -> str:
    """One log line per validation: `validation @ 50/150: AUROC domain_A 97.12% ... mean 96.40%`."""
    cells = [
        f"{k.split('/', 1)[1]} {100 * v:.2f}%" if math.isfinite(v) else f"{k.split('/', 1)[1]} n/a"
        for k, v in val_metrics.items()
    ]
    return f"validation @ {step}/{total}: AUROC " + "  ".join(cells)


# --------------------------------------------------------------------------------------------------
# train(): its steps


@dataclass
class RunSetup:
    """What one training run works on: the device, the data, and what a resumed state must match."""

    device: torch.device
    prepared: PreparedData
    train_set: TrainSet
    data_digest: str
    precision: str  # what train.amp resolved to on this machine
    fingerprint: str  # configuration, code, data and precision (`run_fingerprint`)
    comparison_key: str  # the settings runs are compared by (MLflow tag, resumed runs)


@dataclass
class Trainer:
    """The model being trained and everything that moves with it from step to step."""

    model: Dinomaly
    method: methods.Method
    optimizer: StableAdamW
    scaler: torch.amp.GradScaler
    features: FeatureSource
    start_step: int
    run_id: str | None  # the MLflow run: the resumed state's, then the one logged into
    history: dict[str, Any]  # validation results by step and the count of skipped steps


def set_up(params: Params, prepared_dir: Path | None) -> RunSetup:
    """Threads, device, the training set and validation subset, and the precision train.amp resolves to."""
    set_threads(params.runtime.num_threads)
    device = select_device(params.runtime.device)
    prepared = PreparedData.load(Path(prepared_dir or params.data.prepared))
    train_set = load_train_set(prepared, params)
    data_digest = prepared.data_digest()
    precision = resolve_precision(device, params.train.amp, "train.amp")
    console.print(f"precision: {precision_label(precision)} (train.amp={params.train.amp} on {device})")
    fingerprint = run_fingerprint(params, data_digest, precision)
    return RunSetup(
        device, prepared, train_set, data_digest, precision, fingerprint, params.comparison_key(data_digest)
    )


def load_resume_state(params: Params, fingerprint: str) -> dict[str, Any] | None:
    """The training state to continue from (`STATE_FILE`, with runtime.resume=auto), or None: none there,
    one from another configuration, code or data, or one that cannot be read (moved aside, with a warning)."""
    if params.runtime.resume != "auto":
        return None
    legacy = STATE_FILE.with_suffix(LEGACY_SUFFIX)
    if not STATE_FILE.is_file() and legacy.is_file():  # the state's old name, same content: take it over
        os.replace(legacy, STATE_FILE)
        console.print(f"renamed {legacy} to {STATE_FILE} (the training state's new name)")
    if not STATE_FILE.is_file():
        return None
    try:
        state = checkpoint.load(STATE_FILE, checkpoint.STATE_KEYS)
    except HdmapError as err:  # truncated, damaged, old format: it must not block every later run
        aside = STATE_FILE.with_name(STATE_FILE.name + ".corrupt")
        os.replace(STATE_FILE, aside)
        console.print(f"[yellow]warning: {err}\n  moved it to {aside}; starting afresh[/]")
        return None
    if state.get("fingerprint") != fingerprint:
        console.print(f"[yellow]{STATE_FILE}: from a different configuration, code or data; starting afresh[/]")
        return None
    return state


def build_trainer(params: Params, setup: RunSetup, state: dict[str, Any] | None) -> Trainer:
    """Model, method and optimiser from the seed, then (when resuming) from `state`; the feature source."""
    seed_everything(params.seed)
    model, method = checkpoint.build(params, setup.train_set.domains, setup.device)
    optimizer, scaler = build_optimizer(model, method, params, setup.device)
    start_step, run_id, history = 0, None, {}
    if state is not None:
        try:
            model.load_state_dict(state["model"], strict=False)  # before compiling: keys carry no `_orig_mod.`
            method.load_state_dict(state["method"])
            optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise HdmapError(
                f"{STATE_FILE}: training state does not fit this model ({type(err).__name__}: {first}); "
                "delete it or set runtime.resume=never"
            ) from None
        start_step, run_id, history = int(state["step"]), state.get("run_id"), dict(state.get("history") or {})
        console.print(f"resuming from {STATE_FILE} at step {start_step}/{params.train.steps}")
    if params.train.compile:
        model.decoder = torch.compile(model.decoder)
    features = make_feature_source(model, setup.train_set.maps, params, setup.device)
    return Trainer(model, method, optimizer, scaler, features, start_step, run_id, history)


def choose_run(setup: RunSetup, state: dict[str, Any] | None, run_id: str | None) -> tuple[str | None, str | None]:
    """(the MLflow run to continue, None for a new one; the run a new one resumes from). A resumed state
    continues its run while that run exists and the settings it is compared by are unchanged."""
    if run_id is not None and not tracking.run_exists(run_id):
        console.print(f"[yellow]MLflow run {run_id} of the checkpoint is gone; logging to a new run[/]")
        return None, None
    if run_id is not None and state is not None and state.get("comparison_key") != setup.comparison_key:
        # Same weights, other settings that the run is compared by (e.g. score.*): the old run keeps its
        # own params and results; this one gets a run of its own.
        console.print(
            f"[yellow]{STATE_FILE}: settings the run is compared by changed (not the weights); "
            "continuing from the checkpoint into a new MLflow run[/]"
        )
        return None, run_id
    return run_id, None


@contextlib.contextmanager
def open_run(
    params: Params,
    setup: RunSetup,
    trainer: Trainer,
    experiment_id: str,
    run_id: str | None,
    resumed_from: str | None,
) -> Iterator[str]:
    """The MLflow run (`run_id`, or a new one, which gets the params) with the data recorded as its input;
    yields its id. An error inside ends the run as failed."""
    import mlflow

    from hdmap_ad.pipeline.orphans import process_tags

    run = mlflow.start_run(
        run_id=run_id,
        experiment_id=experiment_id,
        run_name=tracking.run_name(params, setup.data_digest),
        tags=tracking.run_tags(params, setup.data_digest),
        log_system_metrics=False,
    )
    try:
        # which process holds the run: a later train or compare ends it if this process dies (orphans.py)
        mlflow.set_tags(process_tags())
        tracking.log_dataset_input(setup.prepared, params.data_root)
        if run_id is None:
            if resumed_from:
                mlflow.set_tag("resumed_from_run", resumed_from)
            mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params.resolved()).items()})
            mlflow.log_params(
                {
                    "n_train_maps": len(setup.train_set.maps),
                    "device": str(setup.device),
                    "train.amp_resolved": setup.precision,
                    "feature_cache": trainer.features.describe(),
                    "fingerprint": setup.fingerprint,
                    # what the method derives from its settings and keeps fixed: params, not curves
                    **trainer.method.constants(),
                }
            )
        yield run.info.run_id
    except BaseException as err:
        try:
            mlflow.end_run("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        except Exception:  # the store may be what failed: the error being raised says what to do
            pass
        raise
    mlflow.end_run("FINISHED")


PENDING_DIR = STATE_FILE.parent / "pending"  # the trained model and its metrics until MLflow holds them


def save_train_state(params: Params, setup: RunSetup, trainer: Trainer, step: int) -> None:
    """What resuming at `step` needs (`STATE_FILE`)."""
    checkpoint.save(
        {
            "model": checkpoint.trainable_state(trainer.model),
            "method": trainer.method.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": {"step": step},
            "step": step,
            "rng": rng_state(),
            "config": params.resolved(),
            "fingerprint": setup.fingerprint,
            "run_id": trainer.run_id,
            "comparison_key": setup.comparison_key,
            "domains": setup.train_set.domains,
            "history": trainer.history,
            "precision": setup.precision,
        },
        STATE_FILE,
    )


def train_loop(
    params: Params,
    setup: RunSetup,
    trainer: Trainer,
    bar: StepProgress,
    after_checkpoint: Callable[[], None] | None = None,
) -> int:
    """The steps from `trainer.start_step` on: updates, MLflow logs every runtime.log_every steps, validation
    every train.val_every, the training state every runtime.checkpoint_every (after good updates only),
    then `after_checkpoint()` (which may stop the run by raising). Stops with an error after
    train.max_bad_steps non-finite steps in a row; returns the skipped steps."""
    import mlflow

    t_params, run_params = params.train, params.runtime
    model, method, optimizer, train_set, history = (
        trainer.model,
        trainer.method,
        trainer.optimizer,
        setup.train_set,
        trainer.history,
    )
    bad_in_row, bad_total, window_loss, window_n, t_last = 0, history.get("bad_total", 0), 0.0, 0, time.perf_counter()
    model.train()
    method.train()
    for step in range(trainer.start_step, t_params.steps):
        lr = warm_cosine_lr(step, t_params.lr, t_params.final_lr, t_params.steps, t_params.warmup_steps)
        set_lr(optimizer, lr)
        idx = batch_indices(len(train_set.maps), t_params.batch_size, step, params.seed)
        result = train_step(
            model,
            method,
            optimizer,
            trainer.scaler,
            trainer.features,
            idx,
            train_set.domain_ids[idx],
            step,
            params,
            setup.device,
        )
        info, nan_count, total_norm = result.info, result.nan_count, result.total_norm
        if result.good:
            bad_in_row = 0
            window_loss += result.loss
            window_n += 1
        else:
            bad_in_row += 1
            bad_total += 1
            what = "loss" if not math.isfinite(result.loss) else "gradient"
            warnings.warn(
                f"step {step}: non-finite {what} (NaN/Inf gradient elements: {nan_count}); update skipped",
                stacklevel=1,
            )
            tracking.log_curves({"train/bad_steps": bad_total, "grad/nan_count": nan_count}, step)
            if bad_in_row >= t_params.max_bad_steps:
                raise HdmapError(
                    f"training diverged: {bad_in_row} non-finite steps in a row at step {step}; "
                    f"the last good checkpoint is kept at {STATE_FILE}"
                )
        done = step + 1
        if done % run_params.log_every == 0 or done == t_params.steps:
            now = time.perf_counter()
            logs = {
                "train/loss": window_loss / window_n if window_n else float("nan"),
                "train/lr": lr,
                "grad/total_norm": total_norm,
                "grad/nan_count": nan_count,
                "train/bad_steps": bad_total,
                "train/images_per_s": window_n * t_params.batch_size / max(now - t_last, 1e-9),
            }
            logs.update(info)
            logs.update(method.diagnostics())
            tracking.log_curves(logs, done)
            bar.update(0, f"loss {logs['train/loss']:.4f} lr {lr:.2e} {logs['train/images_per_s']:.1f} img/s")
            window_loss, window_n, t_last = 0.0, 0, now
        if done % t_params.val_every == 0 and done != t_params.steps:
            val_metrics, _ = validate(model, method, train_set, params, setup.device)
            mlflow.log_metrics(val_metrics, step=done)
            bar.note(val_line(done, t_params.steps, val_metrics))
            history[f"val@{done}"] = val_metrics
            model.train()
            method.train()
        history["bad_total"] = bad_total
        # Only after a good update: a checkpoint must never sit on the far side of a divergence.
        if bad_in_row == 0 and (done % run_params.checkpoint_every == 0 or done == t_params.steps):
            save_train_state(params, setup, trainer, done)
            if after_checkpoint is not None:
                after_checkpoint()
        bar.update(1)
    return bad_total


def save_model(
    params: Params, setup: RunSetup, trainer: Trainer, val_metrics: dict[str, float], thresholds: dict[str, Any]
) -> str:
    """Write the trained model (`MODEL_FILE`); return its content hash.

    No run id in the model file: two machines training one config write the same bytes (dvc.lock records
    its hash). The run is found through models/run.json or the run's model_sha256 tag."""
    final = {
        "model": checkpoint.trainable_state(trainer.model),
        "method": trainer.method.state_dict(),
        "step": params.train.steps,
        "config": params.resolved(),
        "fingerprint": setup.fingerprint,
        "domains": setup.train_set.domains,
        "thresholds": thresholds,
        "val": val_metrics,
        "map_shape": list(setup.prepared.shape),
        "precision": setup.precision,  # what train.amp resolved to on the machine that trained it
    }
    try:
        return checkpoint.save(final, PENDING_DIR / MODEL_FILE.name)
    except HdmapError as err:  # e.g. a full disk: the published model is untouched, training need not rerun
        raise HdmapError(
            f"{err}; {MODEL_FILE} is unchanged and the training state is kept in {STATE_FILE}: once there is room, "
            "`dvc repro` (or `hdmap-ad train` with the same settings) continues from there without retraining"
        ) from None


def log_model(model_sha256: str) -> None:
    """Into the active run: the pending model file (artifact `checkpoint/`), its hash as a tag, the servable
    pyfunc model (runs:/<run id>/model)."""
    import mlflow

    from hdmap_ad.pipeline.serving import log_pyfunc_model

    mlflow.set_tag("model_sha256", model_sha256)
    mlflow.log_artifact(str(PENDING_DIR / MODEL_FILE.name), artifact_path=tracking.CHECKPOINT_ARTIFACT_DIR)
    log_pyfunc_model(PENDING_DIR / MODEL_FILE.name)


def publish(run_id: str, model_sha256: str) -> None:
    """The logged model and its metrics replace `MODEL_FILE` and `TRAIN_METRICS` (what dvc.lock records),
    and models/run.json names the run: only once MLflow holds them, so a logging failure leaves the
    workspace's model, metrics and dvc.lock describing one another."""
    TRAIN_METRICS.parent.mkdir(parents=True, exist_ok=True)
    os.replace(PENDING_DIR / MODEL_FILE.name, MODEL_FILE)
    os.replace(PENDING_DIR / TRAIN_METRICS.name, TRAIN_METRICS)
    write_json({"run_id": run_id, "model_sha256": model_sha256}, RUN_FILE)


def write_summary(params: Params, bad_total: int, val_metrics: dict[str, float]) -> dict[str, Any]:
    """metrics/train.json (a DVC metric, hashed in dvc.lock): what people compare, in percent. The run's
    ids live in models/run.json, the thresholds in the model."""
    val_auroc = {
        k.split("/", 1)[1]: (round(100.0 * v, 2) if math.isfinite(v) else None) for k, v in val_metrics.items()
    }
    summary = {"steps": params.train.steps, "bad_steps": bad_total, "val_auroc": val_auroc}
    write_json(summary, PENDING_DIR / TRAIN_METRICS.name)  # published with the model (`publish`)
    return summary


def train(
    params: Params,
    prepared_dir: Path | None = None,
    expected_config: Path | None = None,
    params_file: Path | str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Train one model over all selected domains; write models/ and metrics/train.json; return a summary.

    `expected_config` (the DVC stage passes models/train_config.json): refuse to start, and to write the
    model at the end, unless `params_file` still resolves to that training config."""
    import mlflow

    from hdmap_ad.pipeline.orphans import end_orphan_runs
    from hdmap_ad.pipeline.store_check import is_store_error, open_experiment, store_failed

    check_config_unchanged(params, expected_config, params_file, overrides)
    # within seconds, before the slow work: the store answers and takes a write
    experiment_id = open_experiment(params.mlflow.experiment, params.mlflow.tracking_uri)
    uri = tracking.tracking_uri(params.mlflow.tracking_uri)
    for orphan in end_orphan_runs(mlflow.MlflowClient(uri), [experiment_id], "hdmap-ad train"):
        console.print(
            f"MLflow run {orphan.info.run_name} ({orphan.info.run_id}) was RUNNING, but its process is gone: marked KILLED"
        )
    setup = set_up(params, prepared_dir)
    state = load_resume_state(params, setup.fingerprint)
    trainer = build_trainer(params, setup, state)
    run_id, resumed_from = choose_run(setup, state, trainer.run_id)
    try:
        with open_run(params, setup, trainer, experiment_id, run_id, resumed_from) as run_id:
            trainer.run_id = run_id  # what the training states record from now on
            steps = params.train.steps
            description = f"train {params.method} seed {params.seed}"
            with StepProgress(steps, description, every=params.runtime.log_every, start=trainer.start_step) as bar:
                # at each checkpoint too: a second `dvc exp run` stops this one within checkpoint_every steps,
                # not after the whole training
                bad_total = train_loop(
                    params,
                    setup,
                    trainer,
                    bar,
                    lambda: check_config_unchanged(params, expected_config, params_file, overrides),
                )
            check_config_unchanged(params, expected_config, params_file, overrides)
            val_metrics, thresholds = validate(trainer.model, trainer.method, setup.train_set, params, setup.device)
            bar.note(val_line(steps, steps, val_metrics))
            model_sha256 = save_model(params, setup, trainer, val_metrics, thresholds)
            summary = write_summary(params, bad_total, val_metrics)
            mlflow.log_metrics(val_metrics, step=steps)
            log_model(model_sha256)
            publish(run_id, model_sha256)
            mlflow.set_tag("stage", "trained")
    except Exception as err:
        if not is_store_error(err):
            raise
        pending = (PENDING_DIR / MODEL_FILE.name).is_file()
        kept = (
            f"the trained model and its metrics wait in {PENDING_DIR}/, the training state in {STATE_FILE}"
            if pending
            else f"the training state is kept in {STATE_FILE} (its last checkpoint)"
        )
        raise store_failed(
            uri,
            err,
            f"{MODEL_FILE} and {TRAIN_METRICS} are unchanged (dvc.lock still describes them); {kept}: once the "
            "store works again, `dvc repro` (or `hdmap-ad train` with the same settings) continues from there and "
            "logs them" + (" without retraining" if pending else ""),
        ) from None
    return {
        **summary,
        "run_id": run_id,
        "experiment_id": experiment_id,
        "thresholds": thresholds,
        "val": val_metrics,
    }
