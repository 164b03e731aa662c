"""gpu-check's report: what the runs measured (read back from their MLflow stores), side by side (metrics
parity, score agreement, the bench summary), written as gpu-check.json and gpu-check.md, and the checks as a
terminal table."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hdmap_ad.apps.gpucheck.plan import tracking_uri

if TYPE_CHECKING:
    import pandas as pd


PARITY_METRICS = ("auroc", "pixel_auroc")


def metrics_parity(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per metric and domain (and mean, pooled): each precision's value (%) and its difference from float32."""
    ref = next(r for r in runs if r["name"] == "float32")["metrics"]
    rows = []
    for metric in PARITY_METRICS:
        for domain, values in ref.items():
            if metric not in values:
                continue
            value = values[metric]
            row: dict[str, Any] = {"metric": metric, "domain": domain, "float32": value}
            for r in runs:
                if r["name"] != "float32":
                    other = r["metrics"].get(domain, {}).get(metric)
                    row[r["name"]] = other
                    row[f"{r['name']} - float32"] = None if other is None or value is None else other - value
            rows.append(row)
    return rows


def scores_by_file(frame: pd.DataFrame) -> pd.Series:
    """Scores keyed by the last three path parts (test/<label>/<file>: the frame holds one domain)."""
    import pandas as pd

    keys = frame["path"].map(lambda p: "/".join(Path(p).parts[-3:]))
    return pd.Series(frame["score"].to_numpy(float), index=keys)


def agreement(reference: pd.Series, other: pd.Series) -> dict[str, Any]:
    """How closely `other` reproduces `reference` on their common maps: the largest relative score
    difference and the fraction of map pairs that both order the same way."""
    import numpy as np

    common = reference.index.intersection(other.index)
    a, b = reference[common].to_numpy(), other[common].to_numpy()
    if len(common) == 0:
        return {"n": 0, "max_rel_diff": float("nan"), "pairs_same_order": float("nan")}
    rel = np.abs(a - b) / np.maximum(np.abs(a), 1e-12)
    i, j = np.triu_indices(len(a), k=1)
    same = np.sign(a[i] - a[j]) == np.sign(b[i] - b[j])
    return {
        "n": int(len(common)),
        "max_rel_diff": float(rel.max()),
        "median_rel_diff": float(np.median(rel)),
        "pairs_same_order": float(same.mean()) if len(i) else 1.0,
    }


# bench's ratio of our images/s to anomalib's, per phase of ours
SPEEDUP_KEY = {
    "ours_train_cache_on": "train_speedup_cache_on",
    "ours_train_cache_off": "train_speedup_cache_off",
    "ours_infer": "infer_speedup",
}


def bench_summary(result: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for case in result["cases"]:
        for phase, m in case["phases"].items():
            rows.append(
                {
                    "case": case["name"],
                    "precision": case["precision"],
                    "phase": phase,
                    "images_per_s": m.get("images_per_s"),
                    "pct_of_matmul_peak": m.get("pct_of_matmul_peak"),
                    "peak_mb": m.get("peak_mb"),
                    "ours_vs_anomalib": (case.get("ratios") or {}).get(SPEEDUP_KEY.get(phase, "")),
                }
            )
    return {
        "command": result["command"],
        "anomalib": result["anomalib"],
        "matmul_peak_gflops": {p: v["gflops"] for p, v in result["matmul_peaks"].items()},
        "rows": rows,
        "ratios": {c["name"]: c.get("ratios") for c in result["cases"]},
        "precision_speedups": result.get("precision_speedups", []),
    }


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "–" if not math.isfinite(v) else f"{v:.4g}"
        return "–" if v is None else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def _memory(m: dict[str, float] | None) -> float | None:
    if not m:
        return None
    return m.get("peak_allocated_mb", m.get("peak_rss_mb"))


def markdown(report: dict[str, Any]) -> str:
    dev = report["device"]
    mem = "allocator peak (MiB)" if dev["name"].startswith("cuda") else "process RSS peak (MiB)"
    parts = [
        f"# gpu-check on {dev['model']} ({dev['name']}, torch {dev['torch']})",
        "",
        f"`{report['command']}`: {report['wall_s']:.0f} s in all; shapes `{report['shapes']['profile']}`, "
        f"{report['shapes']['steps']} steps per run, encoder weights `{report['shapes']['weights']}`.",
        "",
        "## Checks",
        "",
        _md_table(
            ["check", "ok", "detail"],
            [[c["check"], "yes" if c["ok"] else "**NO**", c["detail"]] for c in report["checks"]],
        ),
        "",
        "## Training runs",
        "",
        _md_table(
            [
                "run",
                "train.amp",
                "feature cache",
                "img/s",
                f"train {mem}",
                f"evaluate {mem}",
                "train s",
                "skipped steps",
            ],
            [
                [
                    r["name"],
                    r["amp"],
                    r["feature_cache"],
                    r["images_per_s"],
                    _memory(r.get("train_memory")),
                    _memory(r.get("evaluate_memory")),
                    r["train_s"],
                    r["bad_steps"],
                ]
                for r in report["runs"]
            ],
        ),
    ]
    if report.get("skipped"):
        parts += ["", "Not run here: " + "; ".join(report["skipped"]) + "."]
    names = [r["name"] for r in report["runs"] if r["name"] != "float32"]
    parts += [
        "",
        "## Metrics by training precision (%, float32 inference)",
        "",
        _md_table(
            ["metric", "domain", "float32", *[f"{n} (Δ)" for n in names]],
            [
                [
                    p["metric"],
                    p["domain"],
                    p["float32"],
                    *[f"{_num(p.get(n))} ({_num(p.get(f'{n} - float32'), signed=True)})" for n in names],
                ]
                for p in report["parity"]
            ],
        ),
    ]
    pr, rs, pf = report["predict"], report["resume"], report["pyfunc"]
    lines = []
    if pr:
        b = pr["bf16 inference"]
        lines += [
            f"- `hdmap-ad predict` vs evaluate ({pr['domain']}): max relative difference {pr['same']['max_rel_diff']:.1e}.",
            f"- bf16 inference of the float32 model: max relative difference {b['max_rel_diff']:.2e} "
            f"(median {b['median_rel_diff']:.1e}); {100 * b['pairs_same_order']:.2f} % of map pairs in the same order.",
        ]
    if pf:
        lines.append(f"- MLflow pyfunc model vs evaluate: max relative difference {pf['max_rel_diff']:.1e}.")
    if rs:
        lines.append(
            f"- Resume: stopped before step {rs['stopped_before_step']}, resumed; "
            + (
                "weights identical to the uninterrupted run's."
                if rs["identical"]
                else f"weights differ by up to {rs['max_abs_diff']:.2e}."
            )
        )
    parts += ["", "## Inference, resume", "", *(lines or ["- not run: see the failed checks"])]
    bench = report.get("bench")
    if bench:
        peaks = ", ".join(f"{p} {g:.4g} GFLOP/s" for p, g in bench["matmul_peak_gflops"].items())
        parts += [
            "",
            "## Benchmark",
            "",
            f"`{bench['command']}`; matmul peak: {peaks}; anomalib: {bench['anomalib'] or 'not installed'}.",
            "",
            _md_table(
                ["case", "phase", "img/s", "% of matmul peak (same precision)", "peak MiB", "ours / anomalib"],
                [
                    [
                        r["case"],
                        r["phase"],
                        r["images_per_s"],
                        r["pct_of_matmul_peak"],
                        r["peak_mb"],
                        r["ours_vs_anomalib"],
                    ]
                    for r in bench["rows"]
                ],
            ),
        ]
    return "\n".join(parts) + "\n"


def _num(v: Any, signed: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def write_report(report: dict[str, Any], out: Path) -> None:
    from hdmap_ad.core.files import write_json, write_text

    write_json(report, out / "gpu-check.json")
    write_text(markdown(report), out / "gpu-check.md")


def checks_table(report: dict[str, Any]):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"gpu-check on {report['device']['model']} ({report['device']['name']})")
    for col in ("check", "ok", "detail"):
        table.add_column(col)
    for c in report["checks"]:
        table.add_row(escape(c["check"]), "[green]yes[/]" if c["ok"] else "[bold red]NO[/]", escape(c["detail"]))
    return table


# --------------------------------------------------------------------------------------------------
# what the runs measured and where they ran


def run_measures(folder: Path, run_id: str) -> dict[str, Any]:
    """Steady-state images/s (median of the logged windows after the first), the feature cache as
    training described it, and the evaluation's headline metrics."""
    import mlflow
    import numpy as np

    from hdmap_ad.pipeline.tracking import curve_name

    client = mlflow.MlflowClient(tracking_uri(folder))
    history = client.get_metric_history(run_id, curve_name("train/images_per_s"))
    rates = [m.value for m in sorted(history, key=lambda m: m.step)]
    steady = rates[1:] or rates
    run = client.get_run(run_id)
    return {
        "images_per_s": float(np.median(steady)) if steady else float("nan"),
        "feature_cache": run.data.params.get("feature_cache", "?"),
        "precision_resolved": run.data.params.get("train.amp_resolved"),
        "metrics": json.loads((folder / "metrics" / "eval.json").read_text()),
    }


def command_line(args: argparse.Namespace) -> str:
    parts = ["hdmap-ad", "gpu-check", "--device", args.device, *[f"--set {s}" for s in args.set]]
    for flag in ("shapes", "steps", "weights"):
        if getattr(args, flag):
            parts += [f"--{flag}", str(getattr(args, flag))]
    if args.no_bench:
        parts.append("--no-bench")
    return " ".join(parts + ["--out", str(args.out)])


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from hdmap_ad.apps.bench.command import cpu_name

    return cpu_name()
