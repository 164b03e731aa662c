"""End to end through DVC and MLflow, as a user drives it, on tiny settings.

One throw-away repository (a copy of this one's pipeline files) is built per session; the tests
then run `dvc repro`, `dvc exp run -S ...`, kill-and-resume and `dvc metrics diff` against it.
"""

from __future__ import annotations

import json
import os
import re
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

import shipped
import tiny

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = {
    "synth": {"n_train": 16, "n_test_good": 10, "n_test_fault": 10},
    "preprocess": {"resize": list(tiny.SIZE), "crop": list(tiny.SIZE)},
    "model": {"encoder_overrides": dict(tiny.ENCODER)},
    "train": {"steps": 8, "batch_size": 4, "val_every": 4, "warmup_steps": 2},
    "runtime": {"log_every": 2, "checkpoint_every": 2},
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
    params = deep_update(shipped.params(), TINY)
    params.update(method="baseline", seed=42, profile="quick")
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


OUTPUTS = (
    "models/model.safetensors",
    "models/train_config.json",
    "metrics/train.json",
    "metrics/eval.json",
    "metrics/scores.csv",
    "data/prepared/manifest.csv",
    "data/prepared/domain_A/train.npy",
    "plots/roc.png",
)


def snapshot(repo: Path) -> dict[str, bytes]:
    return {name: (repo / name).read_bytes() for name in OUTPUTS}


def dvc(repo: Path, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    return sh(repo, sys.executable, "-m", "dvc", *args, check=check, timeout=timeout)


def restore_params(repo: Path) -> None:
    sh(repo, "git", "checkout", "-q", "--", "params.yaml")


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


def test_a_failing_train_keeps_the_last_good_model_and_metrics(repo):
    before = snapshot(repo)
    out = dvc(repo, "exp", "run", "-S", "train.batch_size=100000", check=False)
    assert out.returncode != 0 and "larger than the training set" in out.stdout + out.stderr
    # configure succeeded (its output is the new config); train failed: everything after it is kept
    after = snapshot(repo)
    assert after.pop("models/train_config.json") != before.pop("models/train_config.json")
    assert after == before
    restore_params(repo)


def test_a_killed_train_keeps_the_last_good_model_and_metrics(repo):
    before = snapshot(repo)
    start = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "exp", "run", "-S", "seed=5", "-S", "train.steps=400"],
        cwd=repo,
        env=env_for(repo),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    state = repo / "models/train_state/last.safetensors"
    try:
        assert _wait_for(lambda: state.is_file() and state.stat().st_mtime > start, proc), "training never checkpointed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    after = snapshot(repo)
    after.pop("models/train_config.json"), before.pop("models/train_config.json")  # configure had finished
    assert after == before
    restore_params(repo)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_a_second_exp_run_in_the_workspace_stops_the_first(repo):
    """DVC's second `exp run` fails on its lock after writing its -S values into params.yaml; the first
    must then stop rather than record seed 12 beside a model trained with seed 11."""
    start = time.time()
    first = subprocess.Popen(
        [sys.executable, "-m", "dvc", "exp", "run", "-S", "seed=11", "-S", "train.steps=400"],
        cwd=repo,
        env=env_for(repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    state = repo / "models/train_state/last.safetensors"
    assert _wait_for(lambda: state.is_file() and state.stat().st_mtime > start, first), "training never started"
    second = dvc(repo, "exp", "run", "-S", "seed=12", check=False)
    assert second.returncode != 0
    output, _ = first.communicate(timeout=600)
    assert first.returncode != 0, output[-3000:]
    assert "params.yaml changed while this run was in progress" in output
    assert "dvc exp run --queue" in output
    runs = mlflow_runs(repo)
    finished = runs[runs["status"] == "FINISHED"]
    assert not set(finished["tags.seed"]) & {"11", "12"}
    restore_params(repo)


def test_runtime_settings_never_retrain(repo):
    out = dvc(
        repo, "exp", "run", "-S", "runtime.log_every=3", "-S", "runtime.num_threads=1", "-S", "runtime.device=cpu"
    )
    assert "Running stage 'configure'" in out.stdout
    assert "Running stage 'train'" not in out.stdout and "Running stage 'evaluate'" not in out.stdout
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
    out = sh(repo, sys.executable, "-m", "dvc", "exp", "run", "-S", "method=focal", "-S", "seed=43")
    assert "Running stage 'train'" in out.stdout and "Running stage 'prepare'" not in out.stdout
    runs = mlflow_runs(repo)
    names = {name.rsplit("-", 1)[0] for name in runs["tags.mlflow.runName"]}
    assert {"baseline-seed42", "focal-seed43"} <= names
    # the two runs differ only in method and seed: one comparison group
    pair = runs[runs["tags.mlflow.runName"].str.match(r"^(baseline-seed42|focal-seed43)-")]
    assert len(pair) >= 2 and pair["tags.comparison_key"].nunique() == 1
    assert runs.loc[runs["tags.method"] == "focal", "tags.dvc_exp_name"].notna().all()
    # --all: a metric that happens to be equal for the two tiny models is listed too
    diff = sh(repo, sys.executable, "-m", "dvc", "metrics", "diff", "HEAD", "--md", "--all").stdout
    assert all(f"{d}.auroc" in diff for d in ("domain_A", "domain_B", "domain_C", "domain_D", "mean"))
    # what a person compares: headline metrics in percent, no thresholds, counts, ids or compare rows
    assert "threshold" not in diff and "run_id" not in diff and "compare.json" not in diff
    assert not re.search(r"\.(tp|fp|tn|fn|n_good|n_fault)\b", diff)


def test_a_method_with_its_own_outputs_runs_as_an_experiment(repo):
    """aux through `dvc exp run` (its extra metric reaches the outputs); baseline and focal run through
    DVC in the tests above, every other method through train + evaluate in tests/test_evaluation.py:
    switching `method` takes the same path through configure for all of them."""
    out = sh(repo, sys.executable, "-m", "dvc", "exp", "run", "-S", "method=aux", "-S", "seed=44")
    assert "Running stage 'train'" in out.stdout
    result = json.loads((repo / "metrics/eval.json").read_text())
    assert 0.0 <= result["mean"]["auroc"] <= 100.0
    runs = mlflow_runs(repo)
    mine = runs[runs["tags.mlflow.runName"].str.startswith("aux-seed44-")]
    assert len(mine) == 1 and mine.iloc[0]["tags.method"] == "aux" and mine.iloc[0]["tags.evaluated"] == "true"
    assert "aux_domain_accuracy" in json.loads((repo / "metrics/eval_details.json").read_text())["domain_A"]


def test_other_methods_section_does_not_retrain(repo):
    sh(repo, sys.executable, "-m", "dvc", "repro")
    out = sh(repo, sys.executable, "-m", "dvc", "exp", "run", "-S", "gem.p=4")
    assert "Running stage 'train'" not in out.stdout


def test_killed_training_resumes_to_the_same_metrics(repo, tmp_path):
    """Kill `train` after a checkpoint, rerun: it resumes and ends where an uninterrupted run does."""
    sh(repo, sys.executable, "-m", "dvc", "exp", "run", "-S", "method=baseline", "-S", "seed=7", "-S", "train.steps=12")
    from hdmap_ad.core import checkpoint

    reference = json.loads((repo / "metrics/train.json").read_text())
    reference_thresholds = checkpoint.load(repo / "models/model.safetensors")["thresholds"]
    shutil.rmtree(repo / "models/train_state", ignore_errors=True)
    env = env_for(repo)
    proc = subprocess.Popen(
        ["hdmap-ad", "train", "--set", "seed=7", "--set", "train.steps=12", "--set", "mlflow.experiment=resume"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    state = repo / "models/train_state/last.safetensors"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            from hdmap_ad.core.checkpoint import load

            if load(state)["step"] >= 4:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.2)
    proc.wait(timeout=60)
    assert proc.returncode != 0, "training finished before it could be killed; make it longer"
    out = sh(
        repo, "hdmap-ad", "train", "--set", "seed=7", "--set", "train.steps=12", "--set", "mlflow.experiment=resume"
    )
    assert "resuming from" in out.stderr
    resumed = json.loads((repo / "metrics/train.json").read_text())
    assert resumed["val_auroc"] == reference["val_auroc"]
    assert checkpoint.load(repo / "models/model.safetensors")["thresholds"] == pytest.approx(
        reference_thresholds, abs=1e-9
    )


@pytest.mark.parametrize(
    ("sets", "method", "seed"),
    [
        (["method=topk+hseg", "seed=44"], "topk+hseg", 44),
        (["method=vdrop", "vdrop.warmup_steps=2", "vdrop.apply_layers=[2,3]"], "vdrop", 42),
        (["model.recenter=true"], "baseline", 42),
        (
            ["model.encoder=vit_small_patch16_dinov3", "preprocess.resize=[32,96]", "preprocess.crop=[32,96]"],
            "baseline",
            42,
        ),
    ],
    ids=["topk+hseg", "vdrop", "recenter", "dinov3"],
)
def test_the_new_methods_and_model_options_run_as_experiments(repo, sets, method, seed):
    """docs/design.md §5's combined and dropout methods, Dinomaly2's recentering and a DINOv3 encoder, each
    through `dvc exp run -S`: trained, evaluated, tracked under its own method tag and run name."""
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
    sh(repo, "git", "checkout", "-q", "--", "params.yaml")


def test_grid_with_a_combined_method_then_compare_pairs_it(repo):
    """`hdmap-ad grid --methods baseline,topk,topk+hseg --seeds 42,43` through the real DVC queue: the
    combination is one grid entry, its runs are tagged as a method of its own, compare pairs all three."""
    sh(repo, "git", "checkout", "-q", "--", "params.yaml")
    out = sh(repo, "hdmap-ad", "grid", "--methods", "baseline,topk,topk+hseg", "--seeds", "42,43", "--jobs", "1",
             timeout=3000)  # fmt: skip
    assert "6/6 done" in out.stdout, out.stdout[-3000:]
    saved = json.loads((repo / "reports/comparison.json").read_text())
    assert set(saved["runs"]) == {"baseline", "topk", "topk+hseg"}
    assert all(set(saved["runs"][m]) == {"42", "43"} for m in saved["runs"])
    runs = mlflow_runs(repo)
    assert (runs["tags.method"] == "topk+hseg").sum() >= 2


def readme_block(tag: str) -> str:
    """The bash block after the README comment `<!-- tag: ... -->`: the command exactly as a user copies it."""
    text = (REPO / "README.md").read_text()
    return re.search(r"```bash\n(.*?)```", text[text.index(f"<!-- {tag}:") :], re.S).group(1)


def test_readme_exp_show_recipe_shows_state_steps_and_settings_and_the_clean_line_cleans(repo):
    """README's `dvc exp show` recipe, run as written on a workspace with a failed queued experiment, a queued
    one with another learning rate and a finished 4-step one: every row's state is a column (a failed row
    shows its parent's numbers, so its state must be visible), so are train.steps, profile and the setting
    that differs (train.lr); the headline AUROC stays, the other metrics and the deps go. Then README's
    clean-workspace line leaves git clean and DVC up to date."""
    restore_params(repo)
    dvc(repo, "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline", "--allow-empty")
    out = dvc(repo, "exp", "run", "--queue", "-S", "method=focl")
    failed = re.search(r"Queued experiment '([^']+)'", out.stdout + out.stderr)
    dvc(repo, "queue", "start", "-j", "1")
    deadline = time.time() + 600
    while time.time() < deadline:
        status = dvc(repo, "queue", "status").stdout
        if re.search(rf"{failed.group(1)}\s.*Failed", status) and "0 active" in status:
            break
        time.sleep(3)
    else:
        raise AssertionError(f"the queued experiment never failed:\n{status}")
    out = dvc(repo, "exp", "run", "--queue", "-S", "seed=44", "-S", "train.lr=0.0005")
    queued_name = re.search(r"Queued experiment '([^']+)'", out.stdout + out.stderr).group(1)
    ran = dvc(repo, "exp", "run", "-S", "train.steps=4", "-S", "seed=43").stdout
    ran_name = re.search(r"Ran experiment\(s\): (\S+)", ran).group(1)

    env = {**env_for(repo), "COLUMNS": "400"}
    shown = subprocess.run(
        ["bash", "-c", readme_block("exp-show-recipe")], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    lines = [line.split() for line in shown.stdout.splitlines() if line.strip() and "───" not in line]
    header = lines[0]
    assert header[:3] == ["Experiment", "State", "Executor"]
    assert {"train.steps", "profile", "method", "seed", "train.lr", "mean.auroc", "domain_C.auroc"} <= set(header)
    assert not [c for c in header if c.endswith((".ap", ".tpr_at_fpr_1")) or "/" in c or c == "steps"]
    rows = {next((w.strip("[]") for w in row if w.startswith("[")), row[0]): row for row in lines[1:]}

    def cell(name: str, column: str) -> str:
        row = rows[name]
        return row[len(row) - len(header) + header.index(column)]  # the tree glyphs make the first cell wider

    assert cell(failed.group(1), "State") == "Failed" and cell(failed.group(1), "method") == "focl"
    assert cell(queued_name, "State") == "Queued" and cell(queued_name, "train.lr") == "0.0005"
    assert cell(queued_name, "mean.auroc") == "-"  # no results yet
    assert cell(ran_name, "train.steps") == "4" and cell(ran_name, "seed") == "43"
    assert cell("workspace", "train.steps") == cell(ran_name, "train.steps")
    branch = sh(repo, "git", "rev-parse", "--abbrev-ref", "HEAD").stdout.strip()
    assert cell(branch, "train.steps") == "8"  # the committed run: not comparable with the 4-step one

    assert sh(repo, "git", "status", "--porcelain").stdout != ""  # the experiment is in the workspace
    sh(repo, "bash", "-c", readme_block("clean-workspace"))
    assert sh(repo, "git", "status", "--porcelain").stdout == ""
    status = dvc(repo, "status").stdout
    assert [line.strip() for line in status.splitlines() if line.strip()] == ["compare:", "always changed"]
    dvc(repo, "queue", "remove", "--all")  # nothing queued for later tests
