"""Shared fixtures. Session-scoped data is shared by many tests: treat it as read-only (copy it first
to change it)."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """One tiny model trained and evaluated by the real stages (tests/fixtures_pipeline.py), shared by
    the tests of a trained model (predict, serving, export). Read-only: copy what you change."""
    from fixtures_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A throw-away DVC repository in the state `make run` leaves (tests/dvc_repo.py `trained_repo`), one per
    test module that asks for it: the pipeline modules run side by side on xdist workers and none sees
    another's experiments. test_pipeline_grid.py overrides it with an untrained one."""
    from dvc_repo import trained_repo

    return trained_repo(tmp_path_factory.mktemp("pipeline"))
