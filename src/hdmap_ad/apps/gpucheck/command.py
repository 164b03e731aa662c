"""`hdmap-ad gpu-check`: every CUDA path of the product, end to end, in one command and one report.

    hdmap-ad gpu-check                        on a GPU: paper shapes (ViT-B/14 reg4, 392x392, batch 16)
    hdmap-ad gpu-check --device cpu           tiny shapes on the CPU (what CI runs)
    make gpu-check                            the same, with anomalib installed for the benchmark

In a scratch folder it writes a small synthetic dataset and then runs, each in a fresh process:

  training runs   `--steps` steps each, then evaluate (float32 inference):
                    bf16 autocast, feature cache on (on the GPU when there is one)
                    fp16 autocast + GradScaler, feature cache off (CUDA only: fp16 is CUDA-only)
                    float32, cache on (on CPU: off, so both cache paths still run)
  resume          the bf16 run again, stopped before step steps/2+1 and resumed: its model must equal
                  the uninterrupted run's (exactly on CPU; on CUDA the largest difference is shown)
  predict         `hdmap-ad predict` with the bf16 model on one domain's test maps: same scores as
                  its evaluation; and with --precision bf16 on the float32 model: bf16 inference parity
  pyfunc          the bf16 run's logged MLflow model, loaded and scored on the same maps
  bench           `hdmap-ad bench` at the same shapes, float32 and bf16 side by side, against anomalib's
                  Dinomaly when it is installed (`pip install -e '.[bench]'`), with the matmul peak of
                  each precision measured in the same run

The report (`--out`: gpu-check.json and gpu-check.md, written by report.py) holds images/s, the allocator's peak memory,
% of the bf16 matmul peak, the per-domain metrics of each precision side by side, and a list of
checks; the exit status is 1 when a check fails. Encoders have random weights unless `--weights`
says otherwise (nothing is downloaded by default). `--set KEY=VALUE` changes the params the runs start
from (e.g. `--set method=focal`); the check's own settings (data, steps, precision, cache, device)
win. On one GPU the paper-shape run is meant to take under 8 minutes.

This file is one orchestrator (~490 lines): its steps share the scratch folders, the device and the list of
checks, so they stay one class; what runs is in plan.py and the report in report.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from hdmap_ad.apps.gpucheck.plan import DEFAULT_OUT, SHAPES, RunSpec, Shapes, plan_runs
from hdmap_ad.apps.gpucheck.report import (
    agreement,
    bench_summary,
    checks_table,
    metrics_parity,
    scores_by_file,
    write_report,
)
from hdmap_ad.core.errors import HdmapError

# --------------------------------------------------------------------------------------------------
# command line


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "gpu-check",
        parents=[common],
        help="run every CUDA path end to end and write one report",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu (default: auto)")
    p.add_argument("--shapes", choices=sorted(SHAPES), help="paper (default on CUDA) | tiny (default on CPU)")
    p.add_argument("--steps", type=int, help="training steps per run (default: 100 paper, 6 tiny)")
    p.add_argument("--weights", help="model.weights for the runs: random (default) | hub | a local weight file")
    p.add_argument("--no-bench", action="store_true", help="skip the `hdmap-ad bench` part")
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder for gpu-check.json and gpu-check.md (default: {DEFAULT_OUT})",
    )
    p.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="work in DIR and keep it (data, models, MLflow stores, logs); default: a temporary folder",
    )
    p.set_defaults(func=cmd_gpu_check)


def cmd_gpu_check(args: argparse.Namespace) -> int:
    import torch

    from hdmap_ad.core.runtime import console, select_device

    device = select_device(args.device)
    shapes = SHAPES[args.shapes or ("paper" if device.type == "cuda" else "tiny")]
    steps = args.steps or shapes.steps
    if steps < 4:
        raise HdmapError(f"--steps {steps}: at least 4 (the resume part stops the run halfway)")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hdmap-gpu-check-"))
    if args.keep and work.exists() and any(work.iterdir()):
        raise HdmapError(f"--keep {work}: folder exists and is not empty")
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    check = GpuCheck(work, Path(args.params), list(args.set), device, shapes, steps, args.weights or "random")
    try:
        report = check.run(bench=not args.no_bench)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report.update(
        wall_s=time.perf_counter() - started,
        command=command_line(args),
        device={"name": str(device), "model": device_name(device), "torch": torch.__version__},
    )
    write_report(report, args.out)
    console.print(checks_table(report))
    failed = [c for c in report["checks"] if not c["ok"]]
    console.print(
        f"gpu-check: {len(report['checks']) - len(failed)}/{len(report['checks'])} checks passed in "
        f"{report['wall_s']:.0f} s; report: {args.out / 'gpu-check.md'}"
    )
    return 1 if failed else 0


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


# --------------------------------------------------------------------------------------------------
# the check


class GpuCheck:
    """The scratch folder and every part of the check, in order; `run()` returns the report."""

    def __init__(
        self, work: Path, params_file: Path, sets: list[str], device, shapes: Shapes, steps: int, weights: str
    ) -> None:
        self.work, self.device, self.shapes, self.steps, self.weights = work, device, shapes, steps, weights
        self.base = self._resolved_base(params_file, sets)
        self.checks: list[dict[str, Any]] = []

    # -- set-up -------------------------------------------------------------------------------------

    def _resolved_base(self, params_file: Path, sets: list[str]) -> dict[str, Any]:
        """The user's params (and --set) with the check's profile merged in: every run then changes
        top-level keys only."""
        from hdmap_ad.core.config import apply_overrides, deep_merge, load_params

        load_params(params_file, sets)  # a missing file, bad YAML or a bad value: one line naming it
        raw = apply_overrides(yaml.safe_load(params_file.read_text()) or {}, sets)
        profiles = raw.pop("profiles", {}) or {}
        if self.shapes.profile not in profiles:
            raise HdmapError(f"{params_file}: no profile {self.shapes.profile!r}, which gpu-check's shapes start from")
        merged = deep_merge(raw, profiles[self.shapes.profile] or {})
        return {**merged, "profile": self.shapes.profile, "profiles": {self.shapes.profile: {}}}

    def overrides(self, run: RunSpec, folder: Path) -> list[str]:
        half = self.steps // 2
        return [
            f"data.root={self.work / 'raw'}",
            f"data.prepared={self.work / 'prepared'}",
            f"data.domains={json.dumps(list(self.shapes.domains))}",
            "method=baseline",
            "seed=0",
            f"model.weights={self.weights}",
            f"train.steps={self.steps}",
            f"train.val_every={self.steps}",
            f"train.amp={run.amp}",
            "evaluate.amp=off",
            f"runtime.device={self.device}",
            f"runtime.feature_cache={run.cache}",
            f"runtime.checkpoint_every={half}",
            f"runtime.log_every={max(1, self.steps // 10)}",
            "runtime.resume=auto",
            "mlflow.experiment=gpu-check",
            f"mlflow.tracking_uri={tracking_uri(folder)}",
            *self.shapes.overrides,
        ]

    def make_folder(self, name: str, run: RunSpec) -> Path:
        from hdmap_ad.core.config import apply_overrides, parse_params

        folder = self.work / name
        folder.mkdir()
        raw = apply_overrides(self.base, self.overrides(run, folder))
        parse_params(raw, f"gpu-check params of {name}")  # fail here, with the key named, not in a worker
        (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        return folder

    def make_data(self) -> None:
        from hdmap_ad.pipeline.data import prepare_dataset
        from hdmap_ad.pipeline.synth import SynthConfig, generate

        s = self.base["synth"]
        cfg = SynthConfig(
            n_train=self.shapes.n_train,
            n_test_good=self.shapes.n_test,
            n_test_fault=self.shapes.n_test,
            height=s["height"],
            width=s["width"],
            seed=s["seed"],
            domains=self.shapes.domains,
        )
        generate(self.work / "raw", cfg, progress=False)
        prepare_dataset(self.work / "raw", list(self.shapes.domains), self.work / "prepared", progress=False)

    # -- running parts -------------------------------------------------------------------------------

    def worker(self, folder: Path, task: dict[str, Any], label: str) -> dict[str, Any]:
        spec = {"workdir": str(folder), "tracking_uri": tracking_uri(folder), **task}
        spec_file, out_file = folder / f"{label}.task.json", folder / f"{label}.result.json"
        spec_file.write_text(json.dumps(spec))
        self.subprocess(
            [sys.executable, "-m", "hdmap_ad.apps.gpucheck.worker", str(spec_file), str(out_file)], folder, label
        )
        return json.loads(out_file.read_text())

    def subprocess(self, argv: list[str], folder: Path, label: str) -> None:
        from hdmap_ad.core.runtime import console

        env = dict(
            os.environ,
            DVC_ROOT=str(folder),
            MLFLOW_TRACKING_URI=tracking_uri(folder),
            HF_HUB_OFFLINE="1",
            PYTHONWARNINGS="ignore",
        )
        log = folder / f"{label}.log"
        console.print(f"[dim]gpu-check: {label} ...[/]")
        start = time.perf_counter()
        with log.open("w") as fh:
            rc = subprocess.run(argv, cwd=folder, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
        tail = log.read_text().strip().splitlines()[-15:]
        if rc != 0:
            raise HdmapError(f"gpu-check: {label} failed (exit {rc}); the end of its log:\n  " + "\n  ".join(tail))
        console.print(f"gpu-check: {label} done in {time.perf_counter() - start:.1f} s")

    def add_check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})

    def attempt(self, check: str, part, *args: Any) -> Any:
        """Run one part; a part that fails becomes a failed check (with its log's end) and the rest go on,
        so one broken path on a borrowed GPU still leaves a report of the others."""
        try:
            return part(*args)
        except HdmapError as err:
            self.add_check(check, False, str(err))
            return None

    def run(self, bench: bool = True) -> dict[str, Any]:
        self.make_data()
        runs = [
            row
            for spec in plan_runs(self.device.type)
            if (row := self.attempt(f"train + evaluate, {spec.name}", self.training_run, spec)) is not None
        ]
        by_name = {r["name"]: r for r in runs}
        bf16, float32 = by_name.get("bf16"), by_name.get("float32")
        report: dict[str, Any] = {
            "shapes": self.shapes.__dict__ | {"steps": self.steps, "weights": self.weights},
            "runs": runs,
            "parity": metrics_parity(runs) if float32 else [],
            "skipped": [] if self.device.type == "cuda" else ["fp16 + GradScaler: fp16 autocast is CUDA-only"],
        }
        report["resume"] = self.attempt("resume (bf16)", self.resume, bf16) if bf16 else None
        report["predict"] = self.attempt("predict", self.predict, bf16, float32) if bf16 and float32 else None
        report["pyfunc"] = self.attempt("MLflow pyfunc model = evaluate", self.pyfunc, bf16) if bf16 else None
        report["bench"] = self.attempt("bench", self.bench) if bench else None
        report["checks"] = self.checks
        return report

    def training_run(self, run: RunSpec) -> dict[str, Any]:
        folder = self.make_folder(run.name, run)
        result = self.worker(folder, {"task": "train"}, f"train+evaluate {run.name}")
        row = {
            "name": run.name,
            "amp": run.amp,
            "cache": run.cache,
            "folder": folder.name,
            **result,
            **run_measures(folder, result["run_id"]),
        }
        aurocs = [m.get("auroc") for m in row["metrics"].values()]
        finite = all(v is not None and math.isfinite(v) for v in aurocs)
        self.add_check(
            f"train + evaluate, {run.name}",
            finite and row["inference_precision"] == "off",
            f"{self.steps} steps at {row['images_per_s']:.3g} img/s, {row['bad_steps']} skipped steps, "
            f"feature cache {row['feature_cache']}; mean AUROC {row['metrics']['mean']['auroc']:.2f} %",
        )
        return row

    def resume(self, reference: dict[str, Any]) -> dict[str, Any]:
        import torch

        from hdmap_ad.core import checkpoint
        from hdmap_ad.core.paths import MODEL_FILE, STATE_FILE

        run = RunSpec("bf16", reference["amp"], reference["cache"])
        folder = self.make_folder("bf16-resumed", run)
        stop = self.steps // 2 + 1
        first = self.worker(folder, {"task": "train", "interrupt_at": stop, "evaluate": False}, "bf16 stopped")
        saved = int(checkpoint.load(folder / STATE_FILE, checkpoint.STATE_KEYS)["step"])
        second = self.worker(folder, {"task": "train", "evaluate": False}, "bf16 resumed")
        resumed = checkpoint.load(folder / MODEL_FILE)
        uninterrupted = checkpoint.load(self.work / reference["folder"] / MODEL_FILE)
        ours, ref = resumed["model"], uninterrupted["model"]
        same_keys = set(ours) == set(ref)
        diff = max(float((ours[k].float() - ref[k].float()).abs().max()) for k in ref) if same_keys else float("inf")
        scale = max(float(ref[k].float().abs().max()) for k in ref)
        # The files differ in the run's folder (params paths), so weights and thresholds are compared.
        identical = (
            same_keys
            and all(torch.equal(ours[k], ref[k]) for k in ref)
            and resumed["thresholds"] == uninterrupted["thresholds"]
        )
        # CPU arithmetic is deterministic, so the weights must be equal; CUDA kernels (atomics in some
        # backward passes) need not be, so there they must only agree closely.
        ok = (
            first["interrupted"]
            and saved == stop - 1
            and (identical if self.device.type == "cpu" else diff <= 1e-2 * scale)
        )
        self.add_check(
            "resume (bf16)",
            ok,
            f"stopped before step {stop} (state saved at {saved}), resumed: weights and "
            "thresholds "
            + (
                "identical to the uninterrupted run's"
                if identical
                else f"differ by up to {diff:.2e} (|w| ≤ {scale:.2e})"
            ),
        )
        return {
            "stopped_before_step": stop,
            "state_step": saved,
            "identical": identical,
            "max_abs_diff": diff,
            "resumed_train_s": second["train_s"],
        }

    def predict(self, bf16: dict[str, Any], float32: dict[str, Any]) -> dict[str, Any]:
        import pandas as pd

        from hdmap_ad.core.paths import MODEL_FILE, SCORES_FILE

        domain = self.shapes.domains[0]
        out: dict[str, Any] = {"domain": domain}
        for label, run, precision in (("same", bf16, None), ("bf16 inference", float32, "bf16")):
            folder = self.work / run["folder"]
            csv = folder / f"predict-{precision or 'default'}.csv"
            argv = [
                sys.executable,
                "-m",
                "hdmap_ad.apps.cli",
                "predict",
                "--params",
                str(folder / "params.yaml"),
                "--model",
                str(folder / MODEL_FILE),
                "--device",
                str(self.device),
                str(self.work / "raw" / domain / "test"),
                "--out",
                str(csv),
            ]
            self.subprocess(
                argv + (["--precision", precision] if precision else []),
                folder,
                f"predict {run['name']} model" + (f" at {precision}" if precision else ""),
            )
            predicted = scores_by_file(pd.read_csv(csv))
            evaluated = scores_by_file(pd.read_csv(folder / SCORES_FILE).query("domain == @domain"))
            out[label] = agreement(evaluated, predicted)
        same = out["same"]
        self.add_check(
            "predict = evaluate (bf16-trained model, float32 inference)",
            same["n"] > 0 and same["max_rel_diff"] <= 1e-4,
            f"{same['n']} maps of {domain}, scores differ by up to {same['max_rel_diff']:.1e} relative",
        )
        b = out["bf16 inference"]
        self.add_check(
            "bf16 inference of the float32 model (measured; checked: finite, same maps)",
            b["n"] == same["n"] and math.isfinite(b["max_rel_diff"]),
            f"scores within {b['max_rel_diff']:.1e} relative (target 1e-2), "
            f"{100 * b['pairs_same_order']:.2f} % of map pairs in the same order (target 99 %)",
        )
        return out

    def pyfunc(self, run: dict[str, Any]) -> dict[str, Any]:
        import pandas as pd

        from hdmap_ad.core.paths import SCORES_FILE
        from hdmap_ad.pipeline.data import PreparedData

        folder, domain = self.work / run["folder"], self.shapes.domains[0]
        result = self.worker(
            folder,
            {
                "task": "pyfunc",
                "run_id": run["run_id"],
                "device": str(self.device),
                "prepared": str(self.work / "prepared"),
                "domain": domain,
            },
            "pyfunc model",
        )
        paths = PreparedData.load(self.work / "prepared").paths(domain, "test")
        served = scores_by_file(pd.DataFrame({"path": paths, "score": result["scores"]}))
        evaluated = scores_by_file(pd.read_csv(folder / SCORES_FILE).query("domain == @domain"))
        a = agreement(evaluated, served)
        self.add_check(
            "MLflow pyfunc model = evaluate",
            a["n"] > 0 and a["max_rel_diff"] <= 1e-4,
            f"{a['n']} maps, scores differ by up to {a['max_rel_diff']:.1e} relative; "
            f"loaded in {result['load_s']:.1f} s",
        )
        return {**a, "load_s": result["load_s"], "predict_s": result["predict_s"]}

    def bench(self) -> dict[str, Any]:
        folder = self.make_folder("bench", RunSpec("bench", "off", "auto"))
        out = folder / "bench.json"
        argv = [
            sys.executable,
            "-m",
            "hdmap_ad.apps.cli",
            "bench",
            "--params",
            str(folder / "params.yaml"),
            "--device",
            str(self.device),
            "--precision",
            "float32,bf16",
            *self.shapes.bench,
            "--out",
            str(out),
        ]
        self.subprocess(argv, folder, "bench")
        result = json.loads(out.read_text())
        summary = bench_summary(result)
        self.add_check(
            "bench",
            bool(summary["rows"]) and all(r["images_per_s"] > 0 for r in summary["rows"]),
            f"{len(summary['rows'])} phases measured; anomalib "
            + (result["anomalib"] or "not compared (not installed: pip install -e '.[bench]')"),
        )
        return summary


# --------------------------------------------------------------------------------------------------
# what the report holds


def tracking_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


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
