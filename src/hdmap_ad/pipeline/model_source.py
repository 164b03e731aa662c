"""Where a model comes from: a checkpoint file or folder, an MLflow run id, `runs:/<run id>[/<path>]` or
`models:/<name>/<version>` (`models:/<model id>`), resolved to a local file; and registering a run's model.

MLflow references are looked up in the tracking store (`tracking_uri_for`: `MLFLOW_TRACKING_URI` >
`mlflow.tracking_uri` of the params file > sqlite mlflow.db at the repo root) and downloaded to a folder
the caller owns. `hdmap-ad predict` and `hdmap-ad export` share this. Top-level imports stay light (no
mlflow, no torch): the CLI imports it to build its parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.paths import LEGACY_SUFFIX, MODEL_FILE
from hdmap_ad.pipeline.tracking import CHECKPOINT_ARTIFACT_DIR

if TYPE_CHECKING:
    from hdmap_ad.core.checkpoint import TrainedModel

CHECKPOINT_SUFFIX = MODEL_FILE.suffix  # .safetensors; LEGACY_SUFFIX (.pt) is still found, same content
CHECKPOINT_ARTIFACT = f"{CHECKPOINT_ARTIFACT_DIR}/{MODEL_FILE.name}"  # the model file in its training run
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def tracking_uri_for(params_file: Path | str, overrides: list[str] | None = None) -> str:
    """The MLflow store a command's `--params` file (with its `--set` overrides) points at (see
    `tracking.tracking_uri`); the default params.yaml may be absent."""
    from hdmap_ad.pipeline import tracking

    configured = None
    params_file = Path(params_file)
    if params_file.is_file():
        from hdmap_ad.core.config import load_params

        configured = load_params(params_file, overrides).mlflow.tracking_uri
    elif str(params_file) != "params.yaml":
        raise HdmapError(f"--params {params_file}: not found")
    return tracking.tracking_uri(configured)


def expected_shape(trained: TrainedModel) -> tuple[int, int] | None:
    """The training maps' H×W when the checkpoint tells it (map_shape, or the synthetic data's size)."""
    from hdmap_ad.core.decision import map_shape

    return map_shape(trained)


def is_mlflow_reference(spec: str) -> bool:
    return spec.startswith(("runs:/", "models:/")) or bool(_RUN_ID.match(spec))


def find_checkpoint(folder: Path, suffix: str = CHECKPOINT_SUFFIX) -> Path:
    """The checkpoint (`suffix` .safetensors, or .onnx for an exported model) inside a downloaded artifact
    folder (a pyfunc model's artifacts/, or a run's checkpoint/). A checkpoint logged under its old name
    (model.pt, runs and pyfunc models from before the rename) is found too: its content is the same."""
    folder = Path(folder)
    if folder.is_file():
        return folder
    suffixes = (suffix, LEGACY_SUFFIX) if suffix == CHECKPOINT_SUFFIX else (suffix,)
    for s in suffixes:
        for candidate in (
            folder / "artifacts" / f"model{s}",
            folder / f"model{s}",
            folder / CHECKPOINT_ARTIFACT_DIR / f"model{s}",
        ):
            if candidate.is_file():
                return candidate
    for s in suffixes:
        found = sorted(folder.rglob(f"*{s}"))
        if len(found) == 1:
            return found[0]
    found = sorted(folder.rglob(f"*{suffix}"))
    what = f"no {suffix} model" if not found else f"{len(found)} {suffix} files, none at artifacts/model{suffix}"
    raise HdmapError(f"{folder}: {what} in the downloaded MLflow artifacts (is this an hdmap-ad model?)")


@dataclass
class ResolvedModel:
    checkpoint: Path
    run_id: str | None  # the MLflow run the reference names, when it names one
    source: str  # the --model value, for messages
    source_run: str | None = None  # the run that trained the model (for models:/ too), when known
    run_sha256: str | None = None  # that run's model_sha256 tag: what the downloaded file must be


def check_source(resolved: ResolvedModel, model_sha256: str | None) -> None:
    """A model fetched from MLflow must be the one its run trained: `model_sha256` (a loaded checkpoint's
    verified hash, or the checkpoint an exported ONNX file records) against the run's model_sha256 tag.
    Catches an artifact replaced after training; not someone who can also retag the run (docs/design.md
    #pipe-provenance)."""
    if resolved.run_sha256 is None:
        return
    if model_sha256 != resolved.run_sha256:
        raise HdmapError(
            f"--model {resolved.source}: the downloaded model (sha256 {str(model_sha256)[:12]}) is not the one run "
            f"{resolved.source_run} trained (its model_sha256 {resolved.run_sha256[:12]}): its artifact was replaced "
            "or altered after training; not used"
        )


def _source_run(spec: str, client) -> str | None:
    """The run that logged the model a models:/ URI names (a logged model id, name/version or name@alias)."""
    rest = spec[len("models:/") :].strip("/")
    if "/" in rest:
        name, version = rest.split("/", 1)
        return client.get_model_version(name, version).run_id if version.isdigit() else None
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return client.get_model_version_by_alias(name, alias).run_id
    return client.get_logged_model(rest).source_run_id


def resolve_model(spec: str, workdir: Path, tracking_uri: str, suffix: str = CHECKPOINT_SUFFIX) -> ResolvedModel:
    """A local checkpoint path for `spec`, downloading MLflow artifacts into `workdir` when needed
    (`suffix` .onnx: an exported model, e.g. the artifacts of an ONNX pyfunc model)."""
    local = Path(spec)
    if local.is_file():
        return ResolvedModel(local, None, spec)
    if local.is_dir():  # e.g. a downloaded pyfunc model folder
        return ResolvedModel(find_checkpoint(local, suffix), None, spec)
    if not is_mlflow_reference(spec):
        raise HdmapError(
            f"--model {spec}: not a checkpoint file, an MLflow run id, runs:/<run id>/... or models:/<name>/<version>"
        )

    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one progress bar is ours
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    run_id: str | None = None
    try:
        # a run's checkpoint folder, not its file: older runs hold the same content as model.pt
        if _RUN_ID.match(spec):
            run_id, uri = spec, f"runs:/{spec}/{CHECKPOINT_ARTIFACT_DIR}"
        elif spec.startswith("runs:/"):
            rest = spec[len("runs:/") :].strip("/")
            run_id, _, artifact = rest.partition("/")
            uri = f"runs:/{run_id}/{artifact or CHECKPOINT_ARTIFACT_DIR}"
            mlflow.MlflowClient().get_run(run_id)  # a clear "run not found" before any download
        else:
            uri = spec
        target = workdir / "download"
        target.mkdir(parents=True, exist_ok=True)
        downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
        client = mlflow.MlflowClient()
        source_run = run_id or _source_run(spec, client)
        run_sha256 = client.get_run(source_run).data.tags.get("model_sha256") if source_run else None
    except MlflowException as err:
        first = (str(err.message if hasattr(err, "message") else err).strip().splitlines() or ["?"])[0][:300]
        raise HdmapError(f"--model {spec}: cannot fetch it from the MLflow store {tracking_uri}: {first}") from None
    except OSError as err:
        raise HdmapError(f"--model {spec}: download from {tracking_uri} failed: {err}") from None
    return ResolvedModel(find_checkpoint(downloaded, suffix), run_id, spec, source_run, run_sha256)


def run_of_model(model_sha256: str, tracking_uri: str, create: bool = True) -> str | None:
    """The newest active run, in any experiment of the store, tagged `model_sha256` with this hash (what
    training tags its run with), or None. With `create=False` a local store that does not exist is not
    created (None). An unusable store is an HdmapError naming it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from hdmap_ad.pipeline.tracking import sqlite_file

    local = sqlite_file(tracking_uri)
    if not create and local is not None and not local.is_file():
        return None
    try:
        client = mlflow.MlflowClient(tracking_uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = (
            client.search_runs(
                experiments,
                filter_string=f"tags.model_sha256 = '{model_sha256}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if experiments
            else []
        )
    except MlflowException as err:
        first = (str(err).strip().splitlines() or ["?"])[0][:300]
        raise HdmapError(f"MLflow store {tracking_uri}: {first}") from None
    return runs[0].info.run_id if runs else None


def register(resolved: ResolvedModel, trained: TrainedModel, name: str, tracking_uri: str) -> str:
    """Register the run's pyfunc model as a new version of `name`; log it from the checkpoint if missing."""
    import logging

    import mlflow
    from mlflow.exceptions import MlflowException

    from hdmap_ad.pipeline import serving

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    run_id = resolved.run_id or trained.info.get("run_id")
    if not run_id and trained.info.get("sha256"):  # a model file names no run: find the run that logged it
        try:
            run_id = run_of_model(trained.info["sha256"], tracking_uri)
        except HdmapError as err:
            raise HdmapError(f"--register {name}: {err}") from None
    if not run_id:
        raise HdmapError(
            f"--register {name}: no run in the MLflow store {tracking_uri} logged {resolved.source} "
            "(no run is tagged with its model_sha256); give the run id as --model"
        )
    try:
        run = client.get_run(run_id)
        logged = serving.find_logged_model(run, serving.DEFAULT_NAME)
        if logged is None:
            with mlflow.start_run(run_id=run_id):
                serving.log_pyfunc_model(resolved.checkpoint)
        # MLflow notes that the run's artifacts hold no `model` folder (MLflow 3 keeps logged models apart)
        quiet = serving.DropMessage(f"Run with id {run_id} has no artifacts at artifact path")
        logger = logging.getLogger("mlflow.tracking._model_registry.fluent")
        logger.addFilter(quiet)
        try:
            version = mlflow.register_model(f"runs:/{run_id}/{serving.DEFAULT_NAME}", name)
        finally:
            logger.removeFilter(quiet)
    except MlflowException as err:
        first = (str(err).strip().splitlines() or ["?"])[0][:300]
        raise HdmapError(f"--register {name}: run {run_id} in {tracking_uri}: {first}") from None
    return f"models:/{version.name}/{version.version}"
