"""Where MLflow runs go: the store follows DVC_ROOT, the experiment is created once under the repo."""

from pathlib import Path

import pytest

import shipped
from hdmap_ad.pipeline import tracking


def test_store_resolves_to_dvc_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    # inside a queued experiment the cwd is a temp copy; the store must still be the original repo's
    monkeypatch.chdir(Path("/"))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_environment_overrides_params(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri("sqlite:///other.db") == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri("sqlite:///other.db") == "sqlite:///other.db"


def test_experiment_created_once_with_artifacts_under_repo(monkeypatch, tmp_path):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    first = tracking.ensure_experiment("exp-a")
    assert tracking.ensure_experiment("exp-a") == first
    exp = mlflow.MlflowClient().get_experiment(first)
    assert exp.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()
    assert (tmp_path / "mlflow.db").is_file()


def test_run_tags_carry_experiment_identity(monkeypatch):
    from hdmap_ad.core.config import load_params

    monkeypatch.setenv("DVC_EXP_NAME", "gruff-half")
    params = load_params(shipped.params_file(), ["method=focal", "seed=44"])
    tags = tracking.run_tags(params, "abc123")
    assert tracking.run_name(params, "abc123") == f"focal-seed44-{tags['comparison_key'][:6]}"
    assert tags["comparison_key"] == params.comparison_key("abc123") != params.comparison_key("other data")
    assert tags["method"] == "focal" and tags["seed"] == "44"
    assert tags["dvc_exp_name"] == "gruff-half" and tags["data_digest"] == "abc123"


def test_unusable_store_is_one_clear_error(monkeypatch, tmp_path):
    from hdmap_ad.core.errors import HdmapError

    (tmp_path / "a-file").write_text("not a folder")
    uri = f"sqlite:///{tmp_path}/a-file/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(HdmapError, match="MLflow store"):
        tracking.ensure_experiment("x")


def test_runs_differing_only_in_method_and_seed_share_a_comparison_key():
    from hdmap_ad.core.config import load_params

    path = shipped.params_file()
    base = load_params(path, ["method=baseline", "seed=42"])
    focal = load_params(
        path, ["method=focal", "seed=44", "focal.gamma=3.0", "runtime.device=cpu", "runtime.log_every=3"]
    )
    longer = load_params(path, ["method=focal", "seed=44", "train.steps=20"])
    assert base.comparison_key("m") == focal.comparison_key("m")
    assert base.comparison_key("m") != longer.comparison_key("m")
    assert tracking.run_name(focal, "m") != tracking.run_name(longer, "m")


def test_dataset_input_is_the_prepared_manifest_with_its_hash(monkeypatch, tmp_path, prepared_dir):
    import mlflow

    from hdmap_ad.pipeline.data import PreparedData

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    prepared = PreparedData.load(prepared_dir)
    exp = tracking.ensure_experiment("datasets")
    with mlflow.start_run(experiment_id=exp) as run:
        tracking.log_dataset_input(prepared, "data/raw/1000_tiff_minmax")
        tracking.log_dataset_input(prepared, "data/raw/1000_tiff_minmax")  # a resumed run logs it again
    (logged,) = mlflow.MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert logged.dataset.name == "data/raw/1000_tiff_minmax"
    assert logged.dataset.digest == prepared.data_digest()
    assert [t.value for t in logged.tags] == ["training"]


def test_a_dataset_inserted_by_a_parallel_run_meanwhile_is_linked_not_fatal(monkeypatch, tmp_path, prepared_dir):
    """Two grid workers log the same dataset at once: the store's second insert breaks the unique key (the
    message below is sqlite's, from a failed `hdmap-ad grid --jobs 2`). The run links the row the other one
    wrote instead of failing its training; any other store error still stops it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from hdmap_ad.pipeline.data import PreparedData

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    prepared = PreparedData.load(prepared_dir)
    exp = tracking.ensure_experiment("datasets")
    with mlflow.start_run(experiment_id=exp):  # the other worker, first
        tracking.log_dataset_input(prepared, "data/raw/1000_tiff_minmax")
    real, calls = mlflow.log_input, []

    def racing(dataset, context=None):
        calls.append(context)
        if len(calls) == 1:
            raise MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, "
                "datasets.digest"
            )
        return real(dataset, context=context)

    monkeypatch.setattr(mlflow, "log_input", racing)
    with mlflow.start_run(experiment_id=exp) as run:
        tracking.log_dataset_input(prepared, "data/raw/1000_tiff_minmax")
    assert len(calls) == 2
    (logged,) = mlflow.MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert logged.dataset.digest == prepared.data_digest()

    def broken(dataset, context=None):
        raise MlflowException("(sqlite3.OperationalError) database is locked")

    monkeypatch.setattr(mlflow, "log_input", broken)
    with mlflow.start_run(experiment_id=exp), pytest.raises(MlflowException, match="locked"):
        tracking.log_dataset_input(prepared, "data/raw/1000_tiff_minmax")
