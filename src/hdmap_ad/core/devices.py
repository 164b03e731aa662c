"""CUDA devices of a repository's processes: each training process on a multi-GPU machine claims a GPU
of its own (DVC queue workers share one environment, so CUDA_VISIBLE_DEVICES cannot tell them apart)."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import IO

LOCK_SUBDIR = Path(".dvc/tmp/gpu-locks")

# ------------------------------------------------------------------------------ one GPU per process

_CLAIMED: tuple[str, IO] | None = None


def cuda_device_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _lock_names(n: int) -> list[str]:
    """Name locks after the physical GPU when CUDA_VISIBLE_DEVICES remaps ordinals, else after the ordinal."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if len(visible) >= n:
        return [re.sub(r"[^A-Za-z0-9_.-]", "_", v) for v in visible[:n]]
    return [str(i) for i in range(n)]


def claim_cuda_device(
    spec: str = "auto",
    *,
    device_count: int | None = None,
    lock_dir: Path | str | None = None,
    wait: bool = True,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
) -> str | None:
    """Claim a CUDA device of its own for this process; return "cuda:N", or None to keep the default choice.

    Only acts when `spec` is "auto" and more than one CUDA device is visible (`device_count` fakes the
    count in tests). Takes an exclusive `fcntl.flock` on `<repo>/.dvc/tmp/gpu-locks/gpu-<id>.lock` for the
    lowest free GPU and keeps it for the life of the process (the kernel drops it when the process ends,
    however it ends). Calling again in the same process returns the same device. When every GPU is
    claimed: with `wait` it waits (printing once) until one is free or `timeout_s` passes, else returns None.
    """
    global _CLAIMED
    if spec != "auto":
        return None
    if _CLAIMED is not None:
        return _CLAIMED[0]
    n = cuda_device_count() if device_count is None else int(device_count)
    if n <= 1:
        return None
    import fcntl

    from hdmap_ad.core.paths import repo_root

    folder = Path(lock_dir) if lock_dir is not None else repo_root() / LOCK_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    names = _lock_names(n)
    started, announced = time.monotonic(), False
    while True:
        for i, name in enumerate(names):
            handle = open(folder / f"gpu-{name}.lock", "a+")  # noqa: SIM115  (held open on purpose)
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}\n")
            handle.flush()
            _CLAIMED = (f"cuda:{i}", handle)
            return _CLAIMED[0]
        if not wait or (timeout_s is not None and time.monotonic() - started >= timeout_s):
            return None
        if not announced:
            print(
                f"all {n} GPUs are claimed by other processes of this repository ({folder}); waiting for one",
                file=sys.stderr,
                flush=True,
            )
            announced = True
        time.sleep(poll_s)


def release_cuda_device() -> None:
    """Give the claimed GPU back before the process ends (tests; normally the exit releases it)."""
    global _CLAIMED
    if _CLAIMED is not None:
        _CLAIMED[1].close()
        _CLAIMED = None


# ----------------------------------------------------------------------------------- the DVC queue
