"""Are float32 results the same bits on every x86 CPU kind, and can an environment setting make them so?
(README, "Reproducibility across CPUs"; docs/design.md#pipe-cpu-kinds)

    PYTHONPATH=src python benchmarks/cpu_repro.py [--steps 4] [--threads 1] [--repeats 15]

Runs one probe per setting below, each in a fresh process (the math libraries read these variables once,
when they load) and prints per setting a short hash of each result and the median time per operation:

  matmul   a seeded float32 matmul 512x768 @ 768x1024 (MKL's sgemm in PyTorch's CPU build)
  conv2d   a seeded float32 conv2d, 8x32x42x126 by 64x32x3x3 (oneDNN)
  train    the quick profile's model (shipped params.yaml, feature cache on): the encoder features of 32
           synthetic maps, then `--steps` training steps; the hash covers the features, every loss and
           the trainable weights after the steps
  score    the trained model scoring the 32 maps (evaluate's path)

`=` after a hash: equal to the first row's, i.e. the setting gives this machine's default bits.
The last rows run without a setting at other thread counts (`--other-threads`). Which settings pin
results across CPU kinds can only be seen by running this on two kinds and comparing the hashes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS: list[dict[str, str]] = [
    {},
    {"ATEN_CPU_CAPABILITY": "default"},
    {"ATEN_CPU_CAPABILITY": "avx2"},
    {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    {"MKL_CBWR": "COMPATIBLE"},
    {"MKL_CBWR": "SSE4_2"},
    {"MKL_CBWR": "AVX2"},
    {"MKL_CBWR": "AVX512"},
    {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},  # every x86-64-v3 CPU has these
    {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"},  # the lowest
]
KEYS = sorted({k for s in SETTINGS for k in s})


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.detach().contiguous().cpu().numpy().tobytes() if hasattr(a, "detach") else bytes(a))
    return h.hexdigest()[:10]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def probe(steps: int, threads: int, repeats: int) -> dict:
    """One process's results under the environment it was started with."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from hdmap_ad.apps.bench.ours import build_ours, ours_train_step, synthetic_maps
    from hdmap_ad.core.checkpoint import trainable_state
    from hdmap_ad.core.config import load_params
    from hdmap_ad.core.features import make_feature_source
    from hdmap_ad.core.inference import score_maps

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 768, generator=gen), torch.randn(768, 1024, generator=gen)
    x, w = torch.randn(8, 32, 42, 126, generator=gen), torch.randn(64, 32, 3, 3, generator=gen)
    out = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "matmul": digest(a @ b),
        "matmul_ms": median_ms(lambda: a @ b, repeats),
        "conv2d": digest(F.conv2d(x, w, padding=1)),
        "conv2d_ms": median_ms(lambda: F.conv2d(x, w, padding=1), repeats),
    }
    sets = ["runtime.device=cpu", "runtime.feature_cache=on", f"runtime.num_threads={threads}"]
    params = load_params(REPO / "params.yaml", sets)
    device = torch.device("cpu")
    maps = synthetic_maps(32, {"raw_size": (params.synth.height, params.synth.width)})
    model, method, optimizer = build_ours(params, device)
    model.train()
    method.train()
    features = make_feature_source(model, maps, params, device)
    step = ours_train_step(model, method, optimizer, features, params, device, len(maps))
    losses, step_s = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        losses.append(step(i))
        step_s.append(time.perf_counter() - t0)
    state = trainable_state(model)
    encoded = features.batch(np.arange(len(maps)))  # the cached encoder features (no grad, not trained)
    out["train"] = digest(
        encoded.bottleneck_in, *encoded.groups, torch.tensor(losses, dtype=torch.float64), *state.values()
    )
    out["train_step_ms"] = 1000 * statistics.median(step_s[1:] or step_s)
    t0 = time.perf_counter()
    scored = score_maps(model, method, maps, params, device, batch_size=16, description="probe")
    out["score_ms"] = 1000 * (time.perf_counter() - t0)
    out["score"] = digest(torch.from_numpy(scored.scores))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="training steps (default: 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument(
        "--other-threads", default="2", help="thread counts to also run without a setting, comma list (default: 2)"
    )
    ap.add_argument("--repeats", type=int, default=15, help="timed repeats of matmul and conv2d (default: 15)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(probe(args.steps, args.threads, args.repeats)))
        return 0

    base_env = {k: v for k, v in os.environ.items() if k not in KEYS}
    base_env.setdefault("PYTHONPATH", str(REPO / "src"))
    runs = [(setting, args.threads) for setting in SETTINGS]
    runs += [({}, int(t)) for t in args.other_threads.split(",") if t.strip()]
    rows = []
    for setting, threads in runs:
        cmd = [sys.executable, __file__, "--child", f"--steps={args.steps}", f"--threads={threads}"]
        done = subprocess.run(
            [*cmd, f"--repeats={args.repeats}"],
            env={**base_env, **setting},
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return 1
        name = " ".join(f"{k}={v}" for k, v in setting.items()) or "(none)"
        rows.append(
            (
                name if threads == args.threads else f"(none), {threads} threads",
                json.loads(done.stdout.strip().splitlines()[-1]),
            )
        )
        print(f"done: {rows[-1][0]}", file=sys.stderr)
    first = rows[0][1]
    print(
        f"{first['cpu_capability']} CPU capability by default; {args.threads} thread(s) unless said, {args.steps} steps"
    )
    print("| setting | matmul | conv2d | train | score | matmul ms | conv2d ms | step ms | score ms |")
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    for name, r in rows:
        same = [r[k] + ("" if r[k] != first[k] else " =") for k in ("matmul", "conv2d", "train", "score")]
        times = [f"{r[k]:.2f}" for k in ("matmul_ms", "conv2d_ms", "train_step_ms", "score_ms")]
        print(f"| {name} | " + " | ".join(same + times) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
