"""`hdmap-ad serve`: serve a trained model over HTTP (MLflow's /invocations contract) with bounded memory.

    hdmap-ad serve --model models/model.safetensors                  # or a run id, runs:/..., models:/...
    hdmap-ad serve --backend onnx --model exports/model.onnx --port 5002

The model is resolved as `predict` resolves it and scored by the same pyfunc model code that
`mlflow models serve` runs (hdmap_ad.pipeline.serving); the HTTP side (hdmap_ad.pipeline.http_server)
runs on uvicorn and refuses requests over params.yaml's `serve` limits before parsing them.

This module keeps its top-level imports light: every `hdmap-ad` call imports it to build the parser.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from hdmap_ad.apps.parsing import add_command
from hdmap_ad.core.errors import HdmapError

DESCRIPTION = """\
Serve a trained model over HTTP: POST /invocations with {"inputs": N×H×W numbers, "params":
{"domain": ..., "threshold": ..., "resize": false}} answers {"predictions": [{"score", "is_anomaly",
"threshold"}, ...]}, as `mlflow models serve` does for this model; GET /ping answers 200.

Requests over the limits of params.yaml's `serve` section (or the flags below) are refused before
they are parsed: 413 for a body over serve.max_request_mb (by Content-Length, or counted while a
chunked body streams in) or holding more numbers than serve.max_maps maps, 400 for more than
serve.max_maps maps. Maps of another H×W than the training maps are refused (400) unless the
request sets params.resize (PyTorch backend only).
"""


def run_serve(args: argparse.Namespace) -> int:
    from hdmap_ad.core.config import load_params

    params = load_params(args.params, args.set) if Path(args.params).is_file() else None
    if params is None and str(args.params) != "params.yaml":
        raise HdmapError(f"--params {args.params}: not found")
    if params is None:
        from hdmap_ad.core.config import ServeParams

        serve = ServeParams()
    else:
        serve = params.serve
    overrides = {
        k: v
        for k, v in (
            ("host", args.host),
            ("port", args.port),
            ("max_request_mb", args.max_request_mb),
            ("max_maps", args.max_maps),
            ("concurrency", args.concurrency),
        )
        if v is not None
    }
    if overrides:
        from pydantic import ValidationError

        try:
            serve = type(serve).model_validate({**serve.model_dump(), **overrides})
        except ValidationError as err:
            item = err.errors()[0]
            raise HdmapError(f"--{item['loc'][0].replace('_', '-')} {item.get('input')!r}: {item['msg']}") from None
    if args.device is not None:
        os.environ["HDMAP_AD_DEVICE"] = args.device

    import uvicorn

    from hdmap_ad import __version__
    from hdmap_ad.pipeline.http_server import InvocationsApp
    from hdmap_ad.pipeline.model_source import CHECKPOINT_SUFFIX, check_source, is_mlflow_reference, resolve_model
    from hdmap_ad.pipeline.serving import ARTIFACT_KEY, ONNX_ARTIFACT_KEY, HdmapPyfuncModel
    from hdmap_ad.pipeline.tracking import tracking_uri

    onnx = args.backend == "onnx"
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hdmap-serve-")))
        configured = params.mlflow.tracking_uri if params is not None else None
        uri = tracking_uri(configured) if is_mlflow_reference(args.model) else ""
        resolved = resolve_model(args.model, workdir, uri, suffix=".onnx" if onnx else CHECKPOINT_SUFFIX)
        if onnx != (resolved.checkpoint.suffix == ".onnx"):
            raise HdmapError(
                f"--model {args.model}: {resolved.checkpoint.name} is "
                + ("not an exported .onnx model (drop --backend onnx)" if onnx else "an ONNX model: add --backend onnx")
            )
        model = HdmapPyfuncModel()
        key = ONNX_ARTIFACT_KEY if onnx else ARTIFACT_KEY
        model.load_context(SimpleNamespace(artifacts={key: str(resolved.checkpoint)}))
        check_source(resolved, model.onnx.info.get("model_sha256") if onnx else model.trained.info.get("sha256"))
        app = InvocationsApp(model, serve, version=__version__)
        print(
            f"serving {args.model} ({'onnxruntime' if onnx else 'PyTorch'}) on http://{serve.host}:{serve.port}"
            f"/invocations; per request at most {serve.max_request_mb:g} MiB and {serve.max_maps} maps, "
            f"{serve.concurrency} at a time, {serve.max_connections} connections",
            file=sys.stderr,
            flush=True,
        )
        config = uvicorn.Config(
            app,
            host=serve.host,
            port=serve.port,
            limit_concurrency=serve.max_connections,  # more open connections: 503
            timeout_keep_alive=5,
            log_level="warning",
            lifespan="off",
            # Python's asyncio loop and h11: no compiled extras needed (the body is counted by the app)
            loop="asyncio",
            http="h11",
        )
        uvicorn.Server(config).run()
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = add_command(
        sub,
        common,
        "serve",
        "serve a trained model over HTTP (MLflow's /invocations) with bounded request size and memory",
        DESCRIPTION,
    )
    p.add_argument(
        "--model", required=True, help="checkpoint path | .onnx file | MLflow run id | runs:/<run id>/... | models:/..."
    )
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch", help="as for predict (default: torch)")
    p.add_argument("--host", help="address to listen on (default: serve.host)")
    p.add_argument("--port", type=int, help="port (default: serve.port)")
    p.add_argument("--max-request-mb", type=float, help="largest request body (default: serve.max_request_mb)")
    p.add_argument("--max-maps", type=int, help="most maps per request (default: serve.max_maps)")
    p.add_argument("--concurrency", type=int, help="requests scored at once (default: serve.concurrency)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: auto; PyTorch backend)")
    p.set_defaults(func=run_serve)
    return p
