"""MLflow: where the store lives, the experiment, and the run of one training + evaluation.

Traps this module exists to avoid (see docs/design.md#pipe-mlflow): a relative sqlite path inside a queued DVC
experiment writes to a throw-away copy; an experiment first created inside a temp copy puts its
artifacts there; parallel workers creating the store or experiment at once lose runs. So the store
is resolved from `DVC_ROOT`, and `ensure_experiment` is called once before workers start.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.paths import repo_root

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from hdmap_ad.core.config import Params
    from hdmap_ad.pipeline.data import PreparedData


CHECKPOINT_ARTIFACT_DIR = "checkpoint"  # the training run's artifact folder that holds its model file


def curve_name(key: str) -> str:
    """The MLflow name of a training curve or method diagnostic (`train/loss`, `grad/total_norm`,
    `focal/loss_0`): `train_<key>` without slashes (`train_loss`, `train_grad_total_norm`,
    `train_focal_loss_0`).

    The MLflow chart view groups metrics into sections by the part before the last slash, sorts the
    sections by name and puts its default section (metrics without a slash) last: so the headline
    sections, `test_<metric>/…` and `val_auroc/…`, open the view and every training curve sits
    together below them instead of between them (`focal/…` and `grad/…` would sort first)."""
    return "train_" + key.removeprefix("train/").replace("/", "_")


def log_curves(values: Mapping[str, float], step: int) -> None:
    """Training curves and method diagnostics (`train/loss`, `grad/nan_count`, ...) into the active run at
    `step`, each under its `curve_name`."""
    import mlflow

    mlflow.log_metrics({curve_name(k): float(v) for k, v in values.items()}, step=step)


def tracking_uri(configured: str | None = None) -> str:
    """`MLFLOW_TRACKING_URI` > params `mlflow.tracking_uri` > sqlite `mlflow.db` at the repo root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (its query options and sqlite's `file:` form removed)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///") :]).split("?", 1)[0]
    path = path[len("file:") :] if path.startswith("file:") else path  # sqlite's URI form (e.g. ?mode=ro)
    return Path(path) if path and path != ":memory:" else None


def _is_local(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def ensure_experiment(name: str, configured_uri: str | None = None) -> str:
    """Create the store and experiment if missing (artifacts under the repo root); return its id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(configured_uri)
    try:
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        found = client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise HdmapError(f"MLflow experiment {name!r} is deleted in {uri}; restore it or set mlflow.experiment")
            return found.experiment_id
        location = (repo_root() / "mlartifacts").as_uri() if _is_local(uri) else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another process created it between our get and create
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id
    except HdmapError:
        raise
    except Exception as err:  # MlflowException, sqlalchemy and connection errors all mean "unusable store"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise HdmapError(f"MLflow store {uri}: {first}") from None


def compare_experiment_name(training_experiment: str) -> str:
    """Compare runs live in their own experiment, so the training experiment holds only training runs."""
    return f"{training_experiment}-compare"


def client(params: Params) -> MlflowClient:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params.mlflow.tracking_uri))
    return mlflow.MlflowClient()


def git_commit(root: Path | None = None) -> str | None:
    """Commit of the code that ran (inside a DVC experiment: the baseline commit)."""
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        return os.environ["DVC_EXP_BASELINE_REV"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or repo_root(), capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def run_name(params: Params, data_digest: str | None = None) -> str:
    """`<method>-seed<seed>-<6 hex of the comparison key>`: two runs of one method and seed with other
    settings or data get different names."""
    return f"{params.method}-seed{params.seed}-{params.comparison_key(data_digest)[:6]}"


def run_tags(params: Params, data_digest: str | None) -> dict[str, str]:
    tags = {
        "method": params.method,
        "seed": str(params.seed),
        "profile": params.profile,
        "comparison_key": params.comparison_key(data_digest),
    }
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if data_digest:
        tags["data_digest"] = data_digest
    return tags


def run_exists(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def log_dataset_input(prepared: PreparedData, name: str, context: str = "training") -> None:
    """Record the prepared data as the active run's input (the MLflow UI's Dataset column): the
    manifest's rows (one per map, with its statistics) as the dataset, named after the data root, with
    the prepared data's content digest, so runs on the same data show the same digest."""
    import warnings

    import mlflow
    import mlflow.data

    with warnings.catch_warnings():
        # MLflow warns that a local path fits two source types, and (while logging, when it infers the
        # schema) about integer columns in model signatures: neither applies to a record of the data used
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(
            prepared.manifest, source=str(prepared.out_dir), name=str(name), digest=prepared.data_digest()
        )
        for attempt in range(DATASET_ATTEMPTS):
            try:
                mlflow.log_input(dataset, context=context)
                return
            except Exception as err:
                if attempt == DATASET_ATTEMPTS - 1 or not lost_dataset_race(err):
                    raise
                time.sleep(0.2 * (attempt + 1))


# Parallel grid workers log the same dataset (same experiment, name and digest) at once: the store looks it
# up, finds none, and both insert it; the second insert breaks the unique key and fails the whole training
# (seen with `hdmap-ad grid --jobs 2`). Trying again finds the row the other worker wrote and only links it.
DATASET_ATTEMPTS = 3


def lost_dataset_race(err: BaseException) -> bool:
    """Whether `err` is the store refusing a second copy of a dataset another run inserted just before."""
    text = str(err)
    return "datasets" in text and any(k in text for k in ("UNIQUE constraint", "Duplicate entry", "duplicate key"))


def find_run(
    model_path: Path, model_sha256: str, experiment: str, uri: str, run_file: Path, fallback_run_id: str | None = None
) -> str:
    """The active MLflow run that trained the model file with content hash `model_sha256`.

    `run_file` (models/run.json, written by training) when it records this hash; else the newest
    run of `experiment` tagged `model_sha256` with it; else `fallback_run_id` (the run id a model
    migrated from format 1 carries). A missing or unusable store, or no such run, is an HdmapError:
    the caller checks this before its slow work so that results are never silently left unlogged.
    """
    for scheme in ("sqlite:///", "file:"):  # a local store that is gone must not be silently recreated empty
        if uri.startswith(scheme):
            local = sqlite_file(uri) if scheme == "sqlite:///" else Path(unquote(urlparse(uri).path))
            if local is not None and not local.exists():
                raise HdmapError(
                    f"MLflow store {uri}: not found, so the run that trained {model_path} cannot be "
                    "updated; restore the store or point MLFLOW_TRACKING_URI (mlflow.tracking_uri) at it"
                )
    import mlflow

    recorded: dict[str, Any] = {}
    if Path(run_file).is_file():
        try:
            recorded = json.loads(Path(run_file).read_text())
        except (OSError, ValueError):
            recorded = {}
        recorded = recorded if isinstance(recorded, dict) else {}
    try:
        client = mlflow.MlflowClient(uri)

        def active(run_id: Any) -> bool:
            if not isinstance(run_id, str) or not run_id:
                return False
            try:
                return client.get_run(run_id).info.lifecycle_stage == "active"
            except mlflow.exceptions.MlflowException:
                return False

        if recorded.get("model_sha256") == model_sha256 and active(recorded.get("run_id")):
            return recorded["run_id"]
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            runs = client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.model_sha256 = '{model_sha256}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if runs:
                return runs[0].info.run_id
        if active(fallback_run_id):
            return str(fallback_run_id)
    except HdmapError:
        raise
    except Exception as err:  # MlflowException, sqlalchemy and connection errors all mean "unusable store"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise HdmapError(f"MLflow store {uri}: {first}") from None
    if recorded.get("model_sha256") == model_sha256:
        why = f"its run {recorded.get('run_id')} in {run_file} is gone"
    else:
        why = f"{run_file} records another model" if recorded.get("model_sha256") else f"no {run_file}"
    raise HdmapError(
        f"{model_path}: no run in the MLflow store {uri} (experiment {experiment!r}) trained this model "
        f"(model_sha256 {model_sha256[:12]}; {why}); retrain it (`dvc repro train`) or point "
        "MLFLOW_TRACKING_URI (mlflow.tracking_uri) at the store that holds its run"
    )
