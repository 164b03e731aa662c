"""The shipped params.yaml for tests: the committed one, never the workspace's copy.

`dvc exp run -S method=focal` rewrites the workspace's params.yaml (that is how DVC applies an
experiment); tests that read it would then test the user's last experiment instead of the shipped
configuration. Tests read params.yaml through these helpers, which take the version in git's HEAD
(falling back to the file itself outside a git checkout), and set every value they rely on. So a change
to params.yaml reaches the tests once it is committed.
"""

from __future__ import annotations

import subprocess
import tempfile
from functools import cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


@cache
def text(name: str) -> str:
    """The committed text of `name` (a path relative to the repository root)."""
    try:
        out = subprocess.run(["git", "show", f"HEAD:{name}"], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        out = None
    if out is not None and out.returncode == 0:
        return out.stdout
    return (REPO / name).read_text()


def params() -> dict:
    """The committed params.yaml, parsed (a fresh copy each call)."""
    return yaml.safe_load(text("params.yaml"))


@cache
def params_file() -> Path:
    """A file holding the committed params.yaml (for APIs that take a path)."""
    folder = Path(tempfile.mkdtemp(prefix="hdmap-shipped-"))
    path = folder / "params.yaml"
    path.write_text(text("params.yaml"))
    return path
