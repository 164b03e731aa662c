"""One optimisation step, as the training loop and `hdmap-ad bench` both run it: the batches a step draws,
the optimiser and loss scaler, and the update with its health checks (a non-finite loss or gradient skips
the update)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hdmap_ad.core.config import Params
from hdmap_ad.core.features import FeatureSource
from hdmap_ad.core.optim import StableAdamW
from hdmap_ad.core.runtime import autocast


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Shuffled epochs without replacement, dropping the ragged tail; a pure function of the step,
    so a resumed run draws exactly the batches the uninterrupted run would have."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[pos * batch_size : (pos + 1) * batch_size]


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
