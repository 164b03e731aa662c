"""bench's terminal tables: the results per case and phase, the batch/thread sweep, float32 vs bf16, and
the paper-size feature-cache estimate."""

from __future__ import annotations

import math
from typing import Any

from hdmap_ad.apps.bench.spec import PHASE_LABEL


def cache_text(c: dict[str, Any]) -> str:
    fits = "fits" if c["cuda_gib"] <= c["feature_cache_max_gb"] else "does NOT fit"
    return (
        f"feature cache, paper setting ({c['n_maps']} maps, ViT-{c['encoder'][0].upper()}/14, "
        f"{c['crop'][0]}x{c['crop'][1]}): {c['cuda_gib']:.1f} GiB on CUDA with amp={c['amp']} "
        f"({c['per_map_mib_cuda']:.2f} MiB/map; {fits} under feature_cache_max_gb={c['feature_cache_max_gb']:g}), "
        f"{c['cpu_gib']:.1f} GiB in float32 on CPU. feature_cache=auto caches only under feature_cache_max_gb "
        f"and half the free memory, and encodes per batch otherwise."
    )


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def results_table(result: dict[str, Any]):
    from rich.table import Table

    peak = ", ".join(f"{p['gflops']:.0f} GFLOP/s {prec}" for prec, p in result.get("matmul_peaks", {}).items())
    table = Table(
        title=f"hdmap-ad bench on {result['device']} ({result['cpu']}, {result['threads']} threads); "
        f"matmul peak {peak}; median over {result['settings']['steps']} steps "
        f"x {result['settings']['repeat']} run(s)"
    )
    for col in (
        "case",
        "phase",
        "impl",
        "img/s",
        "ms/img",
        "peak MB",
        "GFLOP/img",
        "GFLOP/s",
        "% peak",
        "speed-up\nours/anomalib",
        "memory\nours/anomalib",
    ):
        table.add_column(col, justify="left" if col in ("case", "phase", "impl") else "right")
    for case in result["cases"]:
        ph, r = case["phases"], case["ratios"]
        for key, (kind, impl) in PHASE_LABEL.items():
            m = ph.get(key)
            if m is None:
                continue
            speed = mem = None
            if key == "ours_train_cache_on":
                speed, mem = r["train_speedup_cache_on"], r["train_memory_ratio_cache_on"]
            elif key == "ours_train_cache_off":
                speed, mem = r["train_speedup_cache_off"], r["train_memory_ratio_cache_off"]
            elif key == "ours_infer":
                speed, mem = r["infer_speedup"], r["infer_memory_ratio"]
            table.add_row(
                case["name"],
                kind,
                impl,
                _fmt(m["images_per_s"]),
                _fmt(m["ms_per_image"], 1),
                _fmt(m["peak_mb"], 0),
                _fmt(m["flops_per_image"] / 1e9, 2),
                _fmt(m.get("gflops_achieved"), 1),
                _fmt(m.get("pct_of_matmul_peak"), 0),
                _fmt(speed) + ("x" if speed else ""),
                _fmt(mem) + ("x" if mem else ""),
            )
        table.add_section()
    table.caption = (
        "speed-up = ours img/s / anomalib img/s (>1: ours faster); memory = ours peak / anomalib peak "
        "(<1: ours leaner); peak MB on CPU = RSS high-water of the phase's process above its RSS after "
        "imports; cache-on GFLOP/img excludes the once-per-map encoder pass"
    )
    return table


def sweep_table(result: dict[str, Any]):
    from rich.table import Table

    cols = ["ours_train_cache_on", "ours_train_cache_off", "anomalib_train", "ours_infer", "anomalib_infer"]
    table = Table(title="time per image vs tokens per image (ms/img)")
    for col in ("size", "batch", "precision", "tokens/img", *cols):
        table.add_column(col, justify="right")
    for case in sorted(result["cases"], key=lambda c: (c["tokens_per_image"], c["batch"], c["precision"])):
        ph = case["phases"]
        table.add_row(
            f"{case['crop'][0]}x{case['crop'][1]}",
            str(case["batch"]),
            case["precision"],
            str(case["tokens_per_image"]),
            *[_fmt(ph[c]["ms_per_image"], 1) if c in ph else "-" for c in cols],
        )
    return table


def precision_table(result: dict[str, Any]):
    from rich.table import Table

    table = Table(title="bf16 autocast vs float32, same case and phase (img/s ratio; > 1: bf16 faster)")
    for col in ("case", "phase", "precision", "speed-up vs float32"):
        table.add_column(col, justify="right")
    for row in result["precision_speedups"]:
        table.add_row(row["case"], row["phase"], row["precision"], _fmt(row["speedup_vs_float32"]) + "x")
    return table
