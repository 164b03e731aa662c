"""The trained model as an MLflow pyfunc model: load it anywhere, serve it with `mlflow models serve`.

Logging (inside an active MLflow run; training calls this at the end of `train()`):

    from hdmap_ad.pipeline.serving import log_pyfunc_model
    model_uri = log_pyfunc_model(Path("models/model.safetensors"))  # models:/<model id>

The logged model holds the checkpoint (artifact `checkpoint` -> artifacts/model.safetensors, a safetensors
file), a copy of the `hdmap_ad` package (code_paths, so it loads in a fresh process that has only
the dependencies), and pinned requirements of the current environment. It is logged as code
(MLflow "models from code": `pyfunc_model.py` builds the model object), not as a pickle: loading
it unpickles nothing. It is still code, so load models only from a store you trust. Signature:

    input   tensor float32, shape (-1, -1, -1): N maps of the training maps' H×W
    params  domain: string (optional; "" or absent = pooled threshold), threshold: double (optional),
            resize: boolean (default false: a map of another H×W is refused with HTTP 400; true:
            the PyTorch model scores it after resizing, though its threshold was not chosen for it)
    output  columns score (double), is_anomaly (boolean), threshold (double)

Serving (`mlflow models serve -m <uri> --env-manager local -h 127.0.0.1 -p 5001`), request body of
POST /invocations with Content-Type application/json:

    {"inputs": [[[0.21, 0.25, ...], ...], ...],            # N×H×W numbers (raw map values)
     "params": {"domain": "domain_A"}}                       # optional; or {"threshold": 0.42}

answer: {"predictions": [{"score": 0.0123, "is_anomaly": false, "threshold": 0.0150}, ...]}.
A map that holds NaN/Inf, or whose score is not finite (values so large they overflow), makes
the request fail with HTTP 400 naming it: an answer never holds NaN. The server's 504 answer at
its request timeout (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT) does not stop the thread computing the
answer, so inside the server scoring stops between batches once that many seconds have passed
since it began (the server's own parsing of the request before that still runs to its end).

In-process, `mlflow.pyfunc.load_model(uri).predict(maps)` takes a float32 numpy array N×H×W (or
H×W for one map); the signature makes MLflow reject float64 there (cast with `.astype("float32")`).
Maps of different sizes in one call: a list of 2-D arrays, or a ragged object array.

Scores come from `inference.score_maps` (the evaluate stage's path); `is_anomaly = score >=
threshold` with the threshold chosen on the validation subset at training time: the request's
domain's own, else the pooled one, unless the request gives `threshold`. The device is `auto`
(CUDA when present); set HDMAP_AD_DEVICE=cpu to force one.

Logged from an exported `.onnx` file instead (`hdmap-ad export --log-model`, or
`log_pyfunc_model(Path("model.onnx"))`), the same model code scores on onnxruntime's CPU provider
(`core/onnx_scorer.py`) and imports no PyTorch; its requirements are mlflow, onnxruntime, numpy and
pandas. Inputs, outputs and decisions are the same; `resize` is refused (the graph does not resize).

`mlflow models serve` bounds neither the request size nor the server's memory: `hdmap-ad serve`
(hdmap_ad.pipeline.http_server) serves the same model with the same /invocations contract and does.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

ARTIFACT_KEY = "checkpoint"
MODEL_CODE = Path(__file__).resolve().with_name("pyfunc_model.py")  # builds the model object when MLflow loads it
DEFAULT_NAME = "model"
DEVICE_ENV = "HDMAP_AD_DEVICE"
# What the model needs at load time; versions are pinned to this environment's.
REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "pandas",
    "pydantic",
    "pyyaml",
    "rich",
    "tifffile",
    "safetensors",
    "scipy",
    "scikit-learn",
    "matplotlib",
    "pillow",
    "psutil",
)
# A model logged from an exported .onnx file (`hdmap-ad export --log-model`) scores on onnxruntime:
# its artifact is the ONNX file and it needs no PyTorch (hdmap_ad.core.onnx_scorer).
ONNX_ARTIFACT_KEY = "onnx"
ONNX_REQUIREMENTS = ("mlflow", "onnxruntime", "numpy", "pandas")


def as_map_list(model_input: Any) -> list[np.ndarray]:
    """N 2-D float32 maps from what a caller or the scoring server hands to `predict`.

    Accepts an array N×H×W (N×H×W×1) or one H×W map, a (ragged) object array or list of 2-D
    arrays / nested lists, a DataFrame whose single column holds one map per row, or a dict with
    one entry holding any of these.
    """
    if isinstance(model_input, dict):
        if len(model_input) != 1:
            raise MlflowException.invalid_parameter_value(
                f"expected one input (the maps), got keys {sorted(model_input)}"
            )
        model_input = next(iter(model_input.values()))
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] != 1:
            raise MlflowException.invalid_parameter_value(
                f"a DataFrame input needs one column holding one map (nested lists) per row, got {model_input.shape[1]} columns"
            )
        items = list(model_input.iloc[:, 0])
    elif isinstance(model_input, np.ndarray) and model_input.dtype != object:
        arr = model_input
        if arr.ndim == 4 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise MlflowException.invalid_parameter_value(
                f"expected maps as N×H×W (or one H×W map), got an array of shape {tuple(model_input.shape)}"
            )
        items = list(arr)
    elif isinstance(model_input, (list, tuple, np.ndarray)):
        items = list(model_input)
    else:
        raise MlflowException.invalid_parameter_value(f"cannot read maps from a {type(model_input).__name__}")

    maps = []
    for i, item in enumerate(items):
        try:
            m = np.asarray(item, dtype=np.float32)
        except (TypeError, ValueError):
            raise MlflowException.invalid_parameter_value(f"map {i}: not a rectangular array of numbers") from None
        if m.ndim == 3 and m.shape[-1] == 1:
            m = m[..., 0]
        if m.ndim != 2 or 0 in m.shape:
            raise MlflowException.invalid_parameter_value(f"map {i}: expected a 2-D H×W map, got shape {m.shape}")
        if not np.isfinite(m).all():
            raise MlflowException.invalid_parameter_value(f"map {i}: contains NaN or Inf values")
        maps.append(m)
    return maps


with warnings.catch_warnings(record=True):
    # MLflow suggests type hints on `predict` when the class is defined (forcing its own warning
    # filter, hence record=True to swallow it); the explicit signature below validates inputs.

    class HdmapPyfuncModel(mlflow.pyfunc.PythonModel):
        """Dinomaly on HDMAP maps: maps in, anomaly scores and decisions out (see the module docstring)."""

        def load_context(self, context) -> None:
            if ONNX_ARTIFACT_KEY in context.artifacts:  # the exported model: onnxruntime, no torch imported
                from hdmap_ad.core.onnx_scorer import OnnxScorer

                self.onnx = OnnxScorer(Path(context.artifacts[ONNX_ARTIFACT_KEY]))
                self.trained = self.onnx  # domains and thresholds, as the decision rule reads them
                return
            from hdmap_ad.core.checkpoint import load_trained
            from hdmap_ad.core.runtime import select_device

            self.onnx = None
            self.device = select_device(os.environ.get(DEVICE_ENV, "auto"))
            self.trained = load_trained(Path(context.artifacts[ARTIFACT_KEY]), self.device)

        def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
            return self.score_request(model_input, params, request_deadline())

        def score_request(
            self, model_input: Any, params: dict[str, Any] | None, deadline: float | None
        ) -> pd.DataFrame:
            """`predict` with an explicit deadline (time.monotonic(); None: none): `hdmap-ad serve` calls this."""
            from hdmap_ad.core.decision import decide, map_shape, shape_mismatch, threshold_for

            params = params or {}
            domain = params.get("domain") or None
            if domain is not None and domain not in self.trained.domains:
                raise MlflowException.invalid_parameter_value(
                    f"params.domain {domain!r}: the model knows {', '.join(self.trained.domains)}"
                )
            override = params.get("threshold")
            if override is not None and not np.isfinite(float(override)):
                raise MlflowException.invalid_parameter_value(f"params.threshold {override!r}: must be a finite number")
            resize = bool(params.get("resize") or False)
            if resize and self.onnx is not None:
                raise MlflowException.invalid_parameter_value(
                    "params.resize: not available on an exported ONNX model (its graph takes the training maps' H×W)"
                )
            maps = as_map_list(model_input)
            if not maps:
                return pd.DataFrame(
                    {"score": np.zeros(0), "is_anomaly": np.zeros(0, dtype=bool), "threshold": np.zeros(0)}
                )
            want = map_shape(self.trained)
            odd = [] if resize else shape_mismatch((m.shape for m in maps), want)
            if odd:  # both backends refuse another H×W unless asked: the threshold was chosen for this one
                h, w = maps[odd[0]].shape
                raise MlflowException.invalid_parameter_value(
                    f"map(s) {', '.join(map(str, odd[:10]))}{' ...' if len(odd) > 10 else ''}: shape {h}x{w}, "
                    f"the model was trained on {want[0]}x{want[1]} maps"
                    + ("" if self.onnx is not None else " (params.resize=true scores them after resizing)")
                )
            batch_size = self.onnx.batch_size if self.onnx is not None else self.trained.params.evaluate.batch_size
            scores = np.full(len(maps), np.nan, dtype=np.float64)
            for start in range(0, len(maps), batch_size):
                # A server's timeout answer cannot stop this thread: stop here, between batches
                # (counted from here, so never before the server's own timeout).
                if deadline is not None and time.monotonic() > deadline:
                    raise ScoringTimeout(
                        f"stopped after the server's request timeout with {start} of "
                        f"{len(maps)} maps scored; send fewer maps per request"
                    )
                scores[start : start + batch_size] = self._score(maps[start : start + batch_size], batch_size)
            bad = np.flatnonzero(~np.isfinite(scores))
            if len(bad):  # never answer NaN: it is not valid JSON, and no decision can be made on it
                peak = max(float(np.abs(maps[i]).max()) for i in bad)
                raise MlflowException.invalid_parameter_value(
                    f"map(s) {', '.join(map(str, bad[:10].tolist()))}{' ...' if len(bad) > 10 else ''}: the model's score "
                    f"is NaN/Inf (largest absolute value in them {peak:.3g}): values this large overflow the model's "
                    "arithmetic; send raw HDMAP map values"
                )
            threshold = threshold_for(self.trained, domain, override)
            return pd.DataFrame(
                {
                    "score": scores,
                    "is_anomaly": decide(scores, threshold),
                    # None (JSON null), not NaN, when the model stores no usable threshold
                    "threshold": [threshold] * len(scores) if threshold is not None else [None] * len(scores),
                }
            )

        def _score(self, maps: list[np.ndarray], batch_size: int) -> np.ndarray:
            if self.onnx is None:
                from hdmap_ad.core.inference import score_arrays

                return score_arrays(self.trained, maps, self.device, batch_size, description="serve")[0]
            from hdmap_ad.core.errors import HdmapError

            try:
                return self.onnx.score(np.stack(maps), batch_size)[0]
            except HdmapError as err:
                raise MlflowException.invalid_parameter_value(str(err)) from None


class ScoringTimeout(MlflowException):
    """Scoring stopped at the request's deadline (HTTP 504)."""


def request_deadline() -> float | None:
    """time.monotonic() at which the scoring server's request timeout expires, inside
    `mlflow models serve` (which sets both variables); None elsewhere."""
    try:
        from mlflow.environment_variables import (
            _MLFLOW_IS_IN_SERVING_ENVIRONMENT,
            MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT,
        )
    except ImportError:  # a private name of MLflow's: without it, no deadline
        return None
    if not _MLFLOW_IS_IN_SERVING_ENVIRONMENT.get() or not MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.defined:
        return None
    return time.monotonic() + MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()


def signature() -> mlflow.models.ModelSignature:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1), name="maps")]),
        outputs=Schema([ColSpec("double", "score"), ColSpec("boolean", "is_anomaly"), ColSpec("double", "threshold")]),
        params=ParamSchema(
            [
                ParamSpec("domain", "string", None),
                ParamSpec("threshold", "double", None),
                ParamSpec("resize", "boolean", False),
            ]
        ),
    )


def pip_requirements(names: tuple[str, ...] = REQUIREMENTS) -> list[str]:
    """This environment's versions of what the model imports (tests and serving use --env-manager local)."""
    reqs = []
    for name in names:
        try:
            reqs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def find_logged_model(run, name: str = DEFAULT_NAME):
    """The newest logged model called `name` whose source is `run`, or None."""
    client = mlflow.MlflowClient()
    found = [
        m
        for m in client.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string=f"name = '{name}'")
        if m.source_run_id == run.info.run_id
    ]
    return max(found, key=lambda m: m.creation_timestamp) if found else None


def log_pyfunc_model(
    checkpoint_path: Path, artifact_path: str = DEFAULT_NAME, registered_name: str | None = None
) -> str:
    """Log the checkpoint (or an exported `.onnx` model, then served on onnxruntime) as a pyfunc
    model into the ACTIVE MLflow run; return the model URI.

    `artifact_path` is the model's name in the run (`runs:/<run id>/<artifact_path>` resolves to
    it); `registered_name` also registers it as a new version of that registered model.
    """
    import hdmap_ad

    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        from hdmap_ad.core.errors import HdmapError

        raise HdmapError(f"{checkpoint_path}: checkpoint not found, cannot log the pyfunc model")
    if mlflow.active_run() is None:
        raise MlflowException("log_pyfunc_model needs an active MLflow run (call it inside mlflow.start_run())")
    package_dir = Path(hdmap_ad.__file__).resolve().parent
    onnx = checkpoint_path.suffix == ".onnx"
    with warnings.catch_warnings(record=True) as caught:  # MLflow forces its own filters; re-emitted below
        # models from code: the logged model is this package's source plus the checkpoint, and
        # loading it imports code instead of unpickling an object
        info = mlflow.pyfunc.log_model(
            name=artifact_path,
            python_model=str(MODEL_CODE),
            artifacts={(ONNX_ARTIFACT_KEY if onnx else ARTIFACT_KEY): str(checkpoint_path)},
            code_paths=[str(package_dir)],
            signature=signature(),
            pip_requirements=pip_requirements(ONNX_REQUIREMENTS if onnx else REQUIREMENTS),
            registered_model_name=registered_name,
        )
    for w in caught:
        if "input example was not provided" not in str(w.message):  # the signature is explicit; see the docstring
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return info.model_uri


class DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)
