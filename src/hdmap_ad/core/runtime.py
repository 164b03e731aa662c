"""Device, precision, seeding, threads, and terminal progress: the run-time knobs every stage shares."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hdmap_ad.core.errors import HdmapError

console = Console(stderr=True)
if not console.is_terminal:  # DVC logs and pipes: keep tables readable instead of 80 columns wide
    console = Console(stderr=True, width=140)


def select_device(spec: str) -> torch.device:
    """`auto` picks CUDA when present (with several GPUs, one of its own per process, so parallel
    grid workers spread over the GPUs); an explicit CUDA device that is missing is an error."""
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        from hdmap_ad.core.devices import claim_cuda_device

        device = torch.device(claim_cuda_device("auto") or "cuda")
        if device.index is not None:
            torch.cuda.set_device(device)  # code that uses "the current CUDA device" lands there too
        return device
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HdmapError(f"runtime.device={spec!r} but CUDA is not available on this machine (use auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HdmapError(f"runtime.device={spec!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


PRECISIONS = ("auto", "bf16", "fp16", "off")
# CPU features that make bf16 matrix products native (AVX512-BF16 dot products, AMX tiles). Without them
# oneDNN emulates bf16 through float32 and bf16 autocast is slower than float32, not faster.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively: torch's own CPU feature probe (cpuinfo; any OS), or
    the kernel's flags in /proc/cpuinfo where torch has no probe."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        if any(callable(p) and p() for p in probes):
            return True
    except RuntimeError:  # a torch build without cpuinfo: fall through to the kernel's flags
        pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = {word for line in f if line.startswith("flags") for word in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def resolve_precision(device: torch.device, amp: str, key: str = "train.amp") -> str:
    """The autocast precision a setting means on `device`: "bf16", "fp16" or "off" (float32).

    auto: bf16 on a CUDA GPU that supports it and on a CPU with native bf16 matmul
    (`cpu_has_native_bf16`), float32 elsewhere. bf16 asked for explicitly runs on any CPU (emulated
    where not native: slow, but the same arithmetic); fp16 is CUDA-only. `key` names the setting in errors.
    """
    if amp not in PRECISIONS:
        raise HdmapError(f"{key}={amp!r}: expected one of {', '.join(PRECISIONS)}")
    if amp == "off":
        return "off"
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        if amp == "auto":
            return "bf16" if supported else "off"
        if amp == "bf16" and not supported:
            raise HdmapError(f"{key}=bf16 but this GPU has no bf16 support (use fp16, auto or off)")
        return amp
    if device.type == "cpu":
        if amp == "fp16":
            raise HdmapError(
                f"{key}=fp16 is CUDA-only (fp16 autocast with a loss scaler); on CPU use bf16, auto or off"
            )
        if amp == "auto":
            return "bf16" if cpu_has_native_bf16() else "off"
        return "bf16"
    return "off" if amp == "auto" else amp


def precision_label(precision: str) -> str:
    """How logs name a resolved precision."""
    return {"off": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[precision]


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast at the precision `amp` resolves to on `device` (see `resolve_precision`), on CUDA and
    CPU alike, or nothing for float32. Distances, cosine terms, the loss, maps, blur and top-k are
    computed in float32 inside it (hdmap_ad.core.model)."""
    precision = resolve_precision(device, amp)
    if precision == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(num_threads: int) -> None:
    """0 = leave torch's default (one thread per physical core)."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def rng_state() -> dict[str, Any]:
    """Every generator's state as tuples, lists, numbers and CPU uint8 tensors (what a checkpoint
    stores without pickle; the numpy key array becomes a list of ints)."""
    bit_generator, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(bit_generator),
            "key": [int(k) for k in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()` output (also after a trip through JSON, where tuples became lists)."""
    random.setstate(_tuples(state["python"]))
    npy = state["numpy"]
    if isinstance(npy, dict):
        np.random.set_state(
            (
                npy["bit_generator"],
                np.asarray(npy["key"], dtype=np.uint32),
                int(npy["pos"]),
                int(npy["has_gauss"]),
                float(npy["gauss"]),
            )
        )
    else:  # the legacy tuple (a state migrated from format 1: its key array may be a tensor)
        np.random.set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), *npy[2:]))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8) for s in state["cuda"]])


class StepProgress:
    """A rich progress bar on a terminal; one plain line per `every` steps elsewhere (DVC queue logs)."""

    clock = staticmethod(time.monotonic)  # the time source of rates and ETAs (tests replace it)

    def __init__(self, total: int, description: str, every: int = 10, start: int = 0, quiet_below: int = 0) -> None:
        self.total, self.description, self.every = total, description, max(1, every)
        self.quiet_below = quiet_below  # plain logs: say nothing for loops this short
        self.done = start
        self.info = ""
        self._start_done, self._t0 = start, self.clock()  # the rate counts this process's steps only
        self.interactive = console.is_terminal and not os.environ.get("CI")
        self._progress: Progress | None = None
        if self.interactive:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._task = self._progress.add_task(description, total=total, completed=start, info="")

    def __enter__(self) -> StepProgress:
        self._start_done, self._t0 = self.done, self.clock()
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, advance: int = 1, info: str = "") -> None:
        self.done += advance
        self.info = info or self.info
        if self._progress is not None:
            self._progress.update(self._task, advance=advance, info=self.info)
        elif advance and self.quiet_below < self.total and (self.done % self.every == 0 or self.done == self.total):
            print(self.plain_line(), file=sys.stderr, flush=True)

    def plain_line(self) -> str:
        """`<description> 50/150 <info> | 2.31 it/s, elapsed 0:21, ETA 0:43` (the rate over this process's steps)."""
        elapsed = self.clock() - self._t0
        steps = self.done - self._start_done
        timing = f"elapsed {_clock(elapsed)}"
        if steps > 0 and elapsed > 0:
            rate = steps / elapsed
            speed = f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it"
            eta = "done" if self.done >= self.total else f"ETA {_clock((self.total - self.done) / rate)}"
            timing = f"{speed}, {timing}, {eta}"
        info = f" {self.info}" if self.info else ""
        return f"{self.description} {self.done}/{self.total}{info} | {timing}"

    def note(self, text: str) -> None:
        """A line of its own (e.g. a validation result): above the bar on a terminal, plain elsewhere."""
        if self._progress is not None:
            self._progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    """0:43, 12:05, 1:02:09."""
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@contextlib.contextmanager
def progress_iter(total: int, description: str) -> Iterator[StepProgress]:
    """Progress for batch loops (evaluation, caching) where plain logs need only a few lines."""
    with StepProgress(total, description, every=max(1, -(-total // 4)), quiet_below=2) as bar:
        yield bar
