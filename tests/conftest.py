"""Shared fixtures. Session-scoped data is shared by many tests: treat it as read-only (copy it first
to change it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# pytest-xdist runs several workers per core (make test: 4 on the 2-core machines); torch's default of one
# thread per core in each of them oversubscribes the CPU, and OpenMP threads then wait on each other.
# Set before any test module imports torch. A test of thread settings sets them itself.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY = dict(n_train=8, n_test_good=6, n_test_fault=6, height=31, width=95, seed=0)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A tiny synthetic HDMAP folder: 4 domains × (8 train, 6 test good, 6 test fault) maps of 31×95, with masks."""
    from hdmap_ad.pipeline.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("hdmap") / "synthetic"
    generate(root, SynthConfig(**TINY), progress=False)
    return root


@pytest.fixture(scope="session")
def prepared_dir(synthetic_root, tmp_path_factory) -> Path:
    """`synthetic_root` after `prepare_dataset` over all four domains."""
    from hdmap_ad.pipeline.data import DEFAULT_DOMAINS, prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare_dataset(synthetic_root, DEFAULT_DOMAINS, out, progress=False)
    return out


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` run once per test run, in the run's shared temporary folder: under pytest-xdist the
    first worker that asks builds it while the others wait on a file lock, then all use the same folder.
    Treat it as read-only: tests get a copy of it."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the folder above the workers' own ones
    root = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (root / "built").is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            build(root)
            (root / "built").touch()
    return root


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """One tiny model trained and evaluated by the real stages (tests/fixtures_pipeline.py), shared by
    the tests of a trained model (predict, serving, export): built once per run, each xdist worker gets
    its own copy (its MLflow store included). Read-only: copy what you change."""
    from fixtures_pipeline import build_tiny_pipeline, clone_tiny_pipeline

    template = built_once(tmp_path_factory, "tiny-pipeline", lambda root: build_tiny_pipeline(root / "pipeline"))
    return clone_tiny_pipeline(template / "pipeline", tmp_path_factory.mktemp("pipeline") / "pipeline")


@pytest.fixture(scope="session")
def trained_template(tmp_path_factory) -> Path:
    """A throw-away DVC repository in the state `make run` leaves (tests/dvc_repo.py `trained_repo`), built
    once per test run (`built_once`). Never changed: modules get a clone (`repo`)."""
    from dvc_repo import trained_repo

    return built_once(tmp_path_factory, "trained-template", trained_repo) / "repo"


@pytest.fixture(scope="module")
def repo(trained_template, tmp_path_factory) -> Path:
    """A clone of `trained_template`, one per test module that asks for it: the pipeline modules run side
    by side on xdist workers and none sees another's experiments."""
    from dvc_repo import clone_repo

    return clone_repo(trained_template, tmp_path_factory.mktemp("pipeline") / "repo")


# The modules that take longest (minutes each, measured with `make test`'s --durations), longest first.
# pytest-xdist hands out whole modules (--dist loadfile) in collection order (--no-loadscope-reorder), so
# starting these first keeps the 2-core run from ending on one long module while the other workers idle.
LONGEST_FIRST = (
    "test_pipeline.py",
    "test_grid_ray.py",
    "test_pipeline_grid.py",
    "test_gpu_check.py",
    "test_pipeline_faults.py",
    "test_export.py",
    "test_pipeline_methods.py",
    "test_pipeline_readme.py",
    "test_bench.py",
    "test_store.py",
)


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
