"""Figures for evaluation, prediction and comparison (PNG, written atomically).

Uses matplotlib's object-oriented API with the Agg canvas only: no pyplot, no global backend switch, no
GUI; safe to call from any process. Every function writes exactly one PNG and returns its Path.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from hdmap_ad.metrics import roc_points_table  # noqa: F401  (the DVC plots data beside the figures)

DPI = 120
GOOD_COLOR, FAULT_COLOR = "#1f77b4", "#d62728"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: Path) -> Path:
    """Render to memory, write a temporary file beside ``out``, then os.replace it into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    # A unique name opened with "xb" (not mkstemp) so the file gets the usual umask permissions, not 0600.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _grid(n: int, max_cols: int = 2) -> tuple[int, int]:
    cols = max(1, min(n, max_cols))
    return max(1, -(-n // cols)), cols


def _as_image(a: np.ndarray) -> np.ndarray:
    """A 2-D array to show: squeeze, and average channels of a C×H×W or H×W×C map."""
    a = np.squeeze(np.asarray(a, dtype=np.float64))
    if a.ndim == 3:
        a = a.mean(axis=0) if a.shape[0] <= 4 else a.mean(axis=-1)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"cannot show an array of shape {np.shape(a)} as an image")
    return a


def _show(fig: Figure, ax, image: np.ndarray, title: str, cmap: str) -> None:
    img = _as_image(image)
    im = ax.imshow(img, cmap=cmap, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"{img.shape[1]} px", fontsize=8)
    ax.set_ylabel(f"{img.shape[0]} px", fontsize=8)
    ax.tick_params(labelsize=7)


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], out: Path) -> Path:
    """domain -> (labels, scores). Left: full ROC per domain (AUROC in the legend); right: the
    low-FPR region (FPR <= 10%) with the 1% and 5% operating limits marked."""
    fig = _new_figure(12, 5)
    full, zoom = fig.subplots(1, 2)
    for domain, (labels, scores) in curves.items():
        labels, scores = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float64).ravel()
        if len(np.unique(labels)) < 2:
            full.plot([], [], " ", label=f"{domain}: one class only, no curve")
            continue
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        auc = roc_auc_score(labels, scores)
        (line,) = full.step(fpr, tpr, where="post", label=f"{domain}  AUROC {100 * auc:.2f}%")
        zoom.step(fpr, tpr, where="post", color=line.get_color(), label=domain)
    full.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="chance")
    for x, name in ((0.01, "FPR 1%"), (0.05, "FPR 5%")):
        zoom.axvline(x, ls="--", color="grey", lw=1)
        zoom.text(x, 0.02, f" {name}", rotation=90, va="bottom", fontsize=8, color="grey")
    full.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
             title="ROC per domain")
    zoom.set(xlim=(0, 0.1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
             title="ROC, low false-alarm region (FPR ≤ 10%)")
    full.legend(loc="lower right", fontsize=8)
    zoom.legend(loc="lower right", fontsize=8)
    for ax in (full, zoom):
        ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_score_distributions(per_domain: Mapping[str, tuple[np.ndarray, np.ndarray]], out: Path,
                             threshold: Mapping[str, float] | None = None) -> Path:
    """domain -> (good scores, fault scores): one histogram panel per domain, shared bins, with the
    domain's threshold as a vertical line when given."""
    threshold = threshold or {}
    n = max(1, len(per_domain))
    rows, cols = _grid(n)
    fig = _new_figure(6 * cols, 3.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (domain, (good, fault)) in zip(axes, per_domain.items()):
        good = np.asarray(good, dtype=np.float64).ravel()
        fault = np.asarray(fault, dtype=np.float64).ravel()
        both = np.concatenate([good, fault])
        both = both[np.isfinite(both)]
        if both.size:
            lo, hi = float(both.min()), float(both.max())
            bins = np.linspace(lo, hi if hi > lo else lo + 1e-12 + abs(lo) * 1e-6, 41)
            for values, name, color in ((good, "good", GOOD_COLOR), (fault, "fault", FAULT_COLOR)):
                values = values[np.isfinite(values)]
                if values.size:
                    ax.hist(values, bins=bins, alpha=0.55, color=color, label=f"{name} (n={values.size})")
        thr = threshold.get(domain)
        if thr is not None and np.isfinite(thr):
            ax.axvline(thr, color="black", ls="--", lw=1.2, label=f"threshold {thr:.4g}")
        ax.set(title=domain, xlabel="anomaly score (higher = more anomalous)", ylabel="maps")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(per_domain):]:
        ax.set_visible(False)
    fig.suptitle("Anomaly-score distributions: good vs fault")
    return _save(fig, out)


def plot_examples(items: Sequence[tuple[str, np.ndarray, np.ndarray, float, int]], out: Path) -> Path:
    """(title, map, anomaly map, score, label) per row: the input map | its anomaly map, with colorbars."""
    if not items:
        raise ValueError("plot_examples: no examples to plot")
    fig = _new_figure(11, 2.6 * len(items))
    axes = np.asarray(fig.subplots(len(items), 2)).reshape(len(items), 2)
    for (title, map_, amap, score, label), (left, right) in zip(items, axes):
        verdict = "fault" if int(label) == 1 else "good"
        _show(fig, left, map_, f"{title}\ninput map", "viridis")
        _show(fig, right, amap, f"anomaly map — score {float(score):.4g} (label: {verdict})", "inferno")
    return _save(fig, out)


def plot_map_pair(map_: np.ndarray, amap: np.ndarray, title: str, out: Path) -> Path:
    """One input map and its anomaly map side by side."""
    fig = _new_figure(11, 3.2)
    left, right = fig.subplots(1, 2)
    _show(fig, left, map_, "input map", "viridis")
    _show(fig, right, amap, "anomaly map", "inferno")
    fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def plot_seed_comparison(values: Mapping[str, Mapping[int, float]], metric: str, domain: str, out: Path) -> Path:
    """method -> seed -> value: one column per method, one marker per seed (same marker/colour for a
    seed across methods), a horizontal bar at the mean and a ±std (ddof=1) whisker."""
    seeds = sorted({int(s) for per_seed in values.values() for s in per_seed})
    colors = {s: f"C{i % 10}" for i, s in enumerate(seeds)}
    markers = "osD^vP*Xph"
    fig = _new_figure(max(5.0, 1.6 * len(values) + 2.5), 4.5)
    ax = fig.subplots()
    offsets = np.linspace(-0.18, 0.18, len(seeds)) if len(seeds) > 1 else np.zeros(1)
    for x, (method, per_seed) in enumerate(values.items()):
        finite = {int(s): float(v) for s, v in per_seed.items() if v is not None and np.isfinite(v)}
        for k, seed in enumerate(seeds):
            if seed in finite:
                ax.scatter(x + offsets[k], finite[seed], color=colors[seed], marker=markers[k % len(markers)],
                           s=40, zorder=3, label=f"seed {seed}")
        if finite:
            vals = np.array(list(finite.values()))
            mean = vals.mean()
            ax.hlines(mean, x - 0.3, x + 0.3, color="black", lw=2, zorder=4)
            if vals.size > 1:
                ax.errorbar(x, mean, yerr=vals.std(ddof=1), color="black", capsize=6, lw=1, zorder=4)
            ax.annotate(f"{mean:.4g}", (x + 0.32, mean), va="center", fontsize=8)
    ax.set_xticks(range(len(values)), list(values), rotation=15)
    ax.set_xlim(-0.6, len(values) - 0.4 + 0.3)
    ax.set(ylabel=metric, title=f"{metric} — {domain}: per seed (markers), mean (bar) ± std (ddof=1)")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        unique = dict(zip(labels, handles))  # one legend entry per seed
        ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)

