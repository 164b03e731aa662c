"""What gpu-check runs: the shapes of each size (paper on a GPU, tiny on the CPU) and the training runs per
device type."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_OUT = Path("benchmarks/results/gpu-check")


TINY_ENCODER = {"depth": 10, "embed_dim": 32, "num_heads": 2}


@dataclass(frozen=True)
class Shapes:
    """What one gpu-check size runs: the params profile it starts from, the data, and the bench case."""

    profile: str
    steps: int
    domains: tuple[str, ...]
    n_train: int  # training maps per domain
    n_test: int  # test maps per domain and label
    overrides: tuple[str, ...]
    bench: tuple[str, ...]


SHAPES = {
    "paper": Shapes(
        "paper",
        100,
        ("domain_A", "domain_B", "domain_C", "domain_D"),
        64,
        16,
        ("train.batch_size=16", "evaluate.batch_size=32"),
        ("--size", "392x392", "--batch", "16", "--warmup", "3", "--steps", "10"),
    ),
    "tiny": Shapes(
        "quick",
        6,
        ("domain_A", "domain_C"),
        8,
        4,
        (
            "preprocess.resize=[28, 84]",
            "preprocess.crop=[28, 84]",
            "model.encoder=small",
            f"model.encoder_overrides={json.dumps(TINY_ENCODER)}",
            "train.batch_size=4",
            "train.warmup_steps=1",
            "evaluate.batch_size=16",
            "evaluate.n_examples=2",
        ),
        ("--size", "28x84", "--batch", "2", "--warmup", "1", "--steps", "2", "--no-cache-off"),
    ),
}


@dataclass(frozen=True)
class RunSpec:
    name: str
    amp: str  # train.amp
    cache: str  # runtime.feature_cache


def plan_runs(device_type: str) -> list[RunSpec]:
    if device_type == "cuda":
        return [RunSpec("bf16", "bf16", "on"), RunSpec("fp16", "fp16", "off"), RunSpec("float32", "off", "on")]
    return [RunSpec("bf16", "bf16", "on"), RunSpec("float32", "off", "off")]


def tracking_uri(folder: Path) -> str:
    """The MLflow store of one run's folder."""
    return f"sqlite:///{folder / 'mlflow.db'}"
