"""`hdmap-ad grid` through the real DVC queue, then compare, on a throw-away repository
(tests/dvc_repo.py) where nothing ran before: the queue runs every stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dvc_repo import make_repo, mlflow_runs, sh

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = make_repo(tmp_path_factory.mktemp("pipeline"))
    sh(repo, "hdmap-ad", "init-tracking")
    return repo


def test_grid_with_a_combined_method_then_compare_pairs_it(repo):
    """`hdmap-ad grid --methods baseline,topk+hseg --seeds 42,43 --jobs 2` through the real DVC queue: the
    combination is one grid entry, its runs are tagged as a method of its own, compare pairs it with the
    baseline seed by seed."""
    sh(repo, "git", "checkout", "-q", "--", "params.yaml")
    out = sh(repo, "hdmap-ad", "grid", "--methods", "baseline,topk+hseg", "--seeds", "42,43", "--jobs", "2",
             timeout=3000, check=False)  # fmt: skip
    # on failure: the grid's summary with each failed experiment's log tail (the tables after it are long)
    summary = out.stdout[out.stdout.find("grid finished") :][:4000]
    assert out.returncode == 0 and "4/4 done (0 failed)" in out.stdout, summary + out.stderr[-2000:]
    saved = json.loads((repo / "reports/comparison.json").read_text())
    assert set(saved["runs"]) == {"baseline", "topk+hseg"}
    assert all(set(saved["runs"][m]) == {"42", "43"} for m in saved["runs"])
    runs = mlflow_runs(repo)
    assert (runs["tags.method"] == "topk+hseg").sum() >= 2
