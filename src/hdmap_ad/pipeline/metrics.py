"""Image- and pixel-level anomaly-detection metrics (docs/design.md#6-metrics).

Conventions: scores are higher = more anomalous, label 1 = fault, 0 = good. Every number returned is a
plain Python type (JSON-serialisable). A NaN/Inf score never turns into a number: the metrics come back
with ``valid: False``, every metric ``None`` and the count of bad scores, so the caller can say so loudly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from hdmap_ad.core.config import HEADLINE_METRICS  # noqa: F401  (the metrics runs are compared by)

METRIC_NAMES = (
    "auroc",
    "ap",
    "f1_max",
    "tpr_at_fpr_1",
    "tpr_at_fpr_5",
    "precision",
    "recall",
    "f1",
    "accuracy",
    "threshold",
)
COUNT_NAMES = ("tn", "fp", "fn", "tp")
THRESHOLD_NOTE = "chosen on the evaluated test set (Youden's J)"
# Per-domain extras (added by the caller) that are averaged over domains like the metrics above.
EXTRA_MEAN_METRICS = ("pixel_auroc", "aux_domain_accuracy")
RESERVED_SCOPES = ("mean", "pooled")


def _as_arrays(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (good) or 1 (fault); got {sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}")
    return y.astype(np.int64), s


def tpr_at_fpr(labels, scores, max_fpr: float) -> float:
    """Largest TPR among the exact ROC operating points whose FPR <= max_fpr (no interpolation).

    With n good samples, FPR <= x allows at most floor(x * n) false alarms: with 10 good maps and
    x = 0.01 no false alarm is allowed at all.
    """
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must lie in [0, 1], got {max_fpr}")
    y, s = _as_arrays(labels, scores)
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN/Inf; use image_metrics, which reports them as invalid")
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return float(tpr[fpr <= max_fpr].max())  # fpr[0] == 0, so the selection is never empty


def f1_max(labels, scores) -> float:
    """Best F1 over all thresholds of the precision-recall curve."""
    precision, recall, _ = precision_recall_curve(labels, scores, drop_intermediate=False)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def youden_threshold(labels, scores) -> float:
    """The score that maximises Youden's J = TPR - FPR; predict fault when score >= threshold.

    Only finite ROC thresholds are considered (the "flag nothing" point at +inf is skipped); on ties the
    highest threshold (fewest alarms) wins.
    """
    y = np.asarray(labels).ravel()
    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    fpr, tpr, thresholds = roc_curve(y, scores, drop_intermediate=False)
    # J compared in exact integer arithmetic (J * n_pos * n_neg), so floating rounding cannot break ties.
    tps, fps = np.rint(tpr * n_pos).astype(np.int64), np.rint(fpr * n_neg).astype(np.int64)
    j_scaled = tps * n_neg - fps * n_pos
    finite = np.flatnonzero(np.isfinite(thresholds))
    best = finite[np.argmax(j_scaled[finite])]
    return float(thresholds[best])


def _invalid(n_good: int, n_fault: int, n_bad: int, reason: str) -> dict[str, Any]:
    out: dict[str, Any] = {name: None for name in METRIC_NAMES}
    out.update({name: None for name in COUNT_NAMES})
    out.update(
        {
            "n_good": n_good,
            "n_fault": n_fault,
            "n_bad_scores": n_bad,
            "valid": False,
            "reason": reason,
            "threshold_note": THRESHOLD_NOTE,
        }
    )
    return out


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """All image-level metrics (docs/design.md#metrics-image) for one set of (label, score) pairs.

    Keys: METRIC_NAMES, the confusion counts tn/fp/fn/tp at the Youden threshold, n_good, n_fault,
    n_bad_scores, valid and threshold_note. Invalid input (NaN/Inf scores, only one class present) gives
    ``valid: False``, a ``reason`` and every metric None; it does not raise.
    """
    y, s = _as_arrays(labels, scores)
    n_good, n_fault = int(np.sum(y == 0)), int(np.sum(y == 1))
    n_bad = int(np.sum(~np.isfinite(s)))
    if n_bad:
        return _invalid(n_good, n_fault, n_bad, f"{n_bad} of {s.size} scores are NaN/Inf")
    if n_good == 0 or n_fault == 0:
        return _invalid(
            n_good,
            n_fault,
            0,
            f"only one class present ({n_good} good, {n_fault} fault): ROC-based metrics are undefined",
        )

    threshold = youden_threshold(y, s)
    pred = (s >= threshold).astype(np.int64)
    tp = int(np.sum((pred == 1) & (y == 1)))
    fp = int(np.sum((pred == 1) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y == 1)))
    tn = int(np.sum((pred == 0) & (y == 0)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "auroc": float(roc_auc_score(y, s)),
        "ap": float(average_precision_score(y, s)),
        "f1_max": f1_max(y, s),
        "tpr_at_fpr_1": tpr_at_fpr(y, s, 0.01),
        "tpr_at_fpr_5": tpr_at_fpr(y, s, 0.05),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "accuracy": float((tp + tn) / y.size),
        "threshold": threshold,
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
        "n_good": n_good,
        "n_fault": n_fault,
        "n_bad_scores": 0,
        "valid": True,
        "threshold_note": THRESHOLD_NOTE,
    }


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float | None:
    """AUROC over all pixels (masks N×H×W in {0,1}, anomaly maps of the same shape).

    None when there is no positive (or no negative) pixel, or when a map holds NaN/Inf.
    """
    m = np.asarray(masks)
    a = np.asarray(maps)
    if m.shape != a.shape:
        raise ValueError(f"masks {m.shape} and anomaly maps {a.shape} differ in shape")
    if not np.isfinite(a).all():
        return None
    y = m.ravel() > 0.5
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return None
    return float(roc_auc_score(y, a.ravel()))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summarise(per_domain: Mapping[str, Mapping[str, Any]], pooled: Mapping[str, Any]) -> dict[str, Any]:
    """{<domain>: metrics, "mean": mean over domains, "pooled": pooled}.

    The mean covers METRIC_NAMES (threshold excluded: thresholds of different domains are not comparable)
    plus pixel_auroc / aux_domain_accuracy where present, over the valid domains only. A metric that is
    missing (None) in some valid domain gets a None mean rather than a mean of a subset. If any domain is
    invalid, the mean is marked ``valid: False`` and lists the invalid domains (the numbers over the valid
    domains are still given, for reference).
    """
    clash = [d for d in per_domain if d in RESERVED_SCOPES]
    if clash:
        raise ValueError(f"domain name(s) {clash} clash with the summary keys {RESERVED_SCOPES}")
    valid = [d for d, m in per_domain.items() if m.get("valid") is True]
    invalid = [d for d in per_domain if d not in valid]
    names = [n for n in METRIC_NAMES if n != "threshold"]
    names += [n for n in EXTRA_MEAN_METRICS if any(n in per_domain[d] for d in per_domain)]
    mean: dict[str, Any] = {}
    for name in names:
        values = [per_domain[d].get(name) for d in valid]
        mean[name] = float(np.mean(values)) if values and all(_is_number(v) for v in values) else None
    mean["threshold"] = None  # per-domain thresholds are not comparable; kept as a key for a uniform layout
    mean.update(
        {
            "n_domains": len(valid),
            "domains": valid,
            "valid": not invalid and bool(valid),
            "n_bad_scores": int(sum(per_domain[d].get("n_bad_scores") or 0 for d in per_domain)),
        }
    )
    if invalid:
        mean["invalid_domains"] = invalid
        mean["reason"] = f"mean over {len(valid)} valid domain(s) only; invalid: {', '.join(invalid)}"
    elif not valid:
        mean["reason"] = "no domains"
    out: dict[str, Any] = {d: dict(m) for d, m in per_domain.items()}
    out["mean"] = mean
    out["pooled"] = dict(pooled)
    return out


def roc_points_table(labels, scores, max_points: int = 200) -> list[dict[str, float | None]]:
    """ROC operating points [{"fpr", "tpr", "threshold"}] for DVC plots, at most max_points rows.

    Uses sklearn's roc_curve (collinear points dropped), then keeps evenly spaced points including both
    endpoints. The "flag nothing" point has threshold None (it is +inf). Empty for a single class.
    """
    y, s = _as_arrays(labels, scores)
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN/Inf; pass finite scores only")
    if len(np.unique(y)) < 2:
        return []
    fpr, tpr, thresholds = roc_curve(y, s)
    idx = np.arange(fpr.size)
    if fpr.size > max_points:
        idx = np.unique(np.round(np.linspace(0, fpr.size - 1, max(2, max_points))).astype(int))
    return [
        {
            "fpr": float(fpr[i]),
            "tpr": float(tpr[i]),
            "threshold": float(thresholds[i]) if np.isfinite(thresholds[i]) else None,
        }
        for i in idx
    ]
