"""`hdmap-ad serve` over HTTP: MLflow's /invocations contract, and requests over its limits refused
before they are parsed, with the server's memory staying within a bound of its idle memory.

One server (the tiny trained model, 1 MiB and 8 maps per request) is started for the module.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from fixtures_pipeline import TinyPipeline
from servers import LIMIT_MB, MAX_MAPS, http, read_response, serving

BIN = Path(sys.executable).parent
# What the server may add to its idle RSS while it answers any of these requests: the body (<= 1 MiB),
# its parse (<= 8 maps' numbers, ~32 bytes each), the scoring of one batch of the tiny model, allocator slack.
RSS_BOUND_MB = 120

pytestmark = pytest.mark.slow


class PeakRss:
    """Samples a process's RSS every 5 ms in a thread; `.peak_mb` after the block."""

    def __init__(self, pid: int) -> None:
        self.proc, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()

    def __enter__(self):
        self.idle_mb = self.proc.memory_info().rss / 2**20
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak_mb = self.peak / 2**20


@pytest.fixture(scope="module")
def server(tiny_pipeline, tmp_path_factory):
    with serving(tiny_pipeline, tmp_path_factory.mktemp("serve")) as running:
        yield running


def _maps(pipeline: TinyPipeline, n: int = 4) -> tuple[list[Path], np.ndarray]:
    from hdmap_ad.pipeline.data import read_map

    files = sorted((pipeline.data_root / pipeline.domains[0] / "test" / "fault").glob("*.tif*"))[:n]
    return files, np.stack([read_map(f) for f in files]).astype(np.float32)


def test_answers_like_predict_and_mlflow(server, tiny_pipeline, tmp_path):
    port, _, _ = server
    files, maps = _maps(tiny_pipeline)
    out = tmp_path / "p.csv"
    cmd = [str(BIN / "hdmap-ad"), "predict", "--params", str(tiny_pipeline.params_file), "--device", "cpu"]
    p = subprocess.run(
        [*cmd, "--model", str(tiny_pipeline.checkpoint), "--out", str(out), *map(str, files)],
        capture_output=True,
        text=True,
        env=tiny_pipeline.env(),
        cwd=tiny_pipeline.root,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    import pandas as pd

    expected = pd.read_csv(out)["score"].to_numpy()
    body = json.dumps({"inputs": maps.tolist(), "params": {"domain": "domain_A"}}).encode()
    status, answer = http("127.0.0.1", port, "POST", "/invocations", body)
    assert status == 200, answer
    rows = answer["predictions"]
    np.testing.assert_allclose([r["score"] for r in rows], expected, atol=1e-6, rtol=0)
    thr = tiny_pipeline.thresholds["domain_A"]
    assert [r["threshold"] for r in rows] == pytest.approx([thr] * len(rows))
    assert [r["is_anomaly"] for r in rows] == [bool(r["score"] >= thr) for r in rows]
    # MLflow's other tensor key and its named-tensor form are read the same way
    for payload in ({"instances": maps.tolist()}, {"inputs": {"maps": maps.tolist()}}):
        status, other = http("127.0.0.1", port, "POST", "/invocations", json.dumps(payload).encode())
        assert status == 200, other
        np.testing.assert_allclose([r["score"] for r in other["predictions"]], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "payload, status, words",
    [
        ({"inputs": [[[1.0]]]}, 400, "shape 1x1, the model was trained on 31x95 maps"),
        ({"inputs": np.full((1, 31, 95), 3e38).tolist()}, 400, "score is NaN/Inf"),
        ({"inputs": [[[1.0, "a"]]]}, 400, "not a rectangular array of numbers"),
        ({"inputs": [], "params": {"domain": "domain_Z"}}, 400, "params.domain 'domain_Z'"),
        ({"inputs": [], "params": {"colour": 1}}, 400, "params.colour: unknown"),
        ({"dataframe_split": {}}, 400, "expected one of inputs / instances"),
        ({"inputs": np.ones((MAX_MAPS + 1, 1, 1)).tolist()}, 400, f"over this server's limit of {MAX_MAPS}"),
    ],
)
def test_bad_requests_get_one_line(server, payload, status, words):
    port, proc, _ = server
    got, answer = http("127.0.0.1", port, "POST", "/invocations", json.dumps(payload).encode())
    assert got == status and words in answer["message"], answer
    assert "\n" not in answer["message"]
    assert proc.poll() is None


def test_resize_only_when_asked(server):
    port, _, _ = server
    body = json.dumps({"inputs": np.ones((1, 20, 40)).tolist(), "params": {"resize": True}}).encode()
    status, answer = http("127.0.0.1", port, "POST", "/invocations", body)
    assert status == 200 and np.isfinite(answer["predictions"][0]["score"]), answer


def test_oversized_requests_are_refused_before_reading_and_memory_stays_bounded(server, tiny_pipeline):
    port, proc, _ = server
    with PeakRss(proc.pid) as rss:
        # 1. a declared 250 MB body: refused on its Content-Length, nothing of it sent
        t0 = time.monotonic()
        head = {"Content-Length": str(250 * 10**6)}
        status, answer = http("127.0.0.1", port, "POST", "/invocations", b"", head)
        assert status == 413 and "over this server's limit of 1 MiB" in answer["message"], answer
        assert time.monotonic() - t0 < 5
        # 2. chunked, no Content-Length: counted while it streams in, refused at the limit
        sent = 0
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(
                b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b"[" + b"0.25, " * 10000
            with contextlib.suppress(OSError):  # the server closes the connection once it has answered
                for _ in range(2000):  # up to 120 MB
                    s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
            status, answer = read_response(s)
        assert status == 413 and "body of more than 1" in answer["message"], answer
        assert sent < 20 * 2**20  # it stopped reading soon after the limit
        # 3. just under the byte limit but more numbers than 8 maps hold: refused before JSON parsing
        body = b"[" + b"0," * (LIMIT_MB * 2**20 // 2 - 8) + b"0]"
        status, answer = http("127.0.0.1", port, "POST", "/invocations", body)
        assert status == 413 and "numbers" in answer["message"], answer
        # 4. the largest request it accepts: 8 maps of 31x95, scored
        maps = np.random.default_rng(0).uniform(0, 1, (MAX_MAPS, 31, 95)).astype(np.float32)
        body = json.dumps({"inputs": maps.tolist()}).encode()
        assert len(body) <= LIMIT_MB * 2**20
        status, answer = http("127.0.0.1", port, "POST", "/invocations", body)
        assert status == 200 and len(answer["predictions"]) == MAX_MAPS
    assert rss.peak_mb - rss.idle_mb < RSS_BOUND_MB, (rss.idle_mb, rss.peak_mb)
    assert proc.poll() is None
    # still serving
    _, maps = _maps(tiny_pipeline, 1)
    status, _ = http("127.0.0.1", port, "POST", "/invocations", json.dumps({"inputs": maps.tolist()}).encode())
    assert status == 200


def test_a_wrong_limit_is_one_line(tiny_pipeline):
    p = subprocess.run(
        [str(BIN / "hdmap-ad"), "serve", "--params", str(tiny_pipeline.params_file), "--model", "x.pt"]
        + ["--max-maps", "0"],
        capture_output=True,
        text=True,
        env=tiny_pipeline.env(),
        cwd=tiny_pipeline.root,
        timeout=120,
    )
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --max-maps 0: Input should be greater than or equal to 1"
    ], p.stderr
