"""Device, precision, seeding, threads, and terminal progress: the run-time knobs every stage shares."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hdmap_ad.errors import HdmapError

console = Console(stderr=True)
if not console.is_terminal:  # DVC logs and pipes: keep tables readable instead of 80 columns wide
    console = Console(stderr=True, width=140)


def select_device(spec: str) -> torch.device:
    """`auto` picks CUDA when present (with several GPUs, one of its own per process, so parallel
    grid workers spread over the GPUs); an explicit CUDA device that is missing is an error."""
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        from hdmap_ad.grid import claim_cuda_device

        device = torch.device(claim_cuda_device("auto") or "cuda")
        if device.index is not None:
            torch.cuda.set_device(device)  # code that uses "the current CUDA device" lands there too
        return device
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HdmapError(f"train.device={spec!r} but CUDA is not available on this machine (use auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HdmapError(f"train.device={spec!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA only; CPU runs in float32 so results are exact and repeatable."""
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(num_threads: int) -> None:
    """0 = leave torch's default (one thread per physical core)."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StepProgress:
    """A rich progress bar on a terminal; one plain line per `every` steps elsewhere (DVC queue logs)."""

    def __init__(self, total: int, description: str, every: int = 10, start: int = 0, quiet_below: int = 0) -> None:
        self.total, self.description, self.every = total, description, max(1, every)
        self.quiet_below = quiet_below  # plain logs: say nothing for loops this short
        self.done = start
        self.interactive = console.is_terminal and not os.environ.get("CI")
        self._progress: Progress | None = None
        if self.interactive:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
            )
            self._task = self._progress.add_task(description, total=total, completed=start, info="")

    def __enter__(self) -> "StepProgress":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, advance: int = 1, info: str = "") -> None:
        self.done += advance
        self.info = info or getattr(self, "info", "")
        if self._progress is not None:
            self._progress.update(self._task, advance=advance, info=self.info)
        elif advance and self.quiet_below < self.total and (self.done % self.every == 0 or self.done == self.total):
            print(f"{self.description} {self.done}/{self.total} {self.info}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def progress_iter(total: int, description: str) -> Iterator[StepProgress]:
    """Progress for batch loops (evaluation, caching) where plain logs need only a few lines."""
    with StepProgress(total, description, every=max(1, -(-total // 4)), quiet_below=2) as bar:
        yield bar
