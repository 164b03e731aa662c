"""The dropout method, Dinomaly2's recentering and a DINOv3 encoder through `dvc exp run -S` on a clone of
the trained repository (tests/conftest.py `repo`), in one experiment: each is minutes of the suite on 2
cores, and an option that broke the others would fail here too. The combined method (topk+hseg) runs in
tests/test_pipeline_grid.py's grid, which checks the same promises for it.
"""

from __future__ import annotations

import json
import sys

import pytest

from dvc_repo import mlflow_runs, sh

pytestmark = pytest.mark.slow

DINOV3 = ["model.encoder=vit_small_patch16_dinov3", "preprocess.resize=[32,96]", "preprocess.crop=[32,96]"]


DROPOUT_AND_OPTIONS = [
    "method=vdrop",
    "vdrop.warmup_steps=2",
    "vdrop.apply_layers=[2,3]",
    "model.recenter=true",
    *DINOV3,
]


def test_the_dropout_method_and_model_options_run_as_an_experiment(repo):
    """docs/design.md §5's dropout method, Dinomaly2's recentering and a DINOv3 encoder through `dvc exp run
    -S`: trained, evaluated, tracked under its own method tag and run name, with the settings in the resolved
    training config."""
    args = [a for s in DROPOUT_AND_OPTIONS for a in ("-S", s)]
    out = sh(repo, sys.executable, "-m", "dvc", "exp", "run", *args)
    assert "Running stage 'train'" in out.stdout and "Running stage 'evaluate'" in out.stdout
    result = json.loads((repo / "metrics/eval.json").read_text())
    assert 0.0 <= result["mean"]["auroc"] <= 100.0
    resolved = json.loads((repo / "models/train_config.json").read_text())
    runs = mlflow_runs(repo)
    mine = runs[runs["tags.mlflow.runName"].str.startswith("vdrop-seed42-") & (runs["tags.method"] == "vdrop")]
    assert len(mine) == 1 and (mine["tags.evaluated"] == "true").all()
    assert resolved["vdrop"]["warmup_steps"] == 2 and resolved["vdrop"]["apply_layers"] == [2, 3]
    assert resolved["model"]["recenter"] is True
    assert resolved["model"]["encoder"] == "vit_small_patch16_dinov3"
    assert resolved["preprocess"]["crop"] == [32, 96]
    sh(repo, "git", "checkout", "-q", "--", "params.yaml")
