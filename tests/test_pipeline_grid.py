"""`hdmap-ad grid` through the real DVC queue, then compare, on a clone of the trained repository
(tests/conftest.py `repo`: the state `make run` leaves, committed as a user would before a grid)."""

from __future__ import annotations

import json

import pytest

from dvc_repo import mlflow_runs, sh

pytestmark = pytest.mark.slow


def test_grid_with_a_combined_method_then_compare_pairs_it(repo):
    """`hdmap-ad grid --methods baseline,topk+hseg --seeds 42,43 --jobs 2` through the real DVC queue, two
    queue workers: the committed pair (baseline, 42) is not trained again, the three others are; the
    combination is one grid entry, trained with both methods' settings, tagged as a method of its own and
    paired by compare with the baseline seed by seed."""
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline seed 42, as make run leaves it")
    out = sh(repo, "hdmap-ad", "grid", "--methods", "baseline,topk+hseg", "--seeds", "42,43", "--jobs", "2",
             timeout=3000, check=False)  # fmt: skip
    # on failure: the grid's summary with each failed experiment's log tail (the tables after it are long)
    summary = out.stdout[out.stdout.find("grid finished") :][:4000]
    assert out.returncode == 0 and "4/4 done (0 failed)" in out.stdout, summary + out.stderr[-2000:]
    saved = json.loads((repo / "reports/comparison.json").read_text())
    assert set(saved["runs"]) == {"baseline", "topk+hseg"}
    assert all(set(saved["runs"][m]) == {"42", "43"} for m in saved["runs"])

    runs = mlflow_runs(repo)
    trained = runs.groupby(["tags.method", "params.seed"]).size().to_dict()
    assert trained == {("baseline", "42"): 1, ("baseline", "43"): 1, ("topk+hseg", "42"): 1, ("topk+hseg", "43"): 1}
    combined = runs[runs["tags.method"] == "topk+hseg"]
    assert (combined["params.topk.q"] == "2.0").all() and (combined["params.hseg.row_p"] == "0.2").all()
    assert (combined["tags.evaluated"] == "true").all()
    assert set(combined["tags.comparison_key"]) == set(
        runs.loc[runs["tags.method"] == "baseline", "tags.comparison_key"]
    )
