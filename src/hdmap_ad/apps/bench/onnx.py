"""`hdmap-ad bench-onnx`: CPU speed of the exported ONNX model against the PyTorch path, side by side.

    hdmap-ad bench-onnx --profiles quick paper --threads 1

For each profile (its preprocessing and encoder; random encoder weights, so it runs offline), one
untrained model is built, exported (hdmap_ad.core.export) and timed on raw maps of the training
maps' size, both backends in float32 on the CPU with the same thread count:

- latency: batch 1, `--runs` calls each, p50 and p99 (with few runs p99 is near the maximum);
- throughput: batch `--batch`, `--batch-runs` calls each, maps per second.

Calls alternate between the backends, so a change in machine load hits both alike. The PyTorch
path is what `predict` runs per batch (preprocess + `inference.score_images` under inference
mode); the ONNX path is `OnnxScorer.run` (input checks + onnxruntime). Scores of the two on the
same maps are compared too (largest relative difference).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from hdmap_ad.apps.parsing import add_command, doc_body

PROFILE_OVERRIDES = {
    "quick": ["profile=quick"],
    # the paper's encoder (ViT-B/14) and input size, with random weights: offline, same cost
    "paper": ["profile=paper", "profiles.paper.model.weights=random"],
}


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def bench_export(
    params_file: Path,
    profile: str,
    threads: int,
    runs: int = 20,
    batch: int = 32,
    batch_runs: int = 3,
    map_shape: tuple[int, int] = (31, 95),
) -> list[dict[str, Any]]:
    """Two rows (pytorch, onnx) for `profile`: p50/p99 latency at batch 1 (ms), throughput at
    `batch` (maps/s), and the largest relative score difference between the backends."""
    import tempfile

    import numpy as np
    import torch

    from hdmap_ad.core.checkpoint import TrainedModel, build
    from hdmap_ad.core.config import load_params
    from hdmap_ad.core.export import export_onnx, map_scorer
    from hdmap_ad.core.onnx_scorer import OnnxScorer

    params = load_params(params_file, PROFILE_OVERRIDES[profile])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, method = build(params, list(params.data.domains), torch.device("cpu"))
    trained = TrainedModel(model.eval(), method.eval(), params, list(params.data.domains), {}, {})
    scorer = map_scorer(trained)
    rng = np.random.default_rng(0)
    one = rng.random((1, *map_shape), dtype=np.float32)
    many = rng.random((batch, *map_shape), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="hdmap-bench-export-") as tmp:
        started = time.perf_counter()
        path = export_onnx(trained, Path(tmp) / "model.onnx", map_shape)
        export_s = time.perf_counter() - started
        onnx = OnnxScorer(path, threads=threads)

        def run_torch(maps: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return scorer(torch.from_numpy(maps))[1].numpy()

        def run_onnx(maps: np.ndarray) -> np.ndarray:
            return onnx.run(maps)[1]

        backends = {"pytorch": run_torch, "onnx": run_onnx}
        latency: dict[str, list[float]] = {k: [] for k in backends}
        rate: dict[str, list[float]] = {k: [] for k in backends}
        for fn in backends.values():  # warm-up: first calls allocate and pick kernels
            fn(one)
            fn(many[:2])
        for _ in range(runs):
            for name, fn in backends.items():
                t = time.perf_counter()
                fn(one)
                latency[name].append(time.perf_counter() - t)
        scores = {}
        for _ in range(batch_runs):
            for name, fn in backends.items():
                t = time.perf_counter()
                scores[name] = fn(many)
                rate[name].append(batch / (time.perf_counter() - t))
    ref = scores["pytorch"].astype(np.float64)
    rel = float(np.max(np.abs(scores["onnx"] - ref) / np.maximum(np.abs(ref), 1e-12)))
    p = params.preprocess
    size = f"{map_shape[0]}x{map_shape[1]} -> {p.crop[0]}x{p.crop[1]} ({params.model.encoder})"
    return [
        {
            "profile": profile,
            "input": size,
            "backend": name,
            "threads": threads,
            "p50_ms": 1e3 * _percentile(latency[name], 50),
            "p99_ms": 1e3 * _percentile(latency[name], 99),
            "maps_per_s": float(np.median(rate[name])),
            "batch": batch,
            "runs": runs,
            "batch_runs": batch_runs,
            "score_rel_diff": rel if name == "onnx" else 0.0,
            "export_s": export_s,
        }
        for name in backends
    ]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| profile | input | backend | batch 1 p50 (ms) | batch 1 p99 (ms) | batch {b} (maps/s) | score rel. diff |".format(
            b=rows[0]["batch"] if rows else 32
        ),
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['profile']} | {r['input']} | {r['backend']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['maps_per_s']:.3g} | {r['score_rel_diff']:.1e} |"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `hdmap-ad bench-onnx`."""
    p.add_argument("--profiles", nargs="+", choices=sorted(PROFILE_OVERRIDES), default=["quick", "paper"])
    p.add_argument("--threads", type=int, default=1, help="CPU threads of both backends (default: 1)")
    p.add_argument("--runs", type=int, default=20, help="batch-1 calls per backend (default: 20)")
    p.add_argument("--batch", type=int, default=32, help="throughput batch size (default: 32)")
    p.add_argument("--batch-runs", type=int, default=3, help="calls at the throughput batch per backend (default: 3)")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    if not any(a.dest == "params" for a in p._actions):
        p.add_argument("--params", type=Path, default=Path("params.yaml"))
    return p


def run(args: argparse.Namespace) -> int:
    from hdmap_ad.core.errors import HdmapError
    from hdmap_ad.core.files import write_json

    for flag in ("threads", "runs", "batch", "batch_runs"):
        if getattr(args, flag) <= 0:
            raise HdmapError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be positive")
    rows = []
    for profile in args.profiles:
        rows += bench_export(Path(args.params), profile, args.threads, args.runs, args.batch, args.batch_runs)
        print(f"{profile}: exported in {rows[-1]['export_s']:.0f} s", file=sys.stderr)
    print(markdown(rows))
    if args.out:
        write_json(rows, args.out)
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(
        sub, common, "bench-onnx", "CPU latency/throughput of the exported ONNX model vs PyTorch", doc_body(__doc__)
    )
    add_arguments(p)
    p.set_defaults(func=run)
