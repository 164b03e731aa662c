"""A trained model as one ONNX graph: raw maps in, anomaly maps and image scores out.

`MapScorer` wraps the PyTorch path itself: `preprocess` (resize, crop, channel repeat,
normalisation), the model (frozen encoder up to its last target block, bottleneck, decoder) and
`inference.score_images` (group maps, the method's reduction, resize to the score size, blur, top-k
mean). There is no second implementation to drift: the ONNX graph is this module traced.

    graph input   maps          float32 N×H×W   (H×W of the training maps; any N)
    graph outputs anomaly_map   float32 N×S×S   (score size, before the blur: `Scored.maps`)
                  score         float32 N

The model's `metadata_props` carry what a scorer needs beside the graph (`METADATA_KEYS`), every
value a JSON text: thresholds, domains, the input shape, preprocessing, score settings, method,
and where the model came from (checkpoint sha256, training run, code commit). `onnx_scorer.py`
reads them back without PyTorch.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hdmap_ad.core import signing
from hdmap_ad.core.checkpoint import TrainedModel
from hdmap_ad.core.config import ScoreParams
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.inference import score_images
from hdmap_ad.core.methods import Method
from hdmap_ad.core.model import Dinomaly
from hdmap_ad.core.onnx_scorer import (
    FORMAT,
    HASH_KEY,
    HASH_PLACEHOLDER,
    INPUT_NAME,
    METADATA_PREFIX,
    OUTPUT_NAMES,
    SIGNATURE_KEY,
    SIGNATURE_PLACEHOLDER,
    fill_hash_and_signature,
)
from hdmap_ad.core.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess

# opset 18 is the first whose Resize has `antialias`, which the preprocessing resize uses
OPSET = 18


class MapScorer(nn.Module):
    """Raw maps N×H×W float32 -> (anomaly maps N×S×S, scores N), through the PyTorch scoring path."""

    def __init__(
        self, model: Dinomaly, method: Method, resize: tuple[int, int], crop: tuple[int, int], score: ScoreParams
    ) -> None:
        super().__init__()
        self.model, self.method = model.eval(), method.eval()
        self.resize, self.crop, self.score = tuple(resize), tuple(crop), score

    def forward(self, maps: Tensor) -> tuple[Tensor, Tensor]:
        images = preprocess(maps, self.resize, self.crop)
        scores, small, _ = score_images(self.model, self.method, images, self.score)
        return small[:, 0], scores


def map_scorer(trained: TrainedModel) -> MapScorer:
    p = trained.params.preprocess
    return MapScorer(trained.model, trained.method, tuple(p.resize), tuple(p.crop), trained.params.score).eval()


def metadata(
    trained: TrainedModel, map_shape: tuple[int, int], run_id: str | None, commit: str | None
) -> dict[str, str]:
    """The model's metadata_props: each value a JSON text, keys prefixed `hdmap_ad.`."""
    import hdmap_ad

    p = trained.params
    s = p.score
    values: dict[str, Any] = {
        "format": FORMAT,
        "version": hdmap_ad.__version__,
        "input_shape": list(map_shape),
        "domains": list(trained.domains),
        "thresholds": {k: (float(v) if v is not None else None) for k, v in trained.thresholds.items()},
        "method": p.method,
        "preprocess": {
            "resize": list(p.preprocess.resize),
            "crop": list(p.preprocess.crop),
            "interpolation": "bilinear antialiased",
            "channels": 3,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "score": {
            "size": list(s.size),
            "blur_kernel": s.blur_kernel,
            "blur_sigma": s.blur_sigma,
            "top_ratio": s.top_ratio,
        },
        "encoder": {"name": p.model.encoder, "weights": p.model.weights},
        "batch_size": p.evaluate.batch_size,
        "model_sha256": trained.info.get("sha256"),
        "training_step": trained.info.get("step"),
        "run_id": run_id,  # the MLflow run that trained the model, when known
        "git_commit": commit,  # the code that exported it (the graph is this code traced)
        "opset": OPSET,
        "torch": torch.__version__,
        "precision": "float32",
    }
    # NaN thresholds are stored as null (JSON has no NaN); the scorer then falls back to pooled
    return {METADATA_PREFIX + k: json.dumps(v, allow_nan=False, default=str) for k, v in _finite(values).items()}


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def export_onnx(
    trained: TrainedModel,
    out: Path,
    map_shape: tuple[int, int],
    run_id: str | None = None,
    commit: str | None = None,
    example_batch: int = 2,
) -> Path:
    """Export `trained` (on the CPU, float32) as an ONNX model at `out`, written atomically.

    `map_shape` is the H×W of the maps the graph accepts (the training maps'). The batch axis is
    dynamic; the example batch is 2 so that the exporter cannot specialise it to 1.
    """
    import onnx
    from torch.export import Dim

    scorer = map_scorer(trained).to("cpu").float()
    h, w = (int(v) for v in map_shape)
    example = torch.rand(example_batch, h, w, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations of its own internals)
        try:
            program = torch.onnx.export(
                scorer,
                (example,),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: Dim("batch", min=1)},),
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
                optimize=True,
            )
        except Exception as err:  # the exporter raises many types; the first line says which op failed
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise HdmapError(f"ONNX export of the model failed ({type(err).__name__}: {first})") from None
    proto = program.model_proto
    props = metadata(trained, (h, w), run_id, commit)
    # filled in below, over the serialized file: the hash covers graph, initializers and every other entry
    props[METADATA_PREFIX + HASH_KEY] = json.dumps(HASH_PLACEHOLDER)
    if signing.signing_key() is not None:
        props[METADATA_PREFIX + SIGNATURE_KEY] = json.dumps(SIGNATURE_PLACEHOLDER)
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = "hdmap-ad Dinomaly scorer: raw HDMAP maps N×H×W -> anomaly_map N×S×S, score N"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(fill_hash_and_signature(proto.SerializeToString(), signing.sign))
        onnx.checker.check_model(str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
