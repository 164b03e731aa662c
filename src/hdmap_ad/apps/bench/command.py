"""`hdmap-ad bench`: our Dinomaly against anomalib's, same shapes, same device, side by side.

    hdmap-ad bench                                  quick profile shapes + 392x392, ViT-S, batch 8
    hdmap-ad bench --size 392x392 --batch 8 --steps 5
    hdmap-ad bench --sweep-sizes 56x196,112x392,224x392 --sweep-batch 8 --no-anomalib

For every case (input size H×W after the center crop, batch B, encoder) each *phase* runs in a
fresh Python subprocess, so that its memory high-water mark is its own and phases cannot warm or
pollute each other:

  ours_train_cache_on    our real training step with the encoder-feature cache (features.Cached)
  ours_train_cache_off   the same step encoding every batch on the fly (features.OnTheFly)
  ours_infer             packed float32 maps -> image scores through inference.score_maps
  anomalib_train         anomalib's DinomalyModel: its forward+loss (CosineHardMiningLoss), its
                         StableAdamW + WarmCosineScheduler as its Lightning module configures them,
                         gradient clip 0.1 (its trainer argument); preprocessing with its transforms
  anomalib_infer         packed maps -> its transforms -> DinomalyModel.eval() under inference_mode
                         (what Lightning's validate/predict loops use) -> pred_score
  matmul                 a timed n×n matmul (n up to 2048 on CPU, 8192 on CUDA, smaller where one
                         product takes over 0.2 s) with the same threads, in each
                         precision benchmarked: the device's practical FLOP/s peak at that precision

`--precision float32,bf16` measures every case at each precision: ours through `train.amp` /
`evaluate.amp`, anomalib's model under the same `torch.autocast`, and "% peak" against the matmul
peak of the same precision. On a CPU without native bf16 (no AVX512-BF16/AMX) bf16 is emulated.

Measured per phase: seconds per step for `--warmup` untimed then `--steps` timed steps (images/s =
B / median step time; the mean is kept too), peak memory (CPU: the subprocess's RSS high-water
mark from getrusage, and the same minus the RSS right after imports, i.e. what the model, its
data, activations, optimizer and cache took; CUDA: torch.cuda.max_memory_allocated), FLOPs per
image from torch.utils.flop_counter.FlopCounterMode over one step (matmul-class ops only, the
usual convention), and achieved FLOP/s = FLOPs per step / median step time.

Both models get RANDOM encoder weights (speed does not depend on them): ours through
`model.weights=random`, anomalib's by making its feature extractor call timm with
`pretrained=False` inside the benchmark subprocess only. HF_HUB_OFFLINE=1 is set, nothing is
downloaded. Numbers on a shared machine are noisy: `--repeat R` reruns every phase R times,
interleaved, and reports the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hdmap_ad.apps.bench.spec import DEFAULT_OUT, HARD_MINING_STEP, PAPER_MAPS, PRECISIONS, Case
from hdmap_ad.apps.bench.tables import cache_text, precision_table, results_table, sweep_table
from hdmap_ad.apps.parsing import add_command, doc_body, positive_int_list
from hdmap_ad.core.errors import HdmapError

# --------------------------------------------------------------------------------------------------
# command line


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 392x392, got {text!r}") from None
    if h <= 0 or w <= 0 or h % 14 or w % 14:
        raise argparse.ArgumentTypeError(f"{text}: both sides must be positive multiples of the patch size 14")
    return h, w


def _sizes(text: str) -> list[tuple[int, int]]:
    return [_size(t) for t in text.split(",") if t.strip()]


def _precisions(text: str) -> list[str]:
    values = [t.strip() for t in text.split(",") if t.strip()]
    bad = [v for v in values if v not in PRECISIONS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"expected {' and/or '.join(PRECISIONS)}, comma-separated, got {text!r}")
    return list(dict.fromkeys(values))


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(
        sub,
        common,
        "bench",
        "measure training/inference speed, memory and FLOP/s against anomalib's Dinomaly",
        doc_body(__doc__),
    )
    p.add_argument(
        "--profile",
        choices=["quick", "paper"],
        help="params profile whose shapes and encoder to use (default: params.yaml's)",
    )
    p.add_argument("--encoder", help="small | base | large (default: the profile's model.encoder)")
    p.add_argument("--size", type=_size, help="input size HxW after the crop (default: the profile's crop and 392x392)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default: 8)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per phase (default: 4)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default: 2)")
    p.add_argument(
        "--repeat", type=int, default=1, help="run every phase this many times, interleaved; report the median"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in every phase (default 0: torch's default)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time steps by wall clock (default) or by this process's CPU time: with --threads 1 the "
        "latter is robust to other jobs on a shared machine",
    )
    p.add_argument("--sweep-sizes", type=_sizes, metavar="HxW,...", help="sizes to sweep (time per image vs tokens)")
    p.add_argument("--sweep-batch", type=positive_int_list, metavar="N,...", help="batch sizes to sweep")
    p.add_argument(
        "--precision",
        type=_precisions,
        default=["float32"],
        metavar="P,...",
        help="float32 and/or bf16 (autocast), e.g. float32,bf16 side by side (default: float32)",
    )
    p.add_argument("--no-anomalib", action="store_true", help="measure only our implementation")
    p.add_argument("--no-cache-off", action="store_true", help="skip the cache-off training phase")
    p.add_argument("--compile", action="store_true", help="torch.compile our decoder (as train.compile does)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result (default: {DEFAULT_OUT})")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from hdmap_ad.core.config import load_params
    from hdmap_ad.core.files import write_json
    from hdmap_ad.core.runtime import console

    os.environ["HF_HUB_OFFLINE"] = "1"  # the benchmark never downloads (random weights on both sides)
    overrides = list(args.set)
    if args.profile:
        overrides.append(f"profile={args.profile}")
    params = load_params(args.params, overrides)
    if args.batch <= 0 or args.steps <= 0 or args.warmup < 0 or args.repeat <= 0:
        raise HdmapError("--batch, --steps and --repeat must be positive, --warmup non-negative")
    cases = plan_cases(params, args)
    device = _resolve_device(args.device)
    anomalib_version = None if args.no_anomalib else _anomalib_version()
    use_anomalib = anomalib_version is not None and not params.model.encoder_overrides
    if not args.no_anomalib and not use_anomalib:
        why = (
            "not importable"
            if anomalib_version is None
            else "model.encoder_overrides is set (anomalib builds the named architecture)"
        )
        console.print(f"[yellow]anomalib comparison skipped: {why}[/]")

    phases = ["ours_train_cache_on"] + ([] if args.no_cache_off else ["ours_train_cache_off"]) + ["ours_infer"]
    if use_anomalib:
        phases += ["anomalib_train", "anomalib_infer"]
    base = {
        "resolved": params.resolved(),
        "device": device,
        "threads": args.threads,
        "warmup": args.warmup,
        "steps": args.steps,
        "compile": args.compile,
        "clock": args.clock,
        "raw_size": [params.synth.height, params.synth.width],
        "anomalib": use_anomalib,
    }

    peaks = {
        prec: _median_runs([_run_phase({**base, "phase": "matmul", "precision": prec}) for _ in range(args.repeat)])
        for prec in args.precision
    }
    peak = peaks[args.precision[0]]
    for prec, pk in peaks.items():
        console.print(f"matmul peak on {device} ({pk.get('threads')} threads): {pk['gflops']:.1f} GFLOP/s {prec}")
    results: list[dict[str, Any]] = []
    for case in cases:
        runs: dict[str, list[dict[str, Any]]] = {ph: [] for ph in phases}
        for r in range(args.repeat):
            for ph in phases:
                console.print(f"[dim]{case.name}: {ph} (run {r + 1}/{args.repeat})[/]")
                runs[ph].append(_run_phase({**base, "phase": ph, "case": asdict(case)}))
        measured = {ph: _median_runs(rs) for ph, rs in runs.items()}
        for m in measured.values():
            if m.get("flops_per_step") and m.get("step_s"):
                m["gflops_achieved"] = m["flops_per_step"] / m["step_s"] / 1e9
                m["pct_of_matmul_peak"] = 100 * m["gflops_achieved"] / peaks[case.precision]["gflops"]
        t, n = case.tokens()
        results.append(
            {
                "name": case.name,
                **asdict(case),
                "tokens_per_image": t,
                "patch_tokens": n,
                "phases": measured,
                "ratios": _ratios(measured),
                "runs": {ph: rs for ph, rs in runs.items()} if args.repeat > 1 else None,
            }
        )

    cache = paper_cache_estimate(args.params)
    result = {
        "command": command_line(args),
        "device": device,
        "cpu": cpu_name(),
        "threads": peak.get("threads"),
        "torch": peak.get("torch"),
        "anomalib": anomalib_version if use_anomalib else None,
        "profile": params.profile,
        "settings": {
            "warmup": args.warmup,
            "steps": args.steps,
            "repeat": args.repeat,
            "compile": args.compile,
            "clock": args.clock,
            "hard_mining_step": HARD_MINING_STEP,
        },
        "matmul_peak": peak,
        "matmul_peaks": peaks,
        "precisions": args.precision,
        "precision_speedups": precision_speedups(results),
        "cases": results,
        "paper_cache": cache,
        "notes": {
            "images_per_s": "batch / median step time over the timed steps (median over --repeat runs)",
            "speedup": "ours images/s divided by anomalib images/s: > 1 means ours is faster",
            "memory_ratio": "ours peak divided by anomalib peak: < 1 means ours needs less",
            "peak_mb": "CPU: RSS high-water of the phase's own process minus its RSS after imports; CUDA: max_memory_allocated",
            "flops": "FlopCounterMode over one step, matmul-class ops; cache-on training excludes the encoder (paid once, see cache_build_s)",
        },
    }
    write_json(result, args.out)
    console.print(results_table(result))
    if len(cases) > 1:
        console.print(sweep_table(result))
    if result["precision_speedups"]:
        console.print(precision_table(result))
    console.print(cache_text(cache))
    console.print(f"written {args.out}")
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The `hdmap-ad bench` call that reproduces this result (options as parsed)."""
    parts = ["hdmap-ad", "bench"]
    if str(args.params) != "params.yaml":
        parts += ["--params", str(args.params)]
    parts += [f"--set {s}" for s in args.set]
    for name in ("profile", "encoder", "device", "threads", "clock", "batch", "steps", "warmup", "repeat"):
        value = getattr(args, name)
        if value is not None:
            parts.append(f"--{name} {value}")
    if args.precision != ["float32"]:
        parts.append("--precision " + ",".join(args.precision))
    if args.size:
        parts.append(f"--size {args.size[0]}x{args.size[1]}")
    if args.sweep_sizes:
        parts.append("--sweep-sizes " + ",".join(f"{h}x{w}" for h, w in args.sweep_sizes))
    if args.sweep_batch:
        parts.append("--sweep-batch " + ",".join(map(str, args.sweep_batch)))
    parts += [
        f"--{flag}" for flag in ("no-anomalib", "no-cache-off", "compile") if getattr(args, flag.replace("-", "_"))
    ]
    parts.append(f"--out {args.out}")
    return " ".join(parts)


def plan_cases(params, args: argparse.Namespace) -> list[Case]:
    encoder = args.encoder or params.model.encoder
    crop, resize = tuple(params.preprocess.crop), tuple(params.preprocess.resize)

    def make(size: tuple[int, int], batch: int) -> list[Case]:
        # The profile's own crop keeps its resize; other sizes resize by the paper's 448/392 = 8/7.
        rs = resize if tuple(size) == crop else (round(size[0] * 8 / 7), round(size[1] * 8 / 7))
        return [Case(tuple(size), tuple(rs), batch, encoder, prec) for prec in getattr(args, "precision", ["float32"])]

    if args.sweep_sizes or args.sweep_batch:
        sizes = args.sweep_sizes or [args.size or crop]
        batches = args.sweep_batch or [args.batch]
        return [c for s in sizes for b in batches for c in make(s, b)]
    if args.size:
        return make(args.size, args.batch)
    cases = make(crop, args.batch)
    if crop != (392, 392):
        cases += make((392, 392), args.batch)
    return cases


def precision_speedups(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """bf16 images/s over float32 images/s of the same case and phase (> 1: bf16 faster)."""
    by_key = {(c["name"].rsplit(" ", 1)[0], c["precision"]): c for c in cases}
    out = []
    for (shape, prec), case in by_key.items():
        ref = by_key.get((shape, "float32"))
        if prec == "float32" or ref is None:
            continue
        for phase, m in case["phases"].items():
            base = ref["phases"].get(phase, {}).get("images_per_s")
            if base and m.get("images_per_s"):
                out.append(
                    {"case": shape, "precision": prec, "phase": phase, "speedup_vs_float32": m["images_per_s"] / base}
                )
    return out


def _resolve_device(spec: str) -> str:
    from hdmap_ad.core.runtime import select_device

    return str(select_device(spec))


def _anomalib_version() -> str | None:
    try:
        import importlib.metadata as md

        import anomalib.models.image.dinomaly  # noqa: F401

        return md.version("anomalib")
    except Exception:  # not installed, or it fails to import: the comparison is optional
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------------
# running phases in subprocesses


def _run_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one phase in a fresh interpreter; return its measurement dict."""
    with tempfile.TemporaryDirectory(prefix="hdmap-bench-") as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CI="1", PYTHONWARNINGS="ignore")
        proc = subprocess.run(
            [sys.executable, "-m", "hdmap_ad.apps.bench.worker", str(spec_file), str(out_file)],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not out_file.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise HdmapError(f"benchmark phase {spec['phase']} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out_file.read_text())


def _median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric field over repeated runs (lists and strings from the first run)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
            out[key] = statistics.median(vals)
    if out.get("step_s") and out.get("batch"):
        out["images_per_s"] = out["batch"] / out["step_s"]
        out["ms_per_image"] = 1000 * out["step_s"] / out["batch"]
    return out


def _ratios(m: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def div(a: str, b: str, key: str) -> float | None:
        x, y = m.get(a, {}).get(key), m.get(b, {}).get(key)
        return x / y if x and y else None

    return {
        "train_speedup_cache_on": div("ours_train_cache_on", "anomalib_train", "images_per_s"),
        "train_speedup_cache_off": div("ours_train_cache_off", "anomalib_train", "images_per_s"),
        "infer_speedup": div("ours_infer", "anomalib_infer", "images_per_s"),
        "train_memory_ratio_cache_on": div("ours_train_cache_on", "anomalib_train", "peak_mb"),
        "train_memory_ratio_cache_off": div("ours_train_cache_off", "anomalib_train", "peak_mb"),
        "infer_memory_ratio": div("ours_infer", "anomalib_infer", "peak_mb"),
    }


# --------------------------------------------------------------------------------------------------
# the paper setting's cache and the tables


def paper_cache_estimate(params_file: Path | str) -> dict[str, Any]:
    """features.cache_bytes for the paper setting: 4 domains × 1000 maps, ViT-B/14, 392×392 crop."""
    import torch

    from hdmap_ad.core.checkpoint import dinomaly_config
    from hdmap_ad.core.config import load_params
    from hdmap_ad.core.features import cache_bytes
    from hdmap_ad.core.model import Dinomaly

    random = ["model.weights=random", "model.encoder_overrides={}"]
    try:  # the paper profile, with random weights: only shapes matter here, nothing is loaded
        paper = load_params(params_file, ["profile=paper", *random, "profiles.paper.model.weights=random"])
    except HdmapError:  # a params file without the paper profile: its values from docs/design.md#paper-setting
        paper = load_params(
            params_file, [*random, "model.encoder=base", "preprocess.resize=[448,448]", "preprocess.crop=[392,392]"]
        )
    with torch.device("meta"):  # shapes only: no memory, no weights
        model = Dinomaly(dinomaly_config(paper))
    out = {
        "n_maps": PAPER_MAPS,
        "encoder": paper.model.encoder,
        "crop": list(paper.preprocess.crop),
        "amp": paper.train.amp,
        "feature_cache_max_gb": paper.runtime.feature_cache_max_gb,
    }
    for dev in ("cuda", "cpu"):
        out[f"{dev}_gib"] = cache_bytes(model, PAPER_MAPS, paper, torch.device(dev)) / 2**30
    out["per_map_mib_cuda"] = out["cuda_gib"] * 1024 / PAPER_MAPS
    return out
