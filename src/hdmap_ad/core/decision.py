"""The decision rule shared by every backend (torch `predict`, the ONNX scorer, the served model).

Torch-free, so the ONNX runtime path can decide without importing PyTorch.
`trained` is any object with a `thresholds` mapping (a `TrainedModel` or an `OnnxScorer`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def threshold_for(trained: Any, domain: str | None, override: float | None = None) -> float | None:
    """`override` > the domain's stored threshold > the pooled one; None when nothing usable is stored."""
    if override is not None:
        return float(override)
    for key in ([domain] if domain else []) + ["pooled"]:
        value = trained.thresholds.get(key)
        if value is not None and math.isfinite(float(value)):
            return float(value)
    return None


def decide(scores: Iterable[float], threshold: float | None) -> list[bool | None]:
    """score >= threshold (as the Youden threshold was chosen); None for a NaN score or no threshold."""
    return [None if threshold is None or not math.isfinite(float(s)) else bool(s >= threshold) for s in scores]


def map_shape(trained: Any) -> tuple[int, int] | None:
    """The H×W the model was trained on (an OnnxScorer's input shape; a checkpoint's map_shape, else
    the synthetic data's size), or None when the model does not record it (then no map is refused)."""
    if hasattr(trained, "input_shape"):
        return tuple(trained.input_shape)
    shape = trained.info.get("map_shape")
    if shape:
        return int(shape[0]), int(shape[1])
    p = trained.params
    if p.synthetic_data:
        return p.synth.height, p.synth.width
    return None


def shape_mismatch(shapes: Iterable[tuple[int, ...]], want: tuple[int, int] | None) -> list[int]:
    """Indices of the maps whose H×W is not `want` (none when `want` is unknown)."""
    return [] if want is None else [i for i, s in enumerate(shapes) if tuple(s) != tuple(want)]
