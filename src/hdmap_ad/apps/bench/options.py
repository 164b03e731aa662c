"""`python -m hdmap_ad.apps.bench.options`: what a method or model option costs in training time against
its base, measured in one process with the variants' steps interleaved (README, Performance).

Separate `hdmap-ad bench` runs of two variants differ by up to 10-20 % on a shared machine, more than
the few per cent asked of an option; here every variant is built once (model, method, optimizer,
feature cache of the same maps), then the variants take turns, `--steps` steps each per round, so a
slow period of the machine hits them all alike. Steps are timed by the process's CPU time and run on
one thread by default. Each variant's median step time is compared with its base's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

# (name, overrides, base): a variant is the shipped params plus its overrides.
VARIANTS: list[tuple[str, list[str], str | None]] = [
    ("baseline", [], None),
    ("hseg", ["method=hseg"], "baseline"),
    ("vdrop", ["method=vdrop", "vdrop.warmup_steps=0"], "baseline"),
    ("recenter", ["model.recenter=true"], "baseline"),
    ("topk", ["method=topk"], None),
    ("topk+hseg", ["method=topk+hseg"], "topk"),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--batch", type=int, default=16, help="batch size (default: the quick profile's 16)")
    ap.add_argument("--rounds", type=int, default=8, help="rounds of turns (default: 8)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per round (default: 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = ap.parse_args(argv)

    import torch

    from hdmap_ad.apps.bench.ours import build_ours, ours_train_step, synthetic_maps
    from hdmap_ad.apps.bench.spec import HARD_MINING_STEP
    from hdmap_ad.core.config import load_params
    from hdmap_ad.core.features import make_feature_source

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    steps = {}
    for name, overrides, _ in VARIANTS:
        sets = [*overrides, f"train.batch_size={args.batch}", "runtime.feature_cache=on", "runtime.device=cpu"]
        params = load_params(args.params, sets)
        maps = synthetic_maps(11 * args.batch, {"raw_size": (params.synth.height, params.synth.width)})
        torch.manual_seed(0)
        model, method, optimizer = build_ours(params, device)
        model.train()
        method.train()
        features = make_feature_source(model, maps, params, device)
        steps[name] = ours_train_step(model, method, optimizer, features, params, device, len(maps))
        steps[name](0)  # warm-up: first-step allocations
    times: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
    for r in range(args.rounds):
        for name, step in steps.items():
            for i in range(args.steps):
                t0 = time.process_time()
                step(1 + r * args.steps + i)
                times[name].append(time.process_time() - t0)
    crop = "x".join(map(str, load_params(args.params).preprocess.crop))
    print(
        f"training step, CPU time, {args.threads} thread(s), batch {args.batch}, {crop}, from step {HARD_MINING_STEP}:"
    )
    print("| variant | median step (ms) | vs its base |")
    print("|---|---:|---:|")
    median = {name: statistics.median(t) * 1000 for name, t in times.items()}
    for name, _, base in VARIANTS:
        ratio = f"{100 * (median[name] / median[base] - 1):+.1f} % vs {base}" if base else "(base)"
        print(f"| {name} | {median[name]:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
