"""`hdmap-ad export`: a trained model as one portable ONNX file, checked against PyTorch.

    hdmap-ad export --model models/model.safetensors --format onnx      # writes exports/model.onnx

`--model` is resolved as `predict` resolves it (a checkpoint file, an MLflow run id, runs:/...,
models:/...). The graph (hdmap_ad.core.export) takes raw maps N×H×W float32 of the training maps'
H×W and returns the anomaly maps and image scores; thresholds, domains, preprocessing, the training
run, the code commit and the checkpoint's sha256 are in its metadata. After writing, the file is
loaded in onnxruntime and its scores on a few maps are compared with PyTorch's; a difference above
1e-3 relative fails the command. Without `--out` the file goes to exports/model.onnx at the repository
root, a git-ignored folder: an export is a build product, not a source file. `--log-model` also logs it as an MLflow pyfunc model (the served
model on onnxruntime, no PyTorch needed) into the run that trained the model.

This module keeps its top-level imports light: every `hdmap-ad` call imports it to build the parser.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from hdmap_ad.apps.parsing import add_command
from hdmap_ad.core.errors import HdmapError

FORMATS = ("onnx",)
PARITY_MAPS = 4  # maps compared between onnxruntime and PyTorch after export
PARITY_RTOL = 1e-3  # the export test holds 1e-4; this is the command's alarm threshold
ONNX_MODEL_NAME = "model_onnx"  # the pyfunc model's name in the run with --log-model
# Without --out, relative to the repository root: git-ignored (.gitignore), apart from the DVC outputs in models/
DEFAULT_OUT = Path("exports/model.onnx")


def _shape(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", text)
    if not m or min(int(m.group(1)), int(m.group(2))) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HxW, e.g. 31x95")
    return int(m.group(1)), int(m.group(2))


def _training_run(resolved, trained, uri: str) -> str | None:
    """The MLflow run that trained the model: named by --model; else recorded in models/run.json for
    this very file (matched by its content hash); else the newest run of the store `uri` tagged with
    that hash (after `dvc exp apply` or `dvc checkout`, run.json still names the run of the model that
    was there before). None when no store or run is found: the export does not need one."""
    from hdmap_ad.core.paths import RUN_FILE, repo_root
    from hdmap_ad.pipeline.model_source import run_of_model

    if resolved.run_id:
        return resolved.run_id
    if trained.info.get("run_id"):
        return str(trained.info["run_id"])
    sha256 = trained.info.get("sha256")
    try:
        recorded = json.loads((repo_root() / RUN_FILE).read_text())
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, dict) and sha256 and recorded.get("model_sha256") == sha256:
        return recorded.get("run_id")
    if not sha256:
        return None
    try:
        return run_of_model(sha256, uri, create=False)
    except HdmapError:
        return None  # no usable store: the export says `run unknown`


def parity(trained, onnx_path: Path, map_shape: tuple[int, int], n: int = PARITY_MAPS) -> tuple[float, float]:
    """Largest relative score difference and largest absolute map difference, onnxruntime vs
    PyTorch (float32 on the CPU), on `n` fixed pseudo-random maps in [0, 1.5)."""
    import numpy as np
    import torch

    from hdmap_ad.core.export import map_scorer
    from hdmap_ad.core.onnx_scorer import OnnxScorer

    maps = (np.random.default_rng(0).random((n, *map_shape)) * 1.5).astype(np.float32)
    scores, amaps = OnnxScorer(onnx_path).score(maps, keep_maps=True)
    with torch.inference_mode():
        ref_maps, ref_scores = map_scorer(trained)(torch.from_numpy(maps))
    ref = ref_scores.double().numpy()
    rel = float(np.max(np.abs(scores - ref) / np.maximum(np.abs(ref), 1e-12)))
    return rel, float(np.max(np.abs(amaps - ref_maps.numpy())))


def run_export(args: argparse.Namespace) -> int:
    import contextlib
    import tempfile

    import torch

    from hdmap_ad.core.checkpoint import load_trained
    from hdmap_ad.core.export import export_onnx
    from hdmap_ad.core.paths import repo_root
    from hdmap_ad.pipeline import tracking
    from hdmap_ad.pipeline.model_source import (
        check_source,
        expected_shape,
        is_mlflow_reference,
        resolve_model,
        tracking_uri_for,
    )

    out = Path(args.out) if args.out else repo_root() / DEFAULT_OUT
    if out.exists() and out.is_dir():
        raise HdmapError(f"--out {out}: is a folder; give a file name, e.g. {out / 'model.onnx'}")
    if is_mlflow_reference(args.model) or args.log_model:
        uri = tracking_uri_for(args.params, args.set)
    else:  # the store is only searched for the run that trained the file: a bad --params must not stop the export
        try:
            uri = tracking_uri_for(args.params, args.set)
        except HdmapError:
            uri = tracking.tracking_uri()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hdmap-export-")))
        resolved = resolve_model(args.model, workdir, uri)
        trained = load_trained(resolved.checkpoint, torch.device("cpu"))
        check_source(resolved, trained.info.get("sha256"))
        shape = args.map_shape or expected_shape(trained)
        if shape is None:
            raise HdmapError(
                f"--model {args.model}: the checkpoint does not record its maps' size; give --map-shape HxW"
            )
        run_id = _training_run(resolved, trained, uri)
        # written beside --out and moved there only once it passed the parity check
        out.parent.mkdir(parents=True, exist_ok=True)
        unchecked = out.with_name(f".{out.name}.unchecked-{os.getpid()}")
        stack.callback(unchecked.unlink, missing_ok=True)
        export_onnx(trained, unchecked, shape, run_id=run_id, commit=tracking.git_commit())
        rel, diff = parity(trained, unchecked, shape)
        if not rel <= PARITY_RTOL:
            raise HdmapError(
                f"{out}: not written: onnxruntime scores differ from PyTorch's by {rel:.2e} relative "
                f"(> {PARITY_RTOL:g}), the exported graph is wrong; please report it"
            )
        os.replace(unchecked, out)
        print(
            f"exported {out} ({out.stat().st_size / 2**20:.1f} MiB; input N×{shape[0]}×{shape[1]} float32; "
            f"run {run_id or 'unknown'}); onnxruntime vs PyTorch: score rel. diff {rel:.1e}, map abs. diff {diff:.1e}",
            file=sys.stderr,
        )
        if args.log_model:
            if not run_id:
                raise HdmapError(
                    f"--log-model: no MLflow run is known for {args.model}; give the run (runs:/<run id>) as --model"
                )
            import mlflow

            from hdmap_ad.pipeline import serving

            mlflow.set_tracking_uri(uri)
            with mlflow.start_run(run_id=run_id):
                model_uri = serving.log_pyfunc_model(out, artifact_path=ONNX_MODEL_NAME)
            print(f"logged the ONNX pyfunc model into run {run_id}: {model_uri}", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = add_command(
        sub,
        common,
        "export",
        "export a trained model as one ONNX file (scores without PyTorch)",
        __doc__.split("\n\nThis module")[0],
    )
    p.add_argument(
        "--model", required=True, help="checkpoint path | MLflow run id | runs:/<run id>/... | models:/<name>/<version>"
    )
    p.add_argument("--format", default="onnx", choices=FORMATS, help="export format (default: onnx)")
    p.add_argument("--out", help=f"file to write (default: {DEFAULT_OUT} at the repository root, a git-ignored folder)")
    p.add_argument(
        "--map-shape",
        type=_shape,
        metavar="HxW",
        help="H×W of the maps the graph takes (default: the training maps', recorded in the checkpoint)",
    )
    p.add_argument(
        "--log-model",
        action="store_true",
        help=f"also log it as an MLflow pyfunc model ({ONNX_MODEL_NAME}) into the run that trained the model",
    )
    p.set_defaults(func=run_export)
    return p
