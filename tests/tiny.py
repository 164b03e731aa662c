"""The one tiny model the tests build and train.

A 10-block ViT with 32-d embeddings (random weights) reads 28×84 inputs: big enough for every code
path (all target blocks exist, both fuse groups are filled), small enough that a training step takes
milliseconds. Tests add only the settings they are about on top of these:

    params = tiny.params("train.steps=6", prepared=prepared_dir)
    model = Dinomaly(tiny.model_config(image_size=(28, 42)))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import shipped

ENCODER: dict[str, int] = {"depth": 10, "embed_dim": 32, "num_heads": 2}
SIZE: tuple[int, int] = (28, 84)
MODEL: list[str] = [
    f"preprocess.resize={list(SIZE)}",
    f"preprocess.crop={list(SIZE)}",
    "model.encoder=small",
    "model.weights=random",
    f"model.encoder_overrides={json.dumps(ENCODER)}",
]
TRAINING: list[str] = [
    "train.steps=4",
    "train.batch_size=4",
    "train.warmup_steps=1",
    "train.val_every=1000",
    "runtime.device=cpu",
    "runtime.log_every=2",
    "runtime.checkpoint_every=2",
    "evaluate.batch_size=16",
    "evaluate.n_examples=2",
]


def params(*extra: str, prepared: Path | str | None = None):
    """The shipped params with the tiny model and a few-step training, then `extra` overrides."""
    from hdmap_ad.core.config import load_params

    data = [f"data.prepared={prepared}"] if prepared is not None else []
    return load_params(shipped.params_file(), [*MODEL, *TRAINING, *data, *extra])


def model_config(**overrides: Any):
    """A DinomalyConfig of the tiny encoder (image size 28×42 unless overridden)."""
    from hdmap_ad.core.model import DinomalyConfig

    return DinomalyConfig(
        **{
            "encoder": "small",
            "weights": "random",
            "image_size": (28, 42),
            "encoder_overrides": dict(ENCODER),
            **overrides,
        }
    )
