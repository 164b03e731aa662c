"""`hdmap-ad predict`: score HDMAP map files with a trained model and decide with its stored threshold.

    hdmap-ad predict --model models/model.safetensors data/raw/synthetic/domain_C/test --out predictions.csv

`--model` is a checkpoint file, an MLflow run id, a `runs:/<run id>[/<path>]` URI or a
`models:/<name>/<version>` (or `models:/<model id>`) URI; MLflow references are resolved in the
tracking store (`MLFLOW_TRACKING_URI` > `mlflow.tracking_uri` in --params > sqlite mlflow.db at the
repo root) and the checkpoint (`checkpoint/model.safetensors` of the run, or the checkpoint inside a logged
pyfunc model) is downloaded to a temporary folder (hdmap_ad.pipeline.model_source, shared with export).
A checkpoint is never unpickled: it is read as safetensors + JSON and checked against its recorded hash
(hdmap_ad.core.checkpoint); an old pickle-based one is refused with the `hdmap-ad checkpoint migrate`
command that converts it.

`--out` and `--maps` are checked to be writable before any map is scored.

Scoring goes through `inference.score_maps`, the path training validation and the evaluate stage
use, so the same file gets the same score here as in `metrics/scores.csv`.

Decisions: `is_anomaly = score >= threshold`. The threshold is the one stored in the checkpoint,
chosen at training time on the VALIDATION subset (Youden's J), never on test labels: the domain's
own threshold when the file's path has a component naming a domain the model was trained on
(e.g. `.../domain_A/...`), else the `pooled` one. `--threshold` replaces both.

Inputs: files, or folders searched recursively for .tif/.tiff/.png (hidden entries and
`ground_truth` folders, which hold fault masks rather than maps, are skipped). A file that cannot
be read, holds NaN/Inf, or is not 2-D (H×W or H×W×1) is reported as one line
`error: <path>: <what>` on stderr and skipped; the others are still scored and written, and the
exit status is 2. So is a map whose score is NaN/Inf (values so large they overflow the model's
arithmetic): it is reported the same way and left out of the CSV. Maps of another H×W than the
training maps are refused the same way by both backends (the threshold was chosen for one
geometry); `--resize` scores them after resizing (preprocessing resizes every map bilinearly to
`preprocess.resize`, as in training), with one warning per differing shape: such scores are not
comparable with the threshold, since the model only learned what normal maps of the training
geometry look like.

This module keeps its top-level imports light: every `hdmap-ad` call imports it to build the parser.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hdmap_ad.apps.parsing import add_command
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.pipeline.model_source import (
    CHECKPOINT_SUFFIX,
    check_source,
    expected_shape,
    is_mlflow_reference,
    register,
    resolve_model,
    tracking_uri_for,
)

if TYPE_CHECKING:
    import numpy as np


MAP_SUFFIXES = (".tif", ".tiff", ".png")
SKIP_DIRS = {"ground_truth"}
CSV_COLUMNS = ["path", "domain", "score", "is_anomaly"]

DESCRIPTION = """\
Score HDMAP maps with a trained model and write path,domain,score,is_anomaly to a CSV.

--model: a checkpoint file (models/model.safetensors), an MLflow run id, runs:/<run id>[/<artifact path>],
or models:/<name>/<version> (models:/<model id>); MLflow references are downloaded from the
tracking store (MLFLOW_TRACKING_URI, else mlflow.tracking_uri of --params, else mlflow.db at the
repo root).

INPUT: map files or folders (searched recursively for .tif/.tiff/.png; `ground_truth` folders and
hidden entries are skipped). The domain is taken from a path component naming a domain the model
knows (e.g. domain_A); is_anomaly = score >= threshold, where the threshold is that domain's
(else the pooled one) as chosen on the validation subset at training time, or --threshold.

Unreadable / NaN / non-2-D inputs are reported as `error: <path>: <what>` and skipped; the rest is
scored and written; the exit status is then 2. So are maps whose score is NaN/Inf, and maps of
another H×W than the training maps (unless --resize: then scored after resizing, PyTorch only).

--register NAME registers the run's MLflow pyfunc model (logging it from the checkpoint first if
the run has none) as a new version of NAME; INPUT may then be omitted.

--backend onnx scores with an exported model (`hdmap-ad export`, a .onnx file or the MLflow model
it was logged as) on onnxruntime, float32 on the CPU: same CSV, thresholds and decisions.
"""


# --------------------------------------------------------------------------------------------------
# which domain a file belongs to, and the shape it should have


def infer_domain(path: Path, domains: Sequence[str]) -> str | None:
    """The innermost path component (of the absolute path) that is one of the model's domains."""
    known = set(domains)
    for part in reversed(Path(path).absolute().parts):
        if part in known:
            return part
    return None


# --------------------------------------------------------------------------------------------------
# inputs


@dataclass
class Input:
    path: Path  # as found (relative paths stay relative)
    rel: Path  # path below the INPUT argument it came from (names the --maps picture)


@dataclass
class Collected:
    inputs: list[Input] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, what)


def _walk(folder: Path) -> Iterable[Path]:
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            if child.name not in SKIP_DIRS:
                yield from _walk(child)
        elif child.suffix.lower() in MAP_SUFFIXES:
            yield child


def collect_inputs(items: Sequence[str | Path]) -> Collected:
    """Expand INPUT arguments to map files, in a stable order, each file once."""
    out, seen = Collected(), set()
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = list(_walk(path))
            if not found:
                out.errors.append((str(path), f"no {'/'.join(MAP_SUFFIXES)} maps in this folder"))
            pairs = [(f, f.relative_to(path)) for f in found]
        elif path.is_file():
            pairs = [(path, Path(path.name))]
        else:
            out.errors.append((str(path), "no such file or folder"))
            continue
        for f, rel in pairs:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.inputs.append(Input(f, rel))
    return out


# --------------------------------------------------------------------------------------------------
# the command


def _picture_paths(inputs: Sequence[Input], root: Path) -> list[Path]:
    """DIR/<path below the INPUT argument>.png, unique."""
    out, used = [], set()
    for item in inputs:
        base = root / item.rel.with_suffix(".png")
        candidate, n = base, 1
        while candidate in used:
            candidate = base.with_name(f"{base.stem}_{n}.png")
            n += 1
        used.add(candidate)
        out.append(candidate)
    return out


def _display_map(amap: np.ndarray, crop: Sequence[int]) -> np.ndarray:
    """The anomaly map (computed at the square score size) back at the model input's aspect, for display."""
    import numpy as np
    import torch

    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=tuple(crop), mode="bilinear", align_corners=False)[0, 0].numpy()


def _check_writable(flag: str, path: Path, folder: bool) -> None:
    """Fail before any scoring when `path` (a file, or with `folder` a folder) cannot be written:
    it is the wrong kind of entry, or its nearest existing parent is not a writable folder."""
    import os
    import tempfile

    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        if folder:
            raise HdmapError(f"{flag} {path}: is a file, not a folder")
        raise HdmapError(f"{flag} {path}: is a folder; give a file name, e.g. {path / 'predictions.csv'}")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise HdmapError(f"{flag} {path}: {parent} is a file, not a folder")
    try:  # os.access is not enough (root, read-only mounts): create and remove a probe file
        fd, probe = tempfile.mkstemp(prefix=".hdmap-write-check-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise HdmapError(f"{flag} {path}: cannot write in {parent} ({err.strerror or err})") from None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def run_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd

    from hdmap_ad.core import inference
    from hdmap_ad.core.checkpoint import load_trained
    from hdmap_ad.core.files import write_text
    from hdmap_ad.core.runtime import progress_iter, select_device
    from hdmap_ad.pipeline.data import read_map

    if not args.inputs and not args.register:
        raise HdmapError("predict: give at least one INPUT file or folder (or --register NAME)")
    if args.batch_size is not None and args.batch_size <= 0:
        raise HdmapError(f"--batch-size {args.batch_size}: must be positive")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise HdmapError(f"--threshold {args.threshold}: must be a finite number")
    onnx = args.backend == "onnx"
    if onnx:  # the exported graph runs in float32 on onnxruntime's CPU provider, and is no MLflow run's model
        for flag, bad in (
            ("--device", args.device not in ("auto", "cpu")),
            ("--register", bool(args.register)),
            ("--precision", args.precision not in (None, "off")),
            ("--resize", args.resize),
        ):
            if bad:
                raise HdmapError(f"{flag}: not available with --backend onnx (float32 on the CPU, an exported file)")
    if args.inputs:  # before the scoring work, not after it
        _check_writable("--out", Path(args.out), folder=False)
        if args.maps is not None:
            _check_writable("--maps", Path(args.maps), folder=True)

    def report(path: str, what: str) -> None:
        print(f"error: {path}: {what}", file=sys.stderr, flush=True)

    collected = collect_inputs(args.inputs)
    for path, what in collected.errors:
        report(path, what)

    try:
        device = select_device("cpu" if onnx else args.device)
    except HdmapError as err:
        raise HdmapError(str(err).replace("runtime.device=", "--device ")) from None
    except RuntimeError:
        raise HdmapError(f"--device {args.device!r}: expected auto, cpu, cuda or cuda:N") from None
    uri = tracking_uri_for(args.params, args.set) if (is_mlflow_reference(args.model) or args.register) else ""
    if uri:  # a dead or read-only store is one line within seconds, not minutes of retries
        from hdmap_ad.pipeline.store_check import check_store

        check_store(uri, write=False)
    with contextlib.ExitStack() as stack:
        import tempfile

        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hdmap-predict-")))
        resolved = resolve_model(args.model, workdir, uri, suffix=".onnx" if onnx else CHECKPOINT_SUFFIX)
        if onnx:
            from hdmap_ad.core.onnx_scorer import OnnxScorer

            if resolved.checkpoint.suffix != ".onnx":
                raise HdmapError(
                    f"--model {args.model}: --backend onnx needs an exported .onnx model (hdmap-ad export), "
                    f"not {resolved.checkpoint.name}"
                )
            scorer = OnnxScorer(resolved.checkpoint)
            check_source(resolved, scorer.info.get("model_sha256"))
            trained = scorer  # domains and thresholds, as the decision rule reads them
        else:
            trained = load_trained(resolved.checkpoint, device)
            check_source(resolved, trained.info.get("sha256"))
        if args.register:
            registered = register(resolved, trained, args.register, uri)
            print(f"registered {registered}", file=sys.stderr)

        inputs, maps, failed = [], [], len(collected.errors)
        with progress_iter(len(collected.inputs), "reading maps") as bar:
            for item in collected.inputs:
                try:
                    maps.append(read_map(item.path))
                    inputs.append(item)
                except HdmapError as err:
                    message = str(err)
                    prefix = f"{item.path}: "
                    report(str(item.path), message[len(prefix) :] if message.startswith(prefix) else message)
                    failed += 1
                bar.update(1)
        if not args.inputs:
            return 0
        if not inputs:
            raise HdmapError(f"no map could be scored ({failed} input(s) failed); {args.out} not written")

        # Both backends refuse another H×W unless --resize (torch only): the threshold was chosen for one shape
        want = scorer.input_shape if onnx else expected_shape(trained)
        if want is not None and not args.resize:
            keep = [i for i, m in enumerate(maps) if tuple(m.shape) == want]
            for i in sorted(set(range(len(maps))) - set(keep)):
                report(
                    str(inputs[i].path),
                    f"shape {maps[i].shape[0]}x{maps[i].shape[1]}, the model was trained on {want[0]}x{want[1]} maps"
                    + (" (the exported graph does not resize)" if onnx else " (--resize scores it after resizing)"),
                )
            failed += len(maps) - len(keep)
            inputs, maps = [inputs[i] for i in keep], [maps[i] for i in keep]
            if not inputs:
                raise HdmapError(f"no map could be scored ({failed} input(s) failed); {args.out} not written")
        elif want is not None:
            odd: dict[tuple[int, int], int] = {}
            for m in maps:
                if tuple(m.shape) != want:
                    odd[tuple(m.shape)] = odd.get(tuple(m.shape), 0) + 1
            for shape, count in odd.items():
                print(
                    f"warning: {count} map(s) of shape {shape[0]}x{shape[1]}, the model was trained on {want[0]}x{want[1]}: "
                    "scored after resizing (--resize), but the threshold was not chosen for them",
                    file=sys.stderr,
                )

        if onnx:
            print(f"backend: onnxruntime (float32 on the CPU), {resolved.checkpoint}", file=sys.stderr)
            scores, amaps = scorer.score(np.stack(maps), args.batch_size, keep_maps=args.maps is not None)
        else:
            batch_size = args.batch_size or trained.params.evaluate.batch_size
            from hdmap_ad.core.runtime import precision_label, resolve_precision

            amp = args.precision or trained.params.evaluate.amp
            precision = resolve_precision(device, amp, "--precision" if args.precision else "evaluate.amp")
            print(f"precision: {precision_label(precision)} ({amp} on {device})", file=sys.stderr)
            scores, amaps = inference.score_arrays(
                trained, maps, device, batch_size, keep_maps=args.maps is not None, description="predict", amp=precision
            )
        # A NaN/Inf score is a map that could not be scored (values so large they overflow the model's
        # arithmetic): reported and left out like any other failure, never written as an empty score
        finite = np.isfinite(scores)
        for i in np.flatnonzero(~finite):
            report(
                str(inputs[i].path),
                f"the model's score is NaN/Inf (largest absolute value in the map {float(np.abs(maps[i]).max()):.3g}); "
                "values this large overflow the model's arithmetic",
            )
        if not finite.all():
            failed += int((~finite).sum())
            keep = np.flatnonzero(finite).tolist()
            inputs, maps, scores = [inputs[i] for i in keep], [maps[i] for i in keep], scores[keep]
            amaps = [amaps[i] for i in keep] if amaps is not None else None
            if not inputs:
                raise HdmapError(f"no map could be scored ({failed} input(s) failed); {args.out} not written")
        domains = [infer_domain(item.path, trained.domains) for item in inputs]
        rows, thresholds = [], []
        for item, domain, score in zip(inputs, domains, scores):
            thr = inference.threshold_for(trained, domain, args.threshold)
            thresholds.append(thr)
            flag = inference.decide(np.asarray([score]), thr)[0]
            rows.append(
                {
                    "path": str(item.path),
                    "domain": domain or "",
                    "score": float(score),
                    "is_anomaly": "" if flag is None else int(flag),
                }
            )
        if any(t is None for t in thresholds):
            print(
                "warning: the checkpoint stores no usable threshold for some maps (is_anomaly left empty); "
                "pass --threshold",
                file=sys.stderr,
            )
        out = write_text(pd.DataFrame(rows, columns=CSV_COLUMNS).to_csv(index=False), Path(args.out))

        if args.maps is not None:
            from hdmap_ad.pipeline.plots import plot_map_pair

            pictures = _picture_paths(inputs, Path(args.maps))
            with progress_iter(len(inputs), "anomaly maps") as bar:
                for item, m, amap, row, thr, picture in zip(inputs, maps, amaps, rows, thresholds, pictures):
                    verdict = {"": "?", 1: "ANOMALY", 0: "normal"}[row["is_anomaly"]]
                    title = f"{item.path}  score {_fmt(row['score'])}  threshold {_fmt(thr)}  {verdict}"
                    crop = scorer.crop if onnx else trained.params.preprocess.crop
                    plot_map_pair(m, _display_map(amap, crop), title, picture)
                    bar.update(1)

        n_anomalous = sum(1 for r in rows if r["is_anomaly"] == 1)
        note = f" (--threshold {args.threshold:g})" if args.threshold is not None else " (validation thresholds)"
        print(
            f"scored {len(rows)} map(s), {n_anomalous} anomalous{note}, {failed} failed -> {out}"
            + (f"; anomaly maps in {args.maps}" if args.maps is not None else ""),
            file=sys.stderr,
        )
    return 2 if failed else 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = add_command(
        sub, common, "predict", "score map files with a trained model (CSV of scores and decisions)", DESCRIPTION
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="map files or folders (.tif/.tiff/.png, recursive)")
    p.add_argument(
        "--model", required=True, help="checkpoint path | MLflow run id | runs:/<run id>/... | models:/<name>/<version>"
    )
    p.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    p.add_argument("--maps", metavar="DIR", help="also write one PNG per input: the map and its anomaly map")
    p.add_argument(
        "--threshold", type=float, help="decision threshold for every map (default: the stored validation thresholds)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int, help="maps per batch (default: the model's evaluate.batch_size)")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp16", "off"],
        help="inference precision (default: the model's evaluate.amp; auto: bf16 where native, else float32)",
    )
    p.add_argument(
        "--resize",
        action="store_true",
        help="score maps of another H×W than the training maps after resizing them (default: refuse them);\n"
        "the threshold was not chosen for them. PyTorch backend only",
    )
    p.add_argument("--register", metavar="NAME", help="register the run's MLflow pyfunc model as a new version of NAME")
    p.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        default="torch",
        help="torch: the checkpoint on PyTorch (default); onnx: an exported model (hdmap-ad export) on onnxruntime",
    )
    p.set_defaults(func=run_predict)
    return p
