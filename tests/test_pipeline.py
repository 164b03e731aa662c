"""End to end through DVC and MLflow, as a user drives it, on tiny settings: `dvc repro`, re-runs that
leave git clean, `dvc exp run -S ...`, `dvc metrics diff`, and which settings retrain.

One throw-away repository (a clone of the trained one, tests/conftest.py) for this module, whose tests
run in order: the re-run that commits the trained state first, the experiment that changes the model
last. The failure cases, the new methods, the grid and the README's DVC commands have modules of their
own (test_pipeline_faults.py, _methods.py, _grid.py, _readme.py).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dvc_repo import dvc, mlflow_runs, restore_params, sh, snapshot

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_repro_writes_every_output(repo):
    headline = json.loads((repo / "metrics/eval.json").read_text())  # the DVC metric: headline numbers in %
    assert set(headline) == {"domain_A", "domain_B", "domain_C", "domain_D", "mean", "pooled"}
    assert set(headline["domain_A"]) == {"auroc", "ap", "f1_max", "tpr_at_fpr_1", "tpr_at_fpr_5", "pixel_auroc"}
    result = json.loads((repo / "metrics/eval_details.json").read_text())
    assert set(result) >= {"domain_A", "domain_B", "domain_C", "domain_D", "mean", "pooled"}
    for key in (
        "auroc",
        "ap",
        "f1_max",
        "tpr_at_fpr_1",
        "tpr_at_fpr_5",
        "precision",
        "recall",
        "f1",
        "accuracy",
        "threshold",
        "n_good",
        "n_fault",
        "pixel_auroc",
    ):
        assert key in result["domain_A"], key
    for name in ("roc.png", "score_distributions.png", "examples.png", "data/roc.csv"):
        assert (repo / "plots" / name).is_file(), name
    runs = mlflow_runs(repo)
    assert len(runs) == 1
    run = runs.iloc[0]
    assert (
        run["tags.mlflow.runName"] == f"baseline-seed42-{run['tags.comparison_key'][:6]}"
        and run["tags.evaluated"] == "true"
    )
    assert run["params.train.steps"] == "8"
    assert abs(run["metrics.test_auroc/domain_C"] - result["domain_C"]["auroc"]) < 1e-12


def test_eval_json_matches_sklearn_on_scores_csv(repo):
    from sklearn.metrics import roc_auc_score, roc_curve

    result = json.loads((repo / "metrics/eval_details.json").read_text())
    scores = pd.read_csv(repo / "metrics/scores.csv")
    assert list(scores.columns) == ["path", "domain", "label", "score"]
    for domain, part in scores.groupby("domain"):
        assert result[domain]["auroc"] == pytest.approx(roc_auc_score(part.label, part.score), abs=1e-12)
        fpr, tpr, _ = roc_curve(part.label, part.score, drop_intermediate=False)
        assert result[domain]["tpr_at_fpr_5"] == pytest.approx(tpr[fpr <= 0.05].max(), abs=1e-12)
        assert result[domain]["n_good"] + result[domain]["n_fault"] == len(part)


def test_rerunning_the_same_training_leaves_the_workspace_clean(repo):
    """model.safetensors, the metrics and dvc.lock depend only on the configuration, not on the MLflow run: a
    fresh clone that reruns the committed pipeline leaves git clean."""
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "first run")
    out = dvc(repo, "repro", "-f", "-s", "train")
    assert "Running stage 'train'" in out.stdout
    dvc(repo, "repro")
    assert sh(repo, "git", "status", "--porcelain").stdout == ""


def test_a_typo_in_the_method_fails_first_and_keeps_every_output(repo):
    before = snapshot(repo)
    out = dvc(repo, "exp", "run", "-S", "method=focl", check=False)
    assert out.returncode != 0
    assert "unknown method 'focl'" in out.stdout + out.stderr
    assert "Running stage 'train'" not in out.stdout
    assert snapshot(repo) == before
    restore_params(repo)


def test_runtime_settings_never_retrain(repo):
    out = dvc(
        repo, "exp", "run", "-S", "runtime.log_every=3", "-S", "runtime.num_threads=1", "-S", "runtime.device=cpu"
    )
    assert "Running stage 'configure'" in out.stdout
    assert "Running stage 'train'" not in out.stdout and "Running stage 'evaluate'" not in out.stdout
    restore_params(repo)


def test_other_methods_section_does_not_retrain(repo):
    sh(repo, sys.executable, "-m", "dvc", "repro")
    out = sh(repo, sys.executable, "-m", "dvc", "exp", "run", "-S", "gem.p=4")
    assert "Running stage 'train'" not in out.stdout
    restore_params(repo)


def test_data_outside_the_repository_is_a_dependency_and_a_bad_map_keeps_prepared(repo, tmp_path):
    """`data.root` may point anywhere: editing a map there must rerun prepare, and a map that cannot be
    read must fail prepare with one line and leave the last good prepared data in place."""
    import tifffile

    outside = tmp_path / "hdmap"
    shutil.copytree(repo / "data/raw/synthetic", outside)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["root"] = str(outside)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(repo, "repro", "prepare")
    assert "prepare" not in dvc(repo, "status", "prepare").stdout
    target = sorted((outside / "domain_B/train/good").iterdir())[3]
    tifffile.imwrite(target, tifffile.imread(target) * np.float32(1.01))
    assert "modified" in dvc(repo, "status", "prepare").stdout
    before = (
        (repo / "data/prepared/manifest.csv").read_bytes(),
        (repo / "data/prepared/domain_B/train.npy").read_bytes(),
    )
    target.write_bytes(b"II*\x00garbage")
    out = dvc(repo, "repro", "prepare", check=False)
    assert out.returncode != 0
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and target.name in errors[0], out.stderr[-2000:]
    assert (
        (repo / "data/prepared/manifest.csv").read_bytes(),
        (repo / "data/prepared/domain_B/train.npy").read_bytes(),
    ) == before
    sh(repo, "git", "checkout", "-q", "--", "params.yaml", "dvc.lock")
    dvc(repo, "checkout", "data/prepared")
    assert "prepare" not in dvc(repo, "status", "prepare").stdout


def test_exp_run_retrains_and_metrics_diff_shows_domains(repo):
    """`dvc exp run -S method=aux -S seed=43`: retrains (not prepare), tracks the run in the baseline's
    comparison group, and a method with outputs of its own (aux's domain accuracy) gets them to the metrics.
    Only the baseline and aux run through DVC here: switching `method` takes the same path through
    configure for every method, and each one trains and evaluates in tests/test_evaluation.py."""
    out = sh(repo, sys.executable, "-m", "dvc", "exp", "run", "-S", "method=aux", "-S", "seed=43")
    assert "Running stage 'train'" in out.stdout and "Running stage 'prepare'" not in out.stdout
    runs = mlflow_runs(repo)
    names = {name.rsplit("-", 1)[0] for name in runs["tags.mlflow.runName"]}
    assert {"baseline-seed42", "aux-seed43"} <= names
    # the two runs differ only in method and seed: one comparison group
    pair = runs[runs["tags.mlflow.runName"].str.match(r"^(baseline-seed42|aux-seed43)-")]
    assert len(pair) >= 2 and pair["tags.comparison_key"].nunique() == 1
    mine = runs[runs["tags.mlflow.runName"].str.startswith("aux-seed43-")]
    assert len(mine) == 1 and mine.iloc[0]["tags.method"] == "aux" and mine.iloc[0]["tags.evaluated"] == "true"
    assert mine["tags.dvc_exp_name"].notna().all()
    assert "aux_domain_accuracy" in json.loads((repo / "metrics/eval_details.json").read_text())["domain_A"]
    # --all: a metric that happens to be equal for the two tiny models is listed too
    diff = sh(repo, sys.executable, "-m", "dvc", "metrics", "diff", "HEAD", "--md", "--all").stdout
    assert all(f"{d}.auroc" in diff for d in ("domain_A", "domain_B", "domain_C", "domain_D", "mean"))
    # what a person compares: headline metrics in percent, no thresholds, counts, ids or compare rows
    assert "threshold" not in diff and "run_id" not in diff and "compare.json" not in diff
    assert not re.search(r"\.(tp|fp|tn|fn|n_good|n_fault)\b", diff)
