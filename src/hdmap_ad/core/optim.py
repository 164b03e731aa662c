"""StableAdamW and the warm-cosine learning-rate schedule of Dinomaly (docs/design.md#4-optimisation).

StableAdamW (Wortsman et al. 2023, "Stable and low-precision training for large-scale
vision-language models") is AdamW whose step is shrunk, per parameter tensor, by the RMS of the
update ratio g/(√v̂+ε) when that RMS exceeds `clip_threshold`: a gradient far larger than its
running second moment (a spike) cannot produce a huge step. No maintained library ships this exact
variant with AMSGrad, so it is written out here; the update per tensor p with gradient g is

    p ← p·(1 − lr·wd)                                   decoupled weight decay, not clipped
    m ← β1·m + (1−β1)·g,   v ← β2·v + (1−β2)·g²,   v_max ← max(v_max, v)   (amsgrad)
    d = √v_max / √(1−β2^t) + ε
    s = max(1, RMS(g / d) / clip_threshold)
    p ← p − lr / (1−β1^t) / s · m / d

With s = 1 this is exactly `torch.optim.AdamW(amsgrad=True)`.

Speed: the update is memory-bound (a few passes over every parameter-sized tensor), and written
as separate tensor ops it also allocates several parameter-sized temporaries per tensor and step.
By default (`fused=None`) the AdamW part therefore runs in torch's fused AdamW kernel (one pass;
CPU and CUDA), called per tensor with lr/s; s is computed first in a reused scratch buffer. The
decay must not be scaled by s: on CPU it enters the kernel as wd·s, on CUDA (where s stays on the
device, no host sync) it is a pass of its own. `fused=False` is the plain op-by-op reference;
tests hold the two together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class StableAdamW(torch.optim.Optimizer):
    """AdamW with per-tensor update-RMS clipping (see the module docstring for the update)."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        clip_threshold: float = 1.0,
        fused: bool | None = None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        if not clip_threshold > 0.0:
            raise ValueError(f"invalid clip_threshold {clip_threshold}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            clip_threshold=clip_threshold,
        )
        super().__init__(params, defaults)
        self.fused = fused
        self._scratch: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # not state: never saved

    def _use_fused(self, p: Tensor) -> bool:
        if self.fused is False or not hasattr(torch, "_fused_adamw_"):
            return False
        return p.device.type in ("cpu", "cuda") and p.dtype in (
            torch.float64,
            torch.float32,
            torch.float16,
            torch.bfloat16,
        )

    def _buffer(self, like: Tensor) -> Tensor:
        """A scratch tensor shaped like `like`, carved from one growing flat buffer per device/dtype."""
        key = (like.device, like.dtype)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = self._scratch[key] = torch.empty(like.numel(), device=like.device, dtype=like.dtype)
        return buf[: like.numel()].view(like.shape)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._steps: dict[tuple[torch.device, int], Tensor] = {}  # the step count as the fused kernel wants it
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("StableAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"]
                bias_correction1 = 1.0 - beta1**t
                bias_correction2 = 1.0 - beta2**t

                if self._use_fused(p):
                    self._fused_update(p, grad, state, group, t)
                    continue
                p.mul_(1.0 - lr * wd)
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                if group["amsgrad"]:
                    second = state["max_exp_avg_sq"]
                    torch.maximum(second, exp_avg_sq, out=second)
                else:
                    second = exp_avg_sq
                denom = (second.sqrt() / math.sqrt(bias_correction2)).add_(eps)
                # RMS of the would-be unscaled update ratio; kept as a tensor so no GPU sync per tensor.
                rms = torch.linalg.vector_norm(grad / denom) / math.sqrt(grad.numel())
                shrink = torch.clamp(rms / group["clip_threshold"], min=1.0)
                p.add_(exp_avg / denom * (-(lr / bias_correction1) / shrink))
        return loss

    def _fused_update(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any], t: int) -> None:
        """The same update as the reference branch of `step`: s from the updated second moment
        (computed in scratch, before the fused kernel updates the moments), then decay and AdamW
        with lr/s in one fused pass."""
        lr, wd, eps, amsgrad = group["lr"], group["weight_decay"], group["eps"], group["amsgrad"]
        beta1, beta2 = group["betas"]
        # Each op is a pass over memory, so the algebra is arranged for few of them: with
        # c = 1/sqrt(1 - beta2^t), d = c*sqrt(v) + eps and g/d = (g/c) / (sqrt(v) + eps/c).
        c = 1.0 / math.sqrt(1.0 - beta2**t)
        ratio = self._buffer(grad)
        torch.mul(grad, grad, out=ratio)
        torch.lerp(state["exp_avg_sq"], ratio, 1.0 - beta2, out=ratio)  # v_t = beta2*v + (1-beta2)*g^2
        if amsgrad:
            torch.maximum(ratio, state["max_exp_avg_sq"], out=ratio)  # max(v_max, v_t)
        ratio.sqrt_().add_(eps / c)  # d / c
        torch.div(grad, ratio, out=ratio)  # c * g / d
        norm = torch.linalg.vector_norm(ratio)  # c * sqrt(n) * RMS(g/d)
        k = 1.0 / (c * math.sqrt(grad.numel()) * group["clip_threshold"])  # s = max(1, k * norm)
        if p.device.type == "cpu":
            # A host value is free here: plain floats instead of tiny tensor ops, and the decay
            # goes into the kernel as wd*s, so that its factor 1 - (lr/s)(wd*s) is the unclipped one.
            shrink = max(1.0, float(norm) * k)
            lr_t: float | Tensor = lr / shrink
            kernel_wd = wd * shrink
        else:  # a device tensor: no host sync per parameter; the decay is a pass of its own
            lr_t = (lr / torch.clamp(norm * k, min=1.0)).to(
                torch.float64 if p.dtype == torch.float64 else torch.float32
            )
            kernel_wd = 0.0
            p.mul_(1.0 - lr * wd)
        key = (p.device, t)
        if key not in self._steps:
            self._steps[key] = torch.full((), float(t), device=p.device, dtype=torch.float32)
        max_sq = [state["max_exp_avg_sq"]] if amsgrad else []
        torch._fused_adamw_(
            [p],
            [grad],
            [state["exp_avg"]],
            [state["exp_avg_sq"]],
            max_sq,
            [self._steps[key]],
            lr=lr_t,
            beta1=beta1,
            beta2=beta2,
            weight_decay=kernel_wd,
            eps=eps,
            amsgrad=amsgrad,
            maximize=False,
        )


def warm_cosine_lr(
    step: int, base_lr: float, final_lr: float, total_steps: int, warmup_steps: int, *, reach_final_at_last: bool = True
) -> float:
    """Learning rate for 0-based `step`: linear warm-up, then cosine decay.

    Warm-up (step < W): ``base·step/(W−1)``, i.e. ``linspace(0, base, W)`` as in the original, so
    step 0 has lr 0 and step W−1 has the full lr. Cosine (W ≤ step): ``final + ½(base−final)(1 +
    cos(π·(step−W)/L))`` with L = T−1−W, so the last step T−1 ends exactly at `final`
    (docs/design.md#opt-schedule; #dev-schedule says why). `reach_final_at_last=False` gives the
    original Dinomaly's L = T−W (it reaches `final` at step T, one past the last). Steps ≥ T stay
    at `final`.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return base_lr * step / (warmup_steps - 1) if warmup_steps > 1 else 0.0
    span = total_steps - 1 - warmup_steps if reach_final_at_last else total_steps - warmup_steps
    if step >= total_steps or span <= 0:
        return float(final_lr)
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))
