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
