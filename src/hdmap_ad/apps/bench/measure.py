"""Timing, memory and FLOP counting inside a benchmark subprocess, and the matmul peak."""

from __future__ import annotations

import statistics
import time
from typing import Any


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def timed(fn, warmup: int, steps: int, device, clock: str = "wall") -> tuple[list[float], float, list[float]]:
    """Run fn(i) warmup+steps times. Returns the timed steps' seconds on `clock` (wall: elapsed;
    cpu: this process's CPU time, robust to other load when --threads 1), the first call's wall
    seconds (compile / first-touch cost), and the timed steps' other-clock seconds."""
    first, times, other = 0.0, [], []
    for i in range(warmup + steps):
        sync(device)
        w, c = time.perf_counter(), time.process_time()
        fn(i)
        sync(device)
        dw, dc = time.perf_counter() - w, time.process_time() - c
        if i == 0:
            first = dw
        if i >= warmup:
            times.append(dc if clock == "cpu" else dw)
            other.append(dw if clock == "cpu" else dc)
    return times, first, other


def summary(times: list[float], first: float, other: list[float], flops: int, batch: int, clock: str) -> dict[str, Any]:
    return {
        "step_s": statistics.median(times),
        "step_s_mean": statistics.fmean(times),
        "steps_s": times,
        "clock": clock,
        ("wall_s" if clock == "cpu" else "cpu_s"): statistics.median(other),
        "first_step_s": first,
        "flops_per_step": flops,
        "flops_per_image": flops / batch,
        "batch": batch,
    }


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def autocast_for(device, precision: str):
    """The autocast a benchmark precision means, for code that is not ours (ours reads train.amp)."""
    import contextlib

    import torch

    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def phase_matmul(spec: dict[str, Any], device) -> dict[str, Any]:
    """The device's practical matmul peak at the case's precision (square n×n products)."""
    import torch

    precision = spec.get("precision", "float32")
    dtype = {"float32": torch.float32, "bf16": torch.bfloat16}[precision]
    # The largest square product up to the cap that takes ~0.2 s: big enough for the peak, and bounded
    # where a precision is emulated (bf16 on a CPU without native bf16 runs ~1 GFLOP/s).
    cap, n = (8192 if device.type == "cuda" else 2048), 256
    while n < cap:
        a = torch.randn(n, n, device=device, dtype=dtype)
        one, _, _ = timed(lambda i, a=a: a @ a, 1, 1, device, "wall")
        if one[0] > 0.2:
            break
        n *= 2
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times, _, _ = timed(lambda i: a @ b, 3, 10, device, spec.get("clock", "wall"))
    return {
        "n": n,
        "dtype": precision,
        "step_s": None,
        "matmul_s": statistics.median(times),
        "gflops": 2 * n**3 / statistics.median(times) / 1e9,
        "gflops_best": 2 * n**3 / min(times) / 1e9,
    }
