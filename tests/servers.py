"""Processes the multi-machine tests start: a loopback MLflow server, and shell commands that must succeed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
# the request limits `serving` starts `hdmap-ad serve` with
LIMIT_MB = 1
MAX_MAPS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(cmd: list[str], cwd: Path, env: dict, timeout: float = 120) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} (in {cwd}) failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@contextlib.contextmanager
def running_mlflow_server(folder: Path):
    """A loopback `mlflow server` with its own sqlite store and artifact folder under `folder`; always terminated."""
    port = _free_port()
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{folder / 'server.db'}",
            "--artifacts-destination",
            str(folder / "art"),
            "-w",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=folder,
        # MLflow 3's job runner (GenAI scoring jobs) starts seven more processes; nothing here uses it
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer within 60 s:\n{(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker: the group started above
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


@contextlib.contextmanager
def serving(pipeline, folder: Path, *extra: str):
    """`hdmap-ad serve` of a tests/fixtures_pipeline.py `TinyPipeline` on a free loopback port, with this
    module's request limits (LIMIT_MB, MAX_MAPS); yields (port, process, log path) once /ping answers, and
    stops the server's whole process group at the end."""
    port = _free_port()
    log_path = folder / f"serve-{port}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [str(BIN / "hdmap-ad"), "serve", "--params", str(pipeline.params_file), "--model", str(pipeline.checkpoint)]
        + ["--port", str(port), "--max-request-mb", str(LIMIT_MB), "--max-maps", str(MAX_MAPS), *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=pipeline.root,
        env=pipeline.env(),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            with contextlib.suppress(OSError):
                if http("127.0.0.1", port, "GET", "/ping")[0] == 200:
                    break
            assert time.monotonic() < deadline, "server did not come up in 120 s:\n" + log_path.read_text()[-3000:]
            time.sleep(0.5)
        yield port, proc, log_path
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


def http(host: str, port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """(status, parsed JSON or text) over a raw socket, so that a refusal sent before the body is read arrives."""
    head = {"Host": f"{host}:{port}", "Content-Type": "application/json", "Content-Length": str(len(body))}
    head.update(headers or {})
    head = {k: v for k, v in head.items() if v is not None}
    request = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(request.encode() + body)
        return read_response(s)


def read_response(s: socket.socket):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before an answer: {data[:200]!r}")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    status = int(head.split()[1])
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    try:
        return status, json.loads(rest[:length])
    except ValueError:
        return status, rest[:length].decode()
