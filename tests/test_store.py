"""A tracking store that is dead or read-only is found within seconds, through the `hdmap-ad` command:
one line naming the URI and what to do, exit status 2, nothing written."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import shipped
from fixtures_pipeline import TinyPipeline

BIN = Path(sys.executable).parent
CHECK_S = 10  # what the store check itself may take (the message says how long it waited)

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def black_hole():
    """A port that accepts connections and never answers: a server that hangs, or a dead address
    behind a firewall that drops packets."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        server.close()


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def hdmap(args: list, cwd: Path, uri: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    import os

    full = dict(env or os.environ, MLFLOW_TRACKING_URI=uri, DVC_NO_ANALYTICS="1", HDMAP_AD_DEVICE="cpu")
    t0 = time.monotonic()
    p = subprocess.run(
        [str(BIN / "hdmap-ad"), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=full, timeout=600
    )
    return p, time.monotonic() - t0


def one_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, p.stderr[-3000:]
    return lines[0]


def waited(line: str) -> float:
    return float(re.search(r"after (\d+) s", line).group(1))


@pytest.fixture()
def workspace(tmp_path) -> Path:
    shutil.copy(shipped.params_file(), tmp_path / "params.yaml")
    return tmp_path


def test_init_tracking_on_a_hanging_server_fails_within_seconds(workspace):
    with black_hole() as uri:
        p, _ = hdmap(["init-tracking"], workspace, uri)
    line = one_error(p)
    assert line.startswith(f"error: MLflow store {uri}: not reachable (no answer within 5 s, after ")
    assert line.endswith(
        "start the tracking server or point MLFLOW_TRACKING_URI (mlflow.tracking_uri) at a "
        "reachable one (unset, the local sqlite store mlflow.db is used)"
    )
    assert waited(line) <= CHECK_S


def test_init_tracking_on_a_closed_port_is_immediate(workspace):
    uri = closed_port()
    p, _ = hdmap(["init-tracking"], workspace, uri)
    line = one_error(p)
    assert f"MLflow store {uri}: not reachable (connection refused, after 0 s)" in line


def _read_only(db: Path) -> str:
    # as root a file mode cannot make a file read-only; sqlite's own read-only mode does, for everyone
    return f"sqlite:///file:{db}?mode=ro&uri=true"


def test_a_read_only_store_is_refused_before_any_work(workspace, tiny_pipeline: TinyPipeline):
    ok = f"sqlite:///{workspace / 'mlflow.db'}"
    p, _ = hdmap(["init-tracking"], workspace, ok)
    assert p.returncode == 0, p.stderr
    before = (workspace / "mlflow.db").read_bytes()
    p, _ = hdmap(["init-tracking"], workspace, _read_only(workspace / "mlflow.db"))
    line = one_error(p)
    assert line == (
        f"error: MLflow store {_read_only(workspace / 'mlflow.db')}: not writable (the database is read-only); "
        "make the database file and its folder writable, or point MLFLOW_TRACKING_URI (mlflow.tracking_uri) "
        "at a writable store"
    )
    assert (workspace / "mlflow.db").read_bytes() == before


def test_predict_from_a_run_on_a_hanging_server_fails_within_seconds(tiny_pipeline: TinyPipeline, tmp_path):
    with black_hole() as uri:
        p, _ = hdmap(
            [
                "predict",
                "--model",
                f"runs:/{tiny_pipeline.run_id}",
                "--out",
                tmp_path / "p.csv",
                tiny_pipeline.data_root,
            ],
            tmp_path,
            uri,
        )
    line = one_error(p)
    assert line.startswith(f"error: MLflow store {uri}: not reachable (no answer within 5 s")
    assert waited(line) <= CHECK_S and not (tmp_path / "p.csv").exists()


def test_compare_on_a_hanging_or_read_only_store(tiny_pipeline: TinyPipeline, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(tiny_pipeline.root, work)
    with black_hole() as uri:
        p, _ = hdmap(["compare"], work, uri)
    line = one_error(p)
    assert line.startswith(f"error: MLflow store {uri}: not reachable (no answer within 5 s")
    assert waited(line) <= CHECK_S
    ro = _read_only(work / "mlflow.db")
    p, _ = hdmap(["compare"], work, ro)
    line = one_error(p)
    assert line.startswith(f"error: MLflow store {ro}: cannot create experiment") or "not writable" in line, line
    assert "the database is read-only" in line


def test_train_on_a_dead_or_read_only_store_fails_before_the_slow_work(tiny_pipeline: TinyPipeline, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(tiny_pipeline.root, work)
    model = (work / "models" / "model.safetensors").read_bytes()
    with black_hole() as uri:
        p, _ = hdmap(["train", "--set", "train.steps=6"], work, uri)
    line = one_error(p)
    assert line.startswith(f"error: MLflow store {uri}: not reachable (no answer within 5 s")
    assert waited(line) <= CHECK_S
    assert "caching encoder features" not in p.stdout + p.stderr  # stopped before the data was touched
    ro = _read_only(work / "mlflow.db")
    p, _ = hdmap(["train", "--set", "train.steps=6"], work, ro)
    line = one_error(p)
    assert line.startswith(f"error: MLflow store {ro}: not writable (the database is read-only)")
    assert "caching encoder features" not in p.stdout + p.stderr
    assert (work / "models" / "model.safetensors").read_bytes() == model


def test_evaluate_on_a_dead_or_read_only_store_fails_before_scoring(tiny_pipeline: TinyPipeline, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(tiny_pipeline.root, work)
    before = (work / "metrics" / "eval.json").read_bytes()
    with black_hole() as uri:
        p, _ = hdmap(["evaluate"], work, uri)
    line = one_error(p)
    assert (
        line.startswith(f"error: MLflow store {uri}: not reachable (no answer within 5 s") and waited(line) <= CHECK_S
    )
    ro = _read_only(work / "mlflow.db")
    p, _ = hdmap(["evaluate"], work, ro)
    assert one_error(p).startswith(f"error: MLflow store {ro}: not writable (the database is read-only)")
    assert "scoring" not in p.stderr.lower()
    assert (work / "metrics" / "eval.json").read_bytes() == before
