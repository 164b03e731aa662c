"""`hdmap-ad serve`: the trained model over HTTP with MLflow's /invocations contract, and bounded memory.

`mlflow models serve` reads and parses a request body of any size (a 250 MB body took its RSS from
1.45 GB to 5.87 GB). This ASGI app (run on uvicorn by `apps/serve.py`) answers the same requests
as MLflow's scoring server for this model (docs/design.md#pipe-serve):

    POST /invocations   Content-Type application/json, {"inputs": N×H×W numbers, "params": {...}}
                        ("instances" is read like "inputs") -> 200 {"predictions": [{"score": ...,
                        "is_anomaly": ..., "threshold": ...}, ...]}
    GET  /ping, /health -> 200; GET /version -> the hdmap-ad version

Errors are MLflow's shape, `{"error_code": ..., "message": "<one line>"}`: 400 bad input, 413 too
large, 415 not JSON, 408 body too slow, 503 busy, 504 scoring stopped at the request timeout.

What bounds memory, checked before anything is parsed:
- the body's size: a Content-Length over the limit is answered 413 without reading the body; a
  chunked body is counted while it streams in and answered 413 the moment it passes the limit;
- its count of numbers: before JSON parsing, the body's commas bound how many numbers it holds,
  and more than max_maps maps of the model's H×W is answered 413 (a parsed number costs ~32 bytes
  of Python objects, whatever its text length);
- the maps per request (400 after parsing, before any scoring);
- `concurrency` requests are read and scored at once; the others wait with their bodies unread.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mlflow.exceptions import MlflowException

from hdmap_ad.core.config import ServeParams
from hdmap_ad.core.decision import map_shape
from hdmap_ad.pipeline.serving import ScoringTimeout

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
KNOWN_PARAMS = {"domain": str, "threshold": (int, float), "resize": bool}


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _mb(n: float) -> str:
    return f"{n / 2**20:.3g} MiB"


class InvocationsApp:
    """The ASGI application. `model` is an `HdmapPyfuncModel` after `load_context`; `limits` params.yaml's
    validated `serve` section."""

    def __init__(self, model: Any, limits: ServeParams, version: str = "") -> None:
        self.model, self.limits, self.version = model, limits, version
        shape = map_shape(model.trained)
        # numbers a request may hold: max_maps maps of the training H×W (unknown H×W: one per 2 body bytes)
        self.max_numbers = limits.max_maps * shape[0] * shape[1] if shape else limits.max_request_bytes // 2
        self.gate: asyncio.Semaphore | None = None  # made inside the server's event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        try:
            if path in ("/ping", "/health") and method in ("GET", "HEAD"):
                await self._answer(send, 200, b"\n", "text/plain")
            elif path == "/version" and method == "GET":
                await self._answer(send, 200, self.version.encode(), "text/plain")
            elif path == "/invocations":
                if method != "POST":
                    raise Refused(405, "BAD_REQUEST", f"{method} /invocations: use POST")
                await self._invocations(scope, receive, send)
            else:
                raise Refused(404, "ENDPOINT_NOT_FOUND", f"{method} {path}: not found (POST /invocations)")
        except Refused as err:
            await self._error(send, err.status, err.code, err.message)

    # ----------------------------------------------------------------------------------------------

    async def _invocations(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise Refused(415, "BAD_REQUEST", f"content type {ctype or '(none)'!r}: this server reads application/json")
        limit = self.limits.max_request_bytes
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise Refused(400, "BAD_REQUEST", f"Content-Length {length!r}: not a number")
            if int(length) > limit:  # refused before one byte of the body is read
                raise Refused(413, "REQUEST_TOO_LARGE", self._too_large(f"{_mb(int(length))} body"))
        if self.gate is None:
            self.gate = asyncio.Semaphore(self.limits.concurrency)
        async with self.gate:
            body = await self._read_body(receive, limit)
            payload = self._parse(body)
            del body
            inputs, params = self._inputs(payload)
            del payload
            deadline = time.monotonic() + self.limits.request_timeout_s
            try:
                frame = await asyncio.to_thread(self.model.score_request, inputs, params, deadline)
            except ScoringTimeout as err:
                raise Refused(504, "DEADLINE_EXCEEDED", str(err.message)) from None
            except MlflowException as err:
                status = 400 if err.error_code == "INVALID_PARAMETER_VALUE" else 500
                raise Refused(status, err.error_code, _one_line(err.message)) from None
            except Exception as err:  # scoring bugs: one line to the client, the server keeps running
                raise Refused(500, "INTERNAL_ERROR", f"{type(err).__name__}: {_one_line(str(err))}") from None
        rows = [
            {
                "score": float(s),
                "is_anomaly": None if a is None else bool(a),
                "threshold": None if t is None or (isinstance(t, float) and math.isnan(t)) else float(t),
            }
            for s, a, t in zip(frame["score"], frame["is_anomaly"], frame["threshold"])
        ]
        await self._answer(send, 200, json.dumps({"predictions": rows}).encode(), "application/json")

    def _too_large(self, what: str) -> str:
        return (
            f"{what}: over this server's limit of {_mb(self.limits.max_request_bytes)} (serve.max_request_mb); "
            "send fewer maps per request"
        )

    async def _read_body(self, receive: Receive, limit: int) -> bytes:
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=self.limits.read_timeout_s)
            except TimeoutError:
                raise Refused(
                    408, "REQUEST_TIMEOUT", f"request body not received within {self.limits.read_timeout_s:g} s"
                ) from None
            if message["type"] == "http.disconnect":
                raise Refused(400, "BAD_REQUEST", "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # a chunked body: counted as it streams in, dropped at the limit
                raise Refused(413, "REQUEST_TOO_LARGE", self._too_large(f"body of more than {_mb(size)}"))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _parse(self, body: bytes) -> Any:
        # Each parsed number costs ~32 bytes of Python objects however short its text ("0,"): bound the
        # count from the separators before parsing (numbers <= commas + 1).
        numbers = body.count(b",") + 1
        if numbers > self.max_numbers + 64:  # + a few for params
            raise Refused(
                413,
                "REQUEST_TOO_LARGE",
                f"request holds up to {numbers} numbers, over this server's limit of {self.max_numbers} "
                f"({self.limits.max_maps} maps, serve.max_maps); send fewer maps per request",
            )
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as err:
            raise Refused(
                400, "MALFORMED_REQUEST", f"request body is not valid JSON ({_one_line(str(err))[:200]})"
            ) from None

    def _inputs(self, payload: Any) -> tuple[Any, dict[str, Any]]:
        if not isinstance(payload, dict):
            raise Refused(400, "BAD_REQUEST", 'expected a JSON object {"inputs": [...], "params": {...}}')
        keys = [k for k in ("inputs", "instances") if k in payload]
        other = sorted(set(payload) - {"inputs", "instances", "params"})
        if len(keys) != 1 or other:
            raise Refused(
                400,
                "BAD_REQUEST",
                f"request keys {sorted(payload)}: expected one of inputs / instances (N×H×W numbers) and optional "
                "params (dataframe_split / dataframe_records are not read by this model)",
            )
        inputs = payload[keys[0]]
        if isinstance(inputs, dict) and len(inputs) == 1:  # {"inputs": {"maps": [...]}}: the named tensor
            inputs = next(iter(inputs.values()))
        if not isinstance(inputs, list):
            raise Refused(400, "BAD_REQUEST", f"{keys[0]}: expected a list of maps, got {type(inputs).__name__}")
        if len(inputs) > self.limits.max_maps:
            raise Refused(
                400,
                "BAD_REQUEST",
                f"{len(inputs)} maps in one request, over this server's limit of {self.limits.max_maps} "
                "(serve.max_maps); send fewer maps per request",
            )
        params = payload.get("params") or {}
        if not isinstance(params, dict):
            raise Refused(400, "BAD_REQUEST", "params: expected a JSON object")
        for key, value in params.items():
            kind = KNOWN_PARAMS.get(key)
            if kind is None:
                raise Refused(400, "BAD_REQUEST", f"params.{key}: unknown (known: {', '.join(KNOWN_PARAMS)})")
            bad_bool = kind != bool and isinstance(value, bool)  # noqa: E721  (bool is an int in Python)
            if value is not None and (not isinstance(value, kind) or bad_bool):
                raise Refused(400, "BAD_REQUEST", f"params.{key} {value!r}: wrong type")
        return inputs, params

    # ----------------------------------------------------------------------------------------------

    async def _answer(self, send: Send, status: int, body: bytes, ctype: str, close: bool = False) -> None:
        headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _error(self, send: Send, status: int, code: str, message: str) -> None:
        body = json.dumps({"error_code": code, "message": message}).encode()
        # after a refused body the rest of it is never read: close the connection instead of draining it
        await self._answer(send, status, body, "application/json", close=status in (408, 413))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:1000]
