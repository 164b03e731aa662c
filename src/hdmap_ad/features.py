"""Encoder features for training: computed per batch, or cached once.

The encoder is frozen and training uses no augmentation, so each training map's encoder features
never change: computing them once and indexing a cache removes the encoder from every step.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from hdmap_ad.config import Params
from hdmap_ad.model import Dinomaly, EncoderFeatures
from hdmap_ad.preprocess import preprocess
from hdmap_ad.runtime import autocast, console, progress_iter


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
    """All training maps' features, computed once in encoder batches and kept on `device`."""

    def __init__(self, source: OnTheFly, batch_size: int) -> None:
        n = len(source.maps)
        chunks = []
        starts = range(0, n, batch_size)
        with progress_iter(len(starts), "caching encoder features") as bar:
            for start in starts:
                chunks.append(source.encode(np.arange(start, min(n, start + batch_size))))
                bar.update(1)
        self.features = EncoderFeatures.cat(chunks)
        self.device = source.device

    def batch(self, idx: np.ndarray) -> EncoderFeatures:
        return self.features.index(torch.from_numpy(idx).to(self.device))

    def describe(self) -> str:
        return "on"


def make_feature_source(model: Dinomaly, maps: np.ndarray, params: Params, device: torch.device) -> FeatureSource:
    """`feature_cache`: on = cache (fail over to per-batch if memory runs out), off = per batch,
    auto = cache when the estimate fits under `feature_cache_max_gb`."""
    source = OnTheFly(model, maps, params, device)
    mode = params.train.feature_cache
    need = cache_bytes(model, len(maps), params, device)
    if mode == "off" or (mode == "auto" and need > params.train.feature_cache_max_gb * 2**30):
        if mode == "auto":
            console.print(f"feature cache off: needs {need / 2**30:.2f} GiB > train.feature_cache_max_gb="
                          f"{params.train.feature_cache_max_gb}")
        return source
    try:
        cached = Cached(source, params.train.batch_size)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        console.print(f"[yellow]feature cache ({need / 2**30:.2f} GiB) does not fit on {device}; encoding per batch[/]")
        return source
    console.print(f"feature cache on: {len(maps)} maps, {need / 2**30:.3f} GiB on {device}")
    return cached
