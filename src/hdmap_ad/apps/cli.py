"""`hdmap-ad`: the command line. Each subcommand is a thin entry point over one module.

The DVC stages call these commands; users call them directly too. Errors about input are one line
(`error: ...`, exit status 2); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from hdmap_ad import __version__
from hdmap_ad.apps.parsing import add_command
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.paths import TRAIN_CONFIG_FILE

EPILOG = """\
typical use (from the repository root):
  dvc repro                                   run synth -> prepare -> train -> evaluate -> compare
  dvc exp run -S method=focal -S seed=44      one experiment with other settings
  hdmap-ad grid --methods baseline,gem --seeds 42,43 --jobs 2
                                              queue a methods x seeds grid and run it
  hdmap-ad show                               print the last evaluation's metrics table

All tunable settings live in params.yaml (validated on load); --params points at another file.
"""


def _params(args: argparse.Namespace):
    from hdmap_ad.core.config import load_params

    return load_params(args.params, args.set)


def cmd_synth(args: argparse.Namespace) -> int:
    from hdmap_ad.core.config import load_params
    from hdmap_ad.pipeline.synth import SynthConfig, generate

    # the flags are `synth.*` overrides, so they are checked as params.yaml's values are (one line naming the key)
    flags = {k: getattr(args, k) for k in ("n_train", "n_test_good", "n_test_fault", "height", "width", "seed")}
    overrides = args.set + [f"synth.{k}={v}" for k, v in flags.items() if v is not None]
    p = load_params(args.params, overrides).synth
    cfg = SynthConfig(**p.model_dump())
    out = Path(args.out or p.out)
    generate(out, cfg)
    print(
        f"synthetic HDMAP written to {out} (seed {cfg.seed}, {cfg.n_train} train, "
        f"{cfg.n_test_good}+{cfg.n_test_fault} test maps per domain, {cfg.height}x{cfg.width})"
    )
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    import json

    from hdmap_ad.core.runtime import console
    from hdmap_ad.pipeline.data import prepare_dataset, summary_table

    params = _params(args)
    out = Path(params.data.prepared)
    prepare_dataset(params.data_root, params.data.domains, out)
    summary = json.loads((out / "summary.json").read_text())
    console.print(summary_table(summary))
    return 0


def cmd_configure(args: argparse.Namespace) -> int:
    from hdmap_ad.core.files import write_json

    params = _params(args)  # validates everything: a typo in method or any value stops here, before DVC trains
    out = Path(args.out)
    write_json(params.training_config(), out)
    print(
        f"{out}: {params.method} seed {params.seed}, profile {params.profile}, training fingerprint "
        f"{params.training_fingerprint()}"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hdmap_ad.pipeline.training import train

    summary = train(_params(args), expected_config=args.expect_config, params_file=args.params, overrides=args.set)
    print(f"trained: MLflow run {summary['run_id']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from hdmap_ad.pipeline.evaluation import evaluate

    evaluate(_params(args))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from rich.console import Console

    from hdmap_ad.pipeline.evaluation import EVAL_FILE, metrics_table, read_results

    path = Path(args.file or EVAL_FILE)
    if not path.is_file():
        raise HdmapError(
            f"{path}: no evaluation yet (run `dvc repro`)" if args.file is None else f"{path}: file not found"
        )
    metrics, details = read_results(path)
    out = Console()
    if not out.is_terminal:
        out = Console(width=140)
    out.print(metrics_table(metrics, f"{path} (%)", details))
    return 0


def cmd_init_tracking(args: argparse.Namespace) -> int:
    from hdmap_ad.pipeline import tracking
    from hdmap_ad.pipeline.store_check import open_experiment

    params = _params(args)
    # within seconds: a dead server or a read-only store is one line, not minutes of retries
    exp_id = open_experiment(params.mlflow.experiment, params.mlflow.tracking_uri)
    open_experiment(tracking.compare_experiment_name(params.mlflow.experiment), params.mlflow.tracking_uri)
    print(
        f"MLflow experiment {params.mlflow.experiment!r} (id {exp_id}) at {tracking.tracking_uri(params.mlflow.tracking_uri)}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hdmap-ad",
        description="Dinomaly anomaly detection on HDMAP maps, tracked with DVC and MLflow.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", type=Path, help="parameter file (default: params.yaml)")
    common.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter for this call, e.g. --set method=focal --set train.steps=500",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help_text: str, description: str | None = None) -> argparse.ArgumentParser:
        p = add_command(sub, common, name, help_text, description)
        p.set_defaults(func=func)
        return p

    p = add(
        "synth",
        cmd_synth,
        "write a synthetic HDMAP dataset (the embedded default data)",
        "Write synthetic HDMAP maps in the real layout (<root>/domain_X/{train/good,test/good,test/fault}) as\n"
        "float32 TIFFs, with a pixel mask per fault map under ground_truth/fault. Defaults come from the\n"
        "`synth` section of params.yaml; flags override them.",
    )
    p.add_argument("--out", help="output folder (default: synth.out)")
    p.add_argument("--seed", type=int, help="generator seed (default: synth.seed)")
    p.add_argument("--n-train", type=int, help="train/good maps per domain")
    p.add_argument("--n-test-good", type=int, help="test/good maps per domain")
    p.add_argument("--n-test-fault", type=int, help="test/fault maps per domain")
    p.add_argument("--height", type=int, help="map height (rows)")
    p.add_argument("--width", type=int, help="map width (columns)")

    add(
        "prepare",
        cmd_prepare,
        "validate the raw maps and pack them for training",
        "Read every map of the selected domains (data.root / data.domains), validate it\n"
        "(readable, finite, 2-D, one shape), and write data/prepared/: manifest.csv, per-domain packed\n"
        "float32 arrays, and summary.json. On any error nothing in data/prepared/ changes.",
    )
    p = add(
        "configure",
        cmd_configure,
        "validate params.yaml and write the resolved training config",
        "Validate params.yaml, resolve the profile and the chosen method's section, and write what changes a\n"
        "trained model (no run-time settings) to models/train_config.json. The DVC train stage depends on\n"
        "that file, so DVC retrains exactly when it changes, and a bad value fails here with one line.",
    )
    p.add_argument("--out", default=str(TRAIN_CONFIG_FILE), help=f"output file (default: {TRAIN_CONFIG_FILE})")
    p = add(
        "train",
        cmd_train,
        "train one multi-class model over all selected domains",
        "Train Dinomaly with the chosen `method` and `seed` on the prepared data. Logs to MLflow, writes\n"
        "models/model.safetensors and metrics/train.json; resumes from models/train_state/last.safetensors (runtime.resume).",
    )
    p.add_argument(
        "--expect-config",
        type=Path,
        metavar="FILE",
        help="refuse to train (or to finish) unless params still resolve to this training config\n"
        "(the DVC stage passes models/train_config.json: it catches a second `dvc exp run` that\n"
        "rewrote params.yaml in the same workspace while this one ran)",
    )
    add(
        "evaluate",
        cmd_evaluate,
        "score every test map per domain and write metrics and plots",
        "Write metrics/eval.json (headline metrics in %), metrics/eval_details.json (counts, thresholds,\n"
        "validity), metrics/scores.csv and plots/, and log them to the training run in MLflow.",
    )
    p = add("show", cmd_show, "print an evaluation's metrics table")
    p.add_argument(
        "file",
        nargs="?",
        help="eval.json to show (default: metrics/eval.json; the eval_details.json beside it adds validity and counts)",
    )
    add("init-tracking", cmd_init_tracking, "create the MLflow store and experiment (run once before parallel workers)")

    # the larger commands live beside their own module, each adding its subcommand
    from hdmap_ad.apps import bench, checkpoint_cli, compare, export, gpucheck, grid, predict, serve
    from hdmap_ad.apps.bench import onnx as bench_onnx

    for module in (predict, serve, export, compare, grid, bench, bench_onnx, gpucheck, checkpoint_cli):
        module.add_parser(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our own bars say enough
    warnings.filterwarnings("ignore", category=FutureWarning, module="mlflow")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HdmapError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
