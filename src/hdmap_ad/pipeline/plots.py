"""Figures for evaluation, prediction and comparison (PNG, written atomically).

Uses matplotlib's object-oriented API with the Agg canvas only: no pyplot, no global backend switch, no
GUI; safe to call from any process. Every function writes exactly one PNG and returns its Path.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_auc_score, roc_curve

from hdmap_ad.pipeline.metrics import roc_points_table  # noqa: F401  (the DVC plots data beside the figures)

DPI = 120
GOOD_COLOR, FAULT_COLOR = "#1f77b4", "#d62728"
MASK_COLOR = "#00e5ff"  # cyan: visible on both viridis (inputs) and inferno (anomaly maps)


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
    full.set(
        xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title="ROC per domain"
    )
    zoom.set(
        xlim=(0, 0.1),
        ylim=(0, 1.01),
        xlabel="false positive rate",
        ylabel="true positive rate",
        title="ROC, low false-alarm region (FPR ≤ 10%)",
    )
    full.legend(loc="lower right", fontsize=8)
    zoom.legend(loc="lower right", fontsize=8)
    for ax in (full, zoom):
        ax.grid(alpha=0.3)
    return _save(fig, out)


def _roc_at(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TPR of the ROC polyline (fpr, tpr) at each grid FPR, approached from the left and from the right:
    the two differ where the curve rises vertically, so drawing both keeps the ROC's steps."""
    u, first = np.unique(fpr, return_index=True)  # roc_curve's fpr and tpr never decrease
    last = np.r_[first[1:] - 1, len(fpr) - 1]
    lo_v, hi_v = tpr[first], tpr[last]
    k = np.clip(np.searchsorted(u, grid, side="right") - 1, 0, len(u) - 1)
    nxt = np.minimum(k + 1, len(u) - 1)
    span = u[nxt] - u[k]
    frac = np.divide(grid - u[k], span, out=np.zeros_like(grid), where=span > 0)
    between = hi_v[k] + np.clip(frac, 0.0, 1.0) * (lo_v[nxt] - hi_v[k])
    exact = u[k] == grid
    return np.where(exact, lo_v[k], between), np.where(exact, hi_v[k], between)


def roc_grid_table(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], max_points: int = 1000) -> pd.DataFrame:
    """domain -> (labels, scores) as one table for `dvc plots`: column `fpr` and one TPR column per domain
    (named after it) on a common FPR grid, so a plot with `y: {roc.csv: [domain_A, ...]}` draws one line
    per domain. The grid holds every domain's ROC vertices (up to `max_points`, else an even grid); where
    some curve jumps, the FPR appears twice (before and after the jump). A domain with a single class
    gets an empty column: DVC needs every listed column."""
    roc = {}
    for domain, (labels, scores) in curves.items():
        labels, scores = np.asarray(labels).ravel(), np.asarray(scores, dtype=np.float64).ravel()
        if len(np.unique(labels)) == 2:
            fpr, tpr, _ = roc_curve(labels, scores)
            roc[domain] = (fpr, tpr)
    if roc:
        grid = np.unique(np.concatenate([f for f, _ in roc.values()]))
        if grid.size > max_points:
            grid = np.linspace(0.0, 1.0, max_points)
    else:
        grid = np.array([0.0, 1.0])
    lo = {d: _roc_at(f, t, grid)[0] for d, (f, t) in roc.items()}
    hi = {d: _roc_at(f, t, grid)[1] for d, (f, t) in roc.items()}
    jump = np.zeros(grid.size, dtype=bool)
    for d in roc:
        jump |= ~np.isclose(lo[d], hi[d], rtol=0.0, atol=1e-12)
    # rows 2i and 2i+1: grid point i before and after the jumps there (the latter only where some curve jumps)
    keep = np.ones(2 * grid.size, dtype=bool)
    keep[1::2] = jump
    columns = {"fpr": np.repeat(grid, 2)}
    for domain in curves:
        if domain in roc:
            columns[domain] = np.stack([lo[domain], hi[domain]], axis=1).ravel()
        else:
            columns[domain] = np.full(2 * grid.size, np.nan)
    return pd.DataFrame(columns)[keep].reset_index(drop=True)


def plot_score_distributions(
    per_domain: Mapping[str, tuple[np.ndarray, np.ndarray]], out: Path, threshold: Mapping[str, float] | None = None
) -> Path:
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
                    # one filled outline per histogram, not a patch per bin: the same picture, drawn faster
                    ax.hist(
                        values,
                        bins=bins,
                        histtype="stepfilled",
                        alpha=0.55,
                        color=color,
                        label=f"{name} (n={values.size})",
                    )
        thr = threshold.get(domain)
        if thr is not None and np.isfinite(thr):
            ax.axvline(thr, color="black", ls="--", lw=1.2, label=f"threshold {thr:.4g}")
        ax.set(title=domain, xlabel="anomaly score (higher = more anomalous)", ylabel="maps")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 0.25 of a map
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(per_domain) :]:
        ax.set_visible(False)
    fig.suptitle("Anomaly-score distributions: good vs fault")
    return _save(fig, out)


@dataclass
class Example:
    """One row of `plot_examples`: an input map and the model's anomaly map of it."""

    title: str
    map: np.ndarray  # the input map, H×W (a C×H×W map is averaged over channels)
    anomaly_map: np.ndarray  # at any resolution; drawn over `region` of the input
    score: float
    label: int  # 0 good, 1 fault
    mask: np.ndarray | None = None  # ground truth at the input's resolution (H×W, nonzero = fault)
    # (top, left, height, width) in input pixels that the anomaly map covers (the model sees only the
    # centre crop); None: the whole map
    region: tuple[float, float, float, float] | None = None


def _limits(images: Sequence[np.ndarray]) -> tuple[float, float]:
    """One colour range for several images: their joint finite min and max."""
    finite = np.concatenate([a[np.isfinite(a)].ravel() for a in images]) if images else np.zeros(0)
    if not finite.size:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if hi > lo else (lo, lo + 1e-12 + abs(lo) * 1e-6)


def examples_figure(items: Sequence[Example | tuple], title: str = "Example maps") -> Figure:
    """The figure of `plot_examples` (kept separate so tests can inspect its axes)."""
    if not items:
        raise ValueError("plot_examples: no examples to plot")
    examples = [e if isinstance(e, Example) else Example(*e) for e in items]
    inputs = [_as_image(e.map) for e in examples]
    amaps = [_as_image(e.anomaly_map) for e in examples]
    in_lim, a_lim = _limits(inputs), _limits(amaps)
    h, w = inputs[0].shape
    panel_w = 5.0
    panel_h = max(0.6, panel_w * h / w)  # the map's own aspect ratio: a 31×95 map is a wide strip
    n = len(examples)
    fig = _new_figure(2 * panel_w + 0.6, n * (panel_h + 0.45) + 1.3)
    # the colour bars get a row of their own under the maps, one per column
    grid = fig.add_gridspec(n + 1, 2, height_ratios=[panel_h] * n + [0.12])
    axes = np.array([[fig.add_subplot(grid[r, c]) for c in range(2)] for r in range(n)])
    any_mask = any_border = False
    im_in = im_a = None
    for e, img, amap, (left, right) in zip(examples, inputs, amaps, axes):
        H, W = img.shape
        verdict = "fault" if int(e.label) == 1 else "good"
        im_in = left.imshow(
            img,
            cmap="viridis",
            vmin=in_lim[0],
            vmax=in_lim[1],
            interpolation="nearest",
            extent=(-0.5, W - 0.5, H - 0.5, -0.5),
        )
        top, lft, rh, rw = e.region if e.region is not None else (0.0, 0.0, float(H), float(W))
        any_border |= not np.allclose((top, lft, rh, rw), (0.0, 0.0, H, W), atol=1e-6)
        im_a = right.imshow(
            amap,
            cmap="inferno",
            vmin=a_lim[0],
            vmax=a_lim[1],
            interpolation="nearest",
            extent=(lft - 0.5, lft + rw - 0.5, top + rh - 0.5, top - 0.5),
        )
        right.set_facecolor("0.8")  # the border outside the centre crop: not scored by the model
        mask = None if e.mask is None else np.squeeze(np.asarray(e.mask))
        if mask is not None and mask.shape == (H, W) and (mask > 0).any():
            any_mask = True
            for ax in (left, right):
                ax.contour((mask > 0).astype(float), levels=[0.5], colors=MASK_COLOR, linewidths=1.0)
        for ax in (left, right):
            ax.set(xlim=(-0.5, W - 0.5), ylim=(H - 0.5, -0.5), aspect="equal")
            ax.tick_params(labelsize=7)
        left.set_title(f"{e.title}: input", fontsize=9, loc="left")
        right.set_title(f"anomaly map: score {float(e.score):.4g} ({verdict})", fontsize=9, loc="left")
    for c, (im, label) in enumerate(
        ((im_in, "input value (one scale for all inputs)"), (im_a, "anomaly (one scale for all anomaly maps)"))
    ):
        fig.colorbar(im, cax=fig.add_subplot(grid[n, c]), orientation="horizontal", label=label)
    notes = ["cyan outline: ground-truth fault region"] if any_mask else []
    if any_border:
        notes.append("grey border: outside the model's centre crop")
    fig.suptitle("\n".join([title, "; ".join(notes)] if notes else [title]), fontsize=10)
    return fig


def plot_examples(items: Sequence[Example | tuple], out: Path, title: str = "Example maps") -> Path:
    """One row per `Example` (or (title, map, anomaly map, score, label[, mask[, region]]) tuple): the
    input map | its anomaly map, both at the input's aspect ratio, with one colour scale for all inputs
    and one for all anomaly maps (so a hot map is hot compared with the others), and the ground-truth
    mask outlined where given. `title` should say how the examples were chosen."""
    return _save(examples_figure(items, title), out)


def plot_map_pair(map_: np.ndarray, amap: np.ndarray, title: str, out: Path) -> Path:
    """One input map and its anomaly map side by side."""
    fig = _new_figure(11, 3.2)
    left, right = fig.subplots(1, 2)
    _show(fig, left, map_, "input map", "viridis")
    _show(fig, right, amap, "anomaly map", "inferno")
    fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def plot_seed_comparison(
    values: Mapping[str, Mapping[int, float]], metric: str, domain: str, out: Path, *, percent: bool = True
) -> Path:
    """method -> seed -> value (fractions; shown in percent unless `percent=False`): one column per
    method with one point per seed (same marker and colour for a seed across methods), a bar at the
    mean and, for n >= 2, the 95% interval mean ± t·sd/√n. The y axis starts at zero, or, when the
    values are far from zero, at a round value below them that the title and an axis break state; the
    visible range is at least 10 points, so a small gap never fills the plot."""
    scale, unit = (100.0, " %") if percent else (1.0, "")
    seeds = sorted({int(s) for per_seed in values.values() for s in per_seed})
    colors = {s: f"C{i % 10}" for i, s in enumerate(seeds)}
    markers = "osD^vP*Xph"
    methods = list(values)
    fig = _new_figure(max(7.0, 1.5 * len(methods) + 3.2), 5.0)
    ax = fig.subplots()
    offsets = np.linspace(-0.16, 0.16, len(seeds)) if len(seeds) > 1 else np.zeros(1)
    shown: list[float] = []
    labels = []
    for x, method in enumerate(methods):
        finite = {int(s): scale * float(v) for s, v in values[method].items() if v is not None and np.isfinite(v)}
        for k, seed in enumerate(seeds):
            if seed in finite:
                ax.scatter(
                    x + offsets[k],
                    finite[seed],
                    color=colors[seed],
                    marker=markers[k % len(markers)],
                    s=36,
                    zorder=3,
                    label=f"seed {seed}",
                )
        shown += list(finite.values())
        n = len(finite)
        if not n:
            labels.append(f"{method}\nno value")
            continue
        mean, half = seed_interval(list(finite.values()))
        ax.hlines(mean, x - 0.3, x + 0.3, color="black", lw=2, zorder=4)
        if half is not None:
            ax.errorbar(x, mean, yerr=half, color="black", capsize=6, lw=1.2, zorder=4)
            # a percentage stays within 0..100: a wider interval runs off the axis rather than stretch it
            shown += [max(mean - half, 0.0), min(mean + half, 100.0)] if percent else [mean - half, mean + half]
        labels.append(f"{method}\nmean {mean:.2f}{unit}\n(n={n})")
    lo, hi, zoomed = comparison_y_range(shown, percent)
    ax.set_ylim(lo, hi)
    ax.set_xticks(range(len(methods)), labels, fontsize=8)
    ax.set_xlim(-0.6, len(methods) - 0.4)
    axis = "y axis from " + (f"{lo:g}{unit} (zoomed, not zero-based)" if zoomed else "zero")
    ax.set_title(
        f"{metric} — {domain}\npoints: seeds · bar: mean · whisker: 95% CI, mean ± t·sd/√n (n ≥ 2)\n{axis}", fontsize=9
    )
    ax.set_ylabel(f"{metric} ({unit.strip()})" if percent else metric)
    if zoomed:
        axis_break_mark(ax)
    handles, names = ax.get_legend_handles_labels()
    if handles:
        unique = dict(zip(names, handles))  # one legend entry per seed
        fig.legend(unique.values(), unique.keys(), fontsize=8, loc="outside right upper")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def seed_interval(vals: Sequence[float], level: float = 0.95) -> tuple[float, float | None]:
    """Mean and the half-width t·sd/√n (sd with ddof=1) of its `level` interval; None for n < 2."""
    from scipy.stats import t

    a = np.asarray(vals, dtype=np.float64)
    mean = float(a.mean())
    if a.size < 2:
        return mean, None
    return mean, float(t.ppf(0.5 + level / 2, a.size - 1) * a.std(ddof=1) / np.sqrt(a.size))


def comparison_y_range(
    shown: Sequence[float], percent: bool = True, min_span: float = 10.0, step: float = 5.0
) -> tuple[float, float, bool]:
    """(low, high, zoomed) for a plot of values (percent): zero-based unless the values sit in the upper
    half; then from a multiple of `step` at least 2 points below the lowest value, never less than
    `min_span` points in all, and `zoomed` says so. Percent plots end at 100 when nothing exceeds it."""
    a = np.asarray([v for v in shown if np.isfinite(v)], dtype=np.float64)
    if a.size == 0:
        return (0.0, 100.0, False) if percent else (0.0, 1.0, False)
    vmin, vmax = float(a.min()), float(a.max())
    if not percent:  # (e.g. a threshold: any scale) zero-based, with room above
        lo, hi = min(0.0, vmin), max(0.0, vmax)
        pad = 0.08 * (hi - lo) or 1.0
        return lo - (pad if lo < 0 else 0.0), hi + pad, False
    hi = 100.0 if vmax <= 100.0 else vmax + 0.05 * (vmax - min(vmin, 0.0))
    lo = step * np.floor((vmin - max(2.0, 0.25 * (vmax - vmin))) / step)
    lo = float(min(lo, step * np.floor((hi - min_span) / step)))
    if lo < hi / 2 or vmin <= 0:  # zooming would hide less than half of the zero-based range: not worth it
        return min(0.0, vmin - 1.0), hi + (1.0 if hi == 100.0 else 0.0), False
    return lo, hi + (0.5 if hi == 100.0 else 0.0), True


def axis_break_mark(ax) -> None:
    """Two slanted strokes across the bottom of the y axis: the axis does not start at zero."""
    kw = dict(transform=ax.transAxes, color="black", clip_on=False, lw=1.2)
    for dy in (0.0, 0.025):
        ax.plot((-0.018, 0.018), (0.01 + dy, 0.035 + dy), **kw)
