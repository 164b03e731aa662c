"""End to end through DVC and MLflow, as a user drives it, on tiny settings.

One throw-away repository (a copy of this one's pipeline files) is built per session; the tests
then run `dvc repro`, `dvc exp run -S ...`, kill-and-resume and `dvc metrics diff` against it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = {
    "synth": {"n_train": 16, "n_test_good": 10, "n_test_fault": 10},
    "preprocess": {"resize": [28, 84], "crop": [28, 84]},
    "model": {"encoder_overrides": {"depth": 10, "embed_dim": 32, "num_heads": 2}},
    "train": {"steps": 8, "batch_size": 4, "val_every": 4, "log_every": 2, "checkpoint_every": 2, "warmup_steps": 2},
    "evaluate": {"batch_size": 16, "n_examples": 4},
}


def deep_update(tree: dict, patch: dict) -> dict:
    for k, v in patch.items():
        tree[k] = deep_update(dict(tree.get(k) or {}), v) if isinstance(v, dict) and v else v
    return tree


def env_for(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def sh(repo: Path, *cmd: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=repo, env=env_for(repo), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", "MLproject"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for folder in ("data/raw", "models", "metrics"):
        (repo / folder).mkdir(parents=True, exist_ok=True)
        (repo / folder / ".gitkeep").touch()
    params = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "t@example.invalid")
    sh(repo, "git", "config", "user.name", "t")
    sh(repo, sys.executable, "-m", "dvc", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "init")
    return repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = make_repo(tmp_path_factory.mktemp("pipeline"))
    sh(repo, "hdmap-ad", "init-tracking")
    sh(repo, sys.executable, "-m", "dvc", "repro")
    return repo


def mlflow_runs(repo: Path) -> pd.DataFrame:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["hdmap-dinomaly"])
    if "tags.kind" in runs:
        runs = runs[runs["tags.kind"] != "compare"]
    return runs


def test_repro_writes_every_output(repo):
    result = json.loads((repo / "metrics/eval.json").read_text())
    assert set(result) >= {"domain_A", "domain_B", "domain_C", "domain_D", "mean", "pooled"}
    for key in ("auroc", "ap", "f1_max", "tpr_at_fpr_1", "tpr_at_fpr_5", "precision", "recall", "f1",
                "accuracy", "threshold", "n_good", "n_fault", "pixel_auroc"):
        assert key in result["domain_A"], key
    for name in ("roc.png", "score_distributions.png", "examples.png", "data/roc.csv"):
        assert (repo / "plots" / name).is_file(), name
    runs = mlflow_runs(repo)
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["tags.mlflow.runName"] == "baseline-seed42" and run["tags.evaluated"] == "true"
    assert run["params.train.steps"] == "8"
    assert abs(run["metrics.test/domain_C/auroc"] - result["domain_C"]["auroc"]) < 1e-12


def test_eval_json_matches_sklearn_on_scores_csv(repo):
    from sklearn.metrics import roc_auc_score, roc_curve

    result = json.loads((repo / "metrics/eval.json").read_text())
    scores = pd.read_csv(repo / "metrics/scores.csv")
    assert list(scores.columns) == ["path", "domain", "label", "score"]
    for domain, part in scores.groupby("domain"):
        assert result[domain]["auroc"] == pytest.approx(roc_auc_score(part.label, part.score), abs=1e-12)
        fpr, tpr, _ = roc_curve(part.label, part.score, drop_intermediate=False)
        assert result[domain]["tpr_at_fpr_5"] == pytest.approx(tpr[fpr <= 0.05].max(), abs=1e-12)
        assert result[domain]["n_good"] + result[domain]["n_fault"] == len(part)


def test_exp_run_retrains_and_metrics_diff_shows_domains(repo):
    out = sh(repo, sys.executable, "-m", "dvc", "exp", "run", "-S", "method=focal", "-S", "seed=43")
    assert "Running stage 'train'" in out.stdout and "Running stage 'prepare'" not in out.stdout
    runs = mlflow_runs(repo)
    assert {"baseline-seed42", "focal-seed43"} <= set(runs["tags.mlflow.runName"])
    assert runs.loc[runs["tags.method"] == "focal", "tags.dvc_exp_name"].notna().all()
    diff = sh(repo, sys.executable, "-m", "dvc", "metrics", "diff", "HEAD", "--md").stdout
    assert "domain_A.auroc" in diff


@pytest.mark.parametrize("method", ["gem", "aux", "scale", "topk"])
def test_every_method_runs_as_an_experiment(repo, method):
    out = sh(repo, sys.executable, "-m", "dvc", "exp", "run", "-S", f"method={method}", "-S", "seed=44")
    assert "Running stage 'train'" in out.stdout
    result = json.loads((repo / "metrics/eval.json").read_text())
    assert 0.0 <= result["mean"]["auroc"] <= 1.0
    runs = mlflow_runs(repo)
    mine = runs[runs["tags.mlflow.runName"] == f"{method}-seed44"]
    assert len(mine) == 1 and mine.iloc[0]["tags.method"] == method and mine.iloc[0]["tags.evaluated"] == "true"
    if method == "aux":
        assert "aux_domain_accuracy" in result["domain_A"]


def test_other_methods_section_does_not_retrain(repo):
    sh(repo, sys.executable, "-m", "dvc", "repro")
    out = sh(repo, sys.executable, "-m", "dvc", "exp", "run", "-S", "gem.p=4")
    assert "Running stage 'train'" not in out.stdout


def test_killed_training_resumes_to_the_same_metrics(repo, tmp_path):
    """Kill `train` after a checkpoint, rerun: it resumes and ends where an uninterrupted run does."""
    sh(repo, sys.executable, "-m", "dvc", "exp", "run", "-S", "method=baseline", "-S", "seed=7", "-S", "train.steps=12")
    reference = json.loads((repo / "metrics/train.json").read_text())
    shutil.rmtree(repo / "models/train_state", ignore_errors=True)
    env = env_for(repo)
    proc = subprocess.Popen(["hdmap-ad", "train", "--set", "seed=7", "--set", "train.steps=12", "--set", "mlflow.experiment=resume"],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    state = repo / "models/train_state/last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            import torch

            if torch.load(state, weights_only=False)["step"] >= 4:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.2)
    proc.wait(timeout=60)
    assert proc.returncode != 0, "training finished before it could be killed; make it longer"
    out = sh(repo, "hdmap-ad", "train", "--set", "seed=7", "--set", "train.steps=12", "--set", "mlflow.experiment=resume")
    assert "resuming from" in out.stderr
    resumed = json.loads((repo / "metrics/train.json").read_text())
    for key in ("val_domain_A_auroc", "val_mean_auroc"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-9), key
    assert resumed["thresholds"] == pytest.approx(reference["thresholds"], abs=1e-9)
