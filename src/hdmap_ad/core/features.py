"""Encoder features for training: computed per batch, or cached once.

The encoder is frozen and training uses no augmentation, so each training map's encoder features
never change: computing them once and indexing a cache removes the encoder from every step.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from hdmap_ad.core.config import Params
from hdmap_ad.core.model import Dinomaly, EncoderFeatures
from hdmap_ad.core.preprocess import preprocess
from hdmap_ad.core.runtime import autocast, console, progress_iter


class FeatureSource(Protocol):
    def batch(self, idx: np.ndarray) -> EncoderFeatures: ...
    def describe(self) -> str: ...


def tokens_per_image(model: Dinomaly, crop: tuple[int, int]) -> tuple[int, int]:
    """(all tokens T incl. prefix, patch tokens N) for an input of size `crop`."""
    patch = model.encoder.patch_size
    n = (crop[0] // patch) * (crop[1] // patch)
    return model.encoder.num_prefix_tokens + n, n


def cache_bytes(model: Dinomaly, n_maps: int, params: Params, device: torch.device) -> int:
    """Memory a full cache needs: the bottleneck input (all tokens) and each group's patch tokens."""
    t, n = tokens_per_image(model, tuple(params.preprocess.crop))
    per_value = 2 if device.type == "cuda" and params.train.amp != "off" else 4
    return n_maps * (t + len(params.model.fuse_groups) * n) * model.encoder.embed_dim * per_value


class OnTheFly:
    """Preprocess and encode each batch as it is drawn."""

    def __init__(self, model: Dinomaly, maps: np.ndarray, params: Params, device: torch.device) -> None:
        self.model, self.maps, self.params, self.device = model, maps, params, device

    def encode(self, idx: np.ndarray) -> EncoderFeatures:
        batch = torch.from_numpy(np.ascontiguousarray(self.maps[idx])).to(self.device)
        images = preprocess(batch, self.params.preprocess.resize, self.params.preprocess.crop)
        with autocast(self.device, self.params.train.amp):
            return self.model.encode(images)

    def batch(self, idx: np.ndarray) -> EncoderFeatures:
        return self.encode(idx)

    def describe(self) -> str:
        return "off"


class Cached:
    """All training maps' features, computed once in encoder batches and kept on `device`.

    Every chunk is encoded at exactly `batch_size` maps (the ragged tail is padded with repeats
    and the padding dropped): on CPU a GEMM's rounding depends on its row count, so this makes the
    cached features bitwise those a training batch would compute, and cache on == cache off."""

    def __init__(self, source: OnTheFly, batch_size: int) -> None:
        n = len(source.maps)
        batch_size = min(batch_size, n)  # training batches never hold more than n maps
        chunks = []
        starts = range(0, n, batch_size)
        with progress_iter(len(starts), "caching encoder features") as bar:
            for start in starts:
                idx = np.arange(start, min(n, start + batch_size))
                size = len(idx)
                if size < batch_size:
                    idx = np.resize(idx, batch_size)  # repeats, cycling: a full batch
                chunks.append(source.encode(idx).index(torch.arange(size, device=source.device)))
                bar.update(1)
        self.features = EncoderFeatures.cat(chunks)
        self.device = source.device

    def batch(self, idx: np.ndarray) -> EncoderFeatures:
        return self.features.index(torch.from_numpy(idx).to(self.device))

    def describe(self) -> str:
        return "on"


def available_bytes(device: torch.device) -> int:
    """Memory free for a cache now: free device memory on CUDA, available RAM otherwise."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


# A cache may take at most this share of the memory free when it is built: training still needs
# room for the model, optimizer state and activations (and, on CPU, the OS and the loaded maps).
CACHE_SHARE_OF_FREE = 0.5


def cache_decision(mode: str, need: int, max_gb: float, free: int) -> tuple[bool, str]:
    """Whether to cache (`runtime.feature_cache` = mode) and why, for a cache of `need` bytes.

    on: cache unless it cannot fit in the free memory at all; auto: cache when it is under both
    `feature_cache_max_gb` and half the free memory; off: never."""
    gib = need / 2**30
    if mode == "off":
        return False, "feature cache off (runtime.feature_cache=off)"
    if need > free:
        return False, f"feature cache off: needs {gib:.2f} GiB, only {free / 2**30:.2f} GiB free"
    if mode == "auto" and need > max_gb * 2**30:
        return False, f"feature cache off: needs {gib:.2f} GiB > runtime.feature_cache_max_gb={max_gb:g}"
    if mode == "auto" and need > CACHE_SHARE_OF_FREE * free:
        return False, (
            f"feature cache off: needs {gib:.2f} GiB, more than {CACHE_SHARE_OF_FREE:.0%} of the "
            f"{free / 2**30:.2f} GiB free (set runtime.feature_cache=on to force it)"
        )
    return True, f"feature cache on: {gib:.3f} GiB"


def make_feature_source(model: Dinomaly, maps: np.ndarray, params: Params, device: torch.device) -> FeatureSource:
    """A cache when `cache_decision` allows it, else per-batch encoding; a cache that runs out of
    device memory while being built falls back to per-batch encoding."""
    source = OnTheFly(model, maps, params, device)
    need = cache_bytes(model, len(maps), params, device)
    use, why = cache_decision(
        params.runtime.feature_cache, need, params.runtime.feature_cache_max_gb, available_bytes(device)
    )
    if not use:
        if params.runtime.feature_cache != "off":
            console.print(why)
        return source
    try:
        cached = Cached(source, params.train.batch_size)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        console.print(f"[yellow]feature cache ({need / 2**30:.2f} GiB) does not fit on {device}; encoding per batch[/]")
        return source
    console.print(f"{why} for {len(maps)} maps on {device}")
    return cached
