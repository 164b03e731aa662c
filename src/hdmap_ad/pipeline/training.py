"""The one training loop: any method, seeded, resumable, with health checks and MLflow logging."""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hdmap_ad.core import checkpoint
from hdmap_ad.core.config import Params, flatten
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.features import FeatureSource, make_feature_source
from hdmap_ad.core.files import write_json
from hdmap_ad.core.inference import score_maps
from hdmap_ad.core.optim import StableAdamW, warm_cosine_lr
from hdmap_ad.core.paths import MODEL_FILE, RUN_FILE, STATE_FILE, TRAIN_METRICS
from hdmap_ad.core.runtime import (
    StepProgress,
    autocast,
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
from hdmap_ad.pipeline.metrics import image_metrics


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


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Shuffled epochs without replacement, dropping the ragged tail; a pure function of the step,
    so a resumed run draws exactly the batches the uninterrupted run would have."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[pos * batch_size : (pos + 1) * batch_size]


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


def _grad_health(parameters: list[torch.nn.Parameter]) -> int:
    return int(sum((~torch.isfinite(p.grad)).sum().item() for p in parameters if p.grad is not None))


@dataclass
class StepResult:
    loss: float  # NaN/Inf when the loss was not finite
    nan_count: int  # non-finite gradient elements (0 when no backward ran)
    total_norm: float  # gradient norm before clipping (NaN when no backward ran)
    info: dict[str, float]

    @property
    def good(self) -> bool:
        """The update was applied: finite loss, finite gradients."""
        return math.isfinite(self.loss) and self.nan_count == 0 and math.isfinite(self.total_norm)


def build_optimizer(model, method, params: Params, device: torch.device) -> tuple[StableAdamW, torch.amp.GradScaler]:
    """StableAdamW over the trainable model parameters plus the method's own groups (each with its
    `lr_mult`), and the loss scaler (active only for fp16 autocast on CUDA). Training and the benchmark
    both use exactly this."""
    t = params.train
    groups = [{"params": model.trainable_parameters(), "lr": t.lr, "lr_mult": 1.0, "name": "model"}]
    for g in method.param_groups(t.lr):
        groups.append({"lr_mult": 1.0, **g})
    optimizer = StableAdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay, amsgrad=True)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and t.amp == "fp16")
    return optimizer, scaler


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


def train_step(
    model,
    method,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    features: FeatureSource,
    idx: np.ndarray,
    domain_ids: np.ndarray,
    step: int,
    params: Params,
    device: torch.device,
) -> StepResult:
    """One optimisation step on the maps `idx`: decode their features, the method's loss, and, when
    loss and gradients are finite, a clipped StableAdamW update (otherwise the update is skipped).
    The training loop and `hdmap-ad bench` both run exactly this."""
    t_params = params.train
    all_params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = torch.from_numpy(domain_ids).to(device)
    feats = features.batch(idx)
    method.begin_step(step)
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, t_params.amp):
        recon = model.decode(feats)
        loss, info = method.loss(recon, ids, step)
    loss_value = float(loss.detach())
    nan_count, total_norm = 0, float("nan")
    if math.isfinite(loss_value):
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads = [p.grad for p in all_params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        total_norm = float(norm)
        if math.isfinite(total_norm):
            torch.nn.utils.clip_grads_with_norm_(all_params, t_params.grad_clip, norm)
        else:  # only now count the bad elements (a full pass over the gradients); the update is skipped
            nan_count = _grad_health(all_params)
    result = StepResult(loss_value, nan_count, total_norm, info)
    if result.good:
        scaler.step(optimizer)
        scaler.update()
    else:
        if math.isfinite(loss_value):
            scaler.update()  # fp16: an overflow must lower the loss scale, or it recurs every step
        optimizer.zero_grad(set_to_none=True)
    return result


def code_files(entry: str = __name__) -> list[Path]:
    """The source files of `entry` and every hdmap_ad module it imports, directly or not (anywhere in a
    file, as the DVC stage deps are checked), with the packages' __init__ files: the code training runs."""
    src = Path(__file__).resolve().parents[2]  # the folder holding the hdmap_ad package

    def source(module: str) -> Path | None:
        base = src / module.replace(".", "/")
        for f in (base / "__init__.py", base.with_suffix(".py")):
            if f.is_file():
                return f
        return None  # a name imported from a module, not a module

    seen: dict[str, Path] = {}
    todo = [entry]
    while todo:
        module = todo.pop()
        if module in seen or (f := source(module)) is None:
            continue
        seen[module] = f
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run on import
        for node in ast.walk(ast.parse(f.read_bytes(), str(f))):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        todo = [m for m in todo if m == "hdmap_ad" or m.startswith("hdmap_ad.")]
    return sorted(seen.values())


def code_digest() -> str:
    """Hash of the code training runs (`code_files`): a change there must not resume an old run's state.
    Only that code: the fingerprint is stored in the model file, and DVC reruns train exactly when that
    code changes, so a change elsewhere (compare, the CLI) must not change the model's bytes."""
    src = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for f in code_files():
        h.update(f.relative_to(src).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_fingerprint(params: Params, data_digest: str, precision: str = "") -> str:
    """What a training state must match to be resumed: configuration, code, prepared data and the precision
    train.amp resolved to (train.amp=auto may mean bf16 on one machine and float32 on another)."""
    parts = f"{params.training_fingerprint()}:{code_digest()}:{data_digest}:{precision}"
    return hashlib.sha256(parts.encode()).hexdigest()[:16]


def check_config_unchanged(
    params: Params, expected_config: Path | None, params_file: Path | str | None, overrides: list[str] | None = None
) -> None:
    """Under DVC: the params this run trains with must still be the ones the `configure` stage resolved,
    and params.yaml must still say so. A second `dvc exp run` in the same workspace writes its `-S`
    values into params.yaml before failing on DVC's lock; without this check the first run would finish
    and DVC would record the other values beside a model trained with these."""
    if expected_config is None:
        return
    from hdmap_ad.core.config import load_params

    expected_path = Path(expected_config)
    if not expected_path.is_file():
        raise HdmapError(f"{expected_path}: not found (the DVC `configure` stage writes it; run `dvc repro`)")
    expected = json.loads(expected_path.read_text())
    now = load_params(params_file, overrides).training_config() if params_file is not None else params.training_config()
    if params.training_config() != expected or now != expected:
        raise HdmapError(
            f"params.yaml changed while this run was in progress (it no longer matches {expected_path}); another "
            "`dvc exp run` in this workspace? DVC runs one experiment per workspace at a time: queue them with "
            "`dvc exp run --queue ...` + `dvc queue start`, or use `hdmap-ad grid`. This run was stopped so that "
            "no result is recorded under settings it was not trained with"
        )


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

    check_config_unchanged(params, expected_config, params_file, overrides)
    t_params, run_params = params.train, params.runtime
    set_threads(run_params.num_threads)
    device = select_device(run_params.device)
    prepared = PreparedData.load(Path(prepared_dir or params.data.prepared))
    train_set = load_train_set(prepared, params)
    data_digest = prepared.data_digest()
    precision = resolve_precision(device, t_params.amp, "train.amp")
    console.print(f"precision: {precision_label(precision)} (train.amp={t_params.amp} on {device})")
    fingerprint = run_fingerprint(params, data_digest, precision)

    state = None
    if run_params.resume == "auto" and STATE_FILE.is_file():
        try:
            state = checkpoint.load(STATE_FILE, checkpoint.STATE_KEYS)
        except HdmapError as err:  # truncated, damaged, old format: it must not block every later run
            aside = STATE_FILE.with_name(STATE_FILE.name + ".corrupt")
            os.replace(STATE_FILE, aside)
            console.print(f"[yellow]warning: {err}\n  moved it to {aside}; starting afresh[/]")
            state = None
        if state is not None and state.get("fingerprint") != fingerprint:
            console.print(f"[yellow]{STATE_FILE}: from a different configuration, code or data; starting afresh[/]")
            state = None

    seed_everything(params.seed)
    model, method = checkpoint.build(params, train_set.domains, device)
    optimizer, scaler = build_optimizer(model, method, params, device)
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
        console.print(f"resuming from {STATE_FILE} at step {start_step}/{t_params.steps}")

    if t_params.compile:
        model.decoder = torch.compile(model.decoder)
    features: FeatureSource = make_feature_source(model, train_set.maps, params, device)

    experiment_id = tracking.ensure_experiment(params.mlflow.experiment, params.mlflow.tracking_uri)
    if run_id is not None and not tracking.run_exists(run_id):
        console.print(f"[yellow]MLflow run {run_id} of the checkpoint is gone; logging to a new run[/]")
        run_id = None
    comparison_key = params.comparison_key(data_digest)
    resumed_from = None
    if run_id is not None and state is not None and state.get("comparison_key") != comparison_key:
        # Same weights, other settings that the run is compared by (e.g. score.*): the old run keeps its
        # own params and results; this one gets a run of its own.
        console.print(
            f"[yellow]{STATE_FILE}: settings the run is compared by changed (not the weights); "
            "continuing from the checkpoint into a new MLflow run[/]"
        )
        resumed_from, run_id = run_id, None
    new_run = run_id is None
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=experiment_id,
        run_name=tracking.run_name(params, data_digest),
        tags=tracking.run_tags(params, data_digest),
        log_system_metrics=False,
    ) as run:
        run_id = run.info.run_id
        tracking.log_dataset_input(prepared, params.data_root)
        if new_run:
            if resumed_from:
                mlflow.set_tag("resumed_from_run", resumed_from)
            mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params.resolved()).items()})
            mlflow.log_params(
                {
                    "n_train_maps": len(train_set.maps),
                    "device": str(device),
                    "train.amp_resolved": precision,
                    "feature_cache": features.describe(),
                    "fingerprint": fingerprint,
                }
            )

        def save_state(step: int) -> None:
            checkpoint.save(
                {
                    "model": checkpoint.trainable_state(model),
                    "method": method.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": {"step": step},
                    "step": step,
                    "rng": rng_state(),
                    "config": params.resolved(),
                    "fingerprint": fingerprint,
                    "run_id": run_id,
                    "comparison_key": comparison_key,
                    "domains": train_set.domains,
                    "history": history,
                    "precision": precision,
                },
                STATE_FILE,
            )

        bad_in_row, bad_total, window_loss, window_n, t_last = (
            0,
            history.get("bad_total", 0),
            0.0,
            0,
            time.perf_counter(),
        )
        model.train()
        method.train()
        with StepProgress(
            t_params.steps, f"train {params.method} seed {params.seed}", every=run_params.log_every, start=start_step
        ) as bar:
            for step in range(start_step, t_params.steps):
                lr = warm_cosine_lr(step, t_params.lr, t_params.final_lr, t_params.steps, t_params.warmup_steps)
                set_lr(optimizer, lr)
                idx = batch_indices(len(train_set.maps), t_params.batch_size, step, params.seed)
                result = train_step(
                    model, method, optimizer, scaler, features, idx, train_set.domain_ids[idx], step, params, device
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
                    mlflow.log_metrics({"train/bad_steps": bad_total, "grad/nan_count": nan_count}, step=step)
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
                    mlflow.log_metrics({k: float(v) for k, v in logs.items()}, step=done)
                    bar.update(0, f"loss {logs['train/loss']:.4f} lr {lr:.2e} {logs['train/images_per_s']:.1f} img/s")
                    window_loss, window_n, t_last = 0.0, 0, now
                if done % t_params.val_every == 0 and done != t_params.steps:
                    val_metrics, _ = validate(model, method, train_set, params, device)
                    mlflow.log_metrics(val_metrics, step=done)
                    bar.note(val_line(done, t_params.steps, val_metrics))
                    history[f"val@{done}"] = val_metrics
                    model.train()
                    method.train()
                history["bad_total"] = bad_total
                # Only after a good update: a checkpoint must never sit on the far side of a divergence.
                if bad_in_row == 0 and (done % run_params.checkpoint_every == 0 or done == t_params.steps):
                    save_state(done)
                bar.update(1)

        check_config_unchanged(params, expected_config, params_file, overrides)
        val_metrics, thresholds = validate(model, method, train_set, params, device)
        mlflow.log_metrics(val_metrics, step=t_params.steps)
        bar.note(val_line(t_params.steps, t_params.steps, val_metrics))
        # No run id in the model file: two machines training one config write the same bytes (dvc.lock
        # records its hash). The run is found through models/run.json or the run's model_sha256 tag.
        final = {
            "model": checkpoint.trainable_state(model),
            "method": method.state_dict(),
            "step": t_params.steps,
            "config": params.resolved(),
            "fingerprint": fingerprint,
            "domains": train_set.domains,
            "thresholds": thresholds,
            "val": val_metrics,
            "map_shape": list(prepared.shape),
            "precision": precision,  # what train.amp resolved to on the machine that trained it
        }
        model_sha256 = checkpoint.save(final, MODEL_FILE)
        mlflow.set_tag("model_sha256", model_sha256)
        mlflow.log_artifact(str(MODEL_FILE), artifact_path="checkpoint")
        from hdmap_ad.pipeline.serving import log_pyfunc_model  # the servable model: runs:/<run id>/model

        log_pyfunc_model(MODEL_FILE)
        write_json({"run_id": run_id, "model_sha256": model_sha256}, RUN_FILE)
        # metrics/train.json (a DVC metric, hashed in dvc.lock) holds what people compare, in percent; the
        # run's ids live in models/run.json, the thresholds in the model
        val_auroc = {
            k.split("/", 1)[1]: (round(100.0 * v, 2) if math.isfinite(v) else None) for k, v in val_metrics.items()
        }
        summary = {"steps": t_params.steps, "bad_steps": bad_total, "val_auroc": val_auroc}
        write_json(summary, TRAIN_METRICS)
        summary = {
            **summary,
            "run_id": run_id,
            "experiment_id": experiment_id,
            "thresholds": thresholds,
            "val": val_metrics,
        }
        mlflow.set_tag("stage", "trained")
    return summary
