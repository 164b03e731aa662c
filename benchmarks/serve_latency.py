"""Latency and memory of `hdmap-ad serve` (the README's serving table).

    python benchmarks/serve_latency.py --model models/model.safetensors --maps data/raw/synthetic/domain_A/test/fault

Starts the server on a free port, then sends one-map requests: `--requests` one after another, and
the same number again from 4 client threads at once; prints p50/p99 latency of each and the server's
peak RSS above its idle RSS (sampled every 5 ms), also for the largest request the limits accept
(serve.max_maps maps) and for a refused oversized one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import tifffile


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes) -> tuple[int, float]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (ConnectionError, urllib.error.URLError):
        status = -1  # the server closed the connection after refusing the body
    return status, 1000 * (time.perf_counter() - t0)


class Peak:
    def __init__(self, pid: int) -> None:
        self.p, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()

    def __enter__(self):
        self.idle = self.p.memory_info().rss
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()
        return self

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.p.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--maps", required=True, type=Path, help="a folder of .tiff maps")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--serve-args", default="", help="extra `hdmap-ad serve` arguments")
    args = ap.parse_args()

    files = sorted(args.maps.glob("*.tif*"))
    maps = [tifffile.imread(f).astype(np.float32) for f in files]
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "hdmap-ad"), "serve", "--model", args.model, "--port", str(port)]
    proc = subprocess.Popen(cmd + args.serve_args.split(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/ping", timeout=2).status == 200:
                    break
            if proc.poll() is not None:
                sys.exit("server exited")
            time.sleep(0.5)
        bodies = [json.dumps({"inputs": [maps[i % len(maps)].tolist()]}).encode() for i in range(args.requests)]
        for body in bodies[:5]:  # warm-up
            post(f"{url}/invocations", body)
        rows = []
        with Peak(proc.pid) as mem:
            seq = [post(f"{url}/invocations", b) for b in bodies]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                par = list(pool.map(lambda b: post(f"{url}/invocations", b), bodies))
            wall = time.perf_counter() - t0
        assert all(s == 200 for s, _ in seq + par), {s for s, _ in seq + par}
        rows.append(("sequential, 1 map", pct([t for _, t in seq], 50), pct([t for _, t in seq], 99), ""))
        rows.append(
            (
                f"{args.clients} clients, 1 map each",
                pct([t for _, t in par], 50),
                pct([t for _, t in par], 99),
                f"{len(par) / wall:.1f} req/s",
            )
        )
        print(f"idle RSS {mem.idle / 2**20:.0f} MiB; peak above idle during latency runs {(mem.peak - mem.idle) / 2**20:.0f} MiB")
        # the largest accepted request and a refused oversized one
        for label, body in (
            ("max_maps maps (largest accepted)", None),
            ("64 MiB body (refused)", b"[" + b"0.25, " * (64 * 2**20 // 6) + b"0]"),
        ):
            if body is None:
                n = int(os.environ.get("MAX_MAPS", "256"))
                body = json.dumps({"inputs": [maps[i % len(maps)].tolist() for i in range(n)]}).encode()
            with Peak(proc.pid) as mem:
                status, ms = post(f"{url}/invocations", body)
            print(
                f"{label}: {len(body) / 2**20:.1f} MiB body -> HTTP {status} in {ms:.0f} ms; "
                f"peak RSS above idle {(mem.peak - mem.idle) / 2**20:.0f} MiB"
            )
        print("| requests | p50 (ms) | p99 (ms) | throughput |\n|---|---:|---:|---:|")
        for label, p50, p99, extra in rows:
            print(f"| {label} | {p50:.1f} | {p99:.1f} | {extra} |")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
