"""A throw-away DVC repository for the end-to-end tests (test_pipeline*.py): a copy of this one's
pipeline files on tiny settings, its own git, DVC and MLflow store, and the commands a user types.

The trained state (`trained_repo`: what `make run` leaves) is built once per test run and each module
gets a `clone_repo` of it (tests/conftest.py), so the modules run in parallel on separate pytest-xdist
workers and no module sees another's experiments.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

import shipped
import tiny

REPO = Path(__file__).resolve().parents[1]

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


def mlflow_runs(repo: Path) -> pd.DataFrame:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["hdmap-dinomaly"])
    if "tags.kind" in runs:
        runs = runs[runs["tags.kind"] != "compare"]
    return runs


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


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.2)
    return False


def trained_repo(root: Path) -> Path:
    """`make_repo`, then `hdmap-ad init-tracking` and `dvc repro`: the state a user has after `make run`."""
    repo = make_repo(root)
    sh(repo, "hdmap-ad", "init-tracking")
    sh(repo, sys.executable, "-m", "dvc", "repro")
    return repo


def clone_repo(template: Path, dest: Path) -> Path:
    """A copy of `template` at `dest` that works on its own: git, DVC and the outputs copy as they are
    (they hold relative paths), but MLflow records absolute ones (the experiments' artifact locations, the
    runs' artifact URIs, the logged models' MLmodel files, the compare reports), which are moved to `dest`
    so the copy neither reads nor writes the template's artifacts."""
    template, dest = Path(template).resolve(), Path(dest).resolve()
    shutil.copytree(template, dest, symlinks=True)
    old, new = str(template), str(dest)
    db = sqlite3.connect(dest / "mlflow.db")
    try:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for column in db.execute(f'PRAGMA table_info("{table}")').fetchall():
                if column[2].upper().startswith(("VARCHAR", "TEXT", "CHAR")):
                    name = column[1]
                    db.execute(
                        f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?) WHERE instr("{name}", ?) > 0',
                        (old, new, old),
                    )
        db.commit()
        left = [t for t in tables if old in "".join(str(r) for r in db.execute(f'SELECT * FROM "{t}"'))]
        assert not left, f"MLflow tables {left} still name the template {old}"
    finally:
        db.close()
    for folder in ("mlartifacts", "mlruns", "reports"):
        for path in (dest / folder).rglob("*"):
            if path.is_file() and path.suffix in ("", ".json", ".md", ".yaml", ".txt"):
                text = path.read_text(errors="surrogateescape")
                if old in text:
                    path.write_text(text.replace(old, new), errors="surrogateescape")
    return dest
