"""What every statistic here shares: the NaN-free rule ("finite or None"), the confidence check, the
labels check, and mean ± sample std.

Every result in this package is NaN-free: a statistic that is undefined (too few pairs, zero
variance, a class missing) is None and its ``note`` says "not computable: <why>". Nothing raises on
data; a wrongly shaped input (a programming error) raises ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

NOT_COMPUTABLE = "not computable: "
STD_NOTE = "std over seeds with ddof=1 (sample standard deviation)"


def finite_or_none(v: Any) -> float | None:
    """float(v) when v is a finite real number, else None (None, NaN, ±Inf, non-numbers)."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def finite_array(values: Sequence[float | None]) -> tuple[np.ndarray, int]:
    """The finite values as float64 and how many non-finite (or None) ones were dropped."""
    arr = np.asarray([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    ok = np.isfinite(arr)
    return arr[ok], int(np.count_nonzero(~ok))


def finite_diffs(diffs: Sequence[float | None]) -> tuple[np.ndarray, list[str]]:
    """The finite paired differences, and the notes a result's `note` starts with (how many were left out)."""
    d, dropped = finite_array(diffs)
    return d, [f"{dropped} non-finite difference(s) left out"] if dropped else []


def all_equal(diffs: np.ndarray) -> bool:
    """Whether the paired differences are all equal up to float rounding. Metrics that move in whole maps
    (TPR at 100 faults: steps of 0.01) give equal differences such as 0.20 − 0.21 and 0.21 − 0.22, which differ
    in the 17th digit; their sd of ~1e-17 would make a t statistic of 1e15 and a p-value of 1e-30."""
    d = np.asarray(diffs, dtype=np.float64)
    return d.size > 0 and float(np.ptp(d)) <= 1e-12 * max(1.0, float(np.max(np.abs(d))))


def check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return confidence


def labels_array(labels: Any) -> np.ndarray:
    """Labels 1 = fault, 0 = good, as a boolean fault mask."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 (good) or 1 (fault)")
    return y.astype(bool)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof=1) of finite values; std is None for fewer than 2 values."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std: no values")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"mean_std: non-finite value among {vals}")
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) >= 2 else None)
