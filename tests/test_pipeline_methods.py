"""The combined and dropout methods, Dinomaly2's recentering and a DINOv3 encoder through `dvc exp run -S`
on a throw-away repository (tests/dvc_repo.py) whose first run is the baseline. Two experiments: the
combination on the baseline's model (so it pairs with it), and the dropout method with the two model
options at once (each experiment is minutes of the suite on 2 cores; an option that broke the others
would fail here too)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dvc_repo import mlflow_runs, sh

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

DINOV3 = ["model.encoder=vit_small_patch16_dinov3", "preprocess.resize=[32,96]", "preprocess.crop=[32,96]"]


@pytest.mark.parametrize(
    ("sets", "method", "seed"),
    [
        (["method=topk+hseg", "seed=44"], "topk+hseg", 44),
        (["method=vdrop", "vdrop.warmup_steps=2", "vdrop.apply_layers=[2,3]", "model.recenter=true", *DINOV3], "vdrop", 42),
    ],
    ids=["topk+hseg", "vdrop+recenter+dinov3"],
)  # fmt: skip
def test_the_new_methods_and_model_options_run_as_experiments(repo, sets, method, seed):
    """docs/design.md §5's combined and dropout methods, Dinomaly2's recentering and a DINOv3 encoder, each
    through `dvc exp run -S`: trained, evaluated, tracked under its own method tag and run name, with the
    settings in the resolved training config."""
    args = [a for s in sets for a in ("-S", s)]
    out = sh(repo, sys.executable, "-m", "dvc", "exp", "run", *args)
    assert "Running stage 'train'" in out.stdout and "Running stage 'evaluate'" in out.stdout
    result = json.loads((repo / "metrics/eval.json").read_text())
    assert 0.0 <= result["mean"]["auroc"] <= 100.0
    resolved = json.loads((repo / "models/train_config.json").read_text())
    runs = mlflow_runs(repo)
    key = runs.loc[runs["tags.mlflow.runName"].str.startswith(f"{method}-seed{seed}-"), "tags.comparison_key"]
    mine = runs[runs["tags.comparison_key"].isin(key) & (runs["tags.method"] == method)]
    assert len(mine) >= 1 and (mine["tags.evaluated"] == "true").any()
    if method == "topk+hseg":
        assert resolved["topk"]["q"] == 2.0 and resolved["hseg"]["row_p"] == 0.2
        # a combination pairs with the baseline: same comparison group
        base = runs[runs["tags.mlflow.runName"].str.startswith("baseline-seed42-")]
        assert set(key) & set(base["tags.comparison_key"])
    else:
        assert resolved["vdrop"]["warmup_steps"] == 2 and resolved["vdrop"]["apply_layers"] == [2, 3]
        assert resolved["model"]["recenter"] is True
        assert resolved["model"]["encoder"] == "vit_small_patch16_dinov3"
        assert resolved["preprocess"]["crop"] == [32, 96]
    sh(repo, "git", "checkout", "-q", "--", "params.yaml")
