"""The README's DVC commands, run exactly as written (the block after each `<!-- tag: ... -->` comment):
the `dvc exp show` recipe on a workspace with failed, queued and shorter experiments, and the line back
to a clean workspace.

Its own throw-away repository (tests/dvc_repo.py), so it runs beside the other pipeline modules.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from dvc_repo import dvc, env_for, sh

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


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
    sh(repo, "git", "add", "-A")  # the trained clone (tests/conftest.py `repo`), committed
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
