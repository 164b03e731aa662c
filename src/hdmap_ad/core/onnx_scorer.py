"""Score maps with an exported ONNX model (`hdmap-ad export`) on onnxruntime, without PyTorch.

Imports only numpy, onnxruntime and this package's torch-free modules, so a deployment needs
neither torch nor timm nor the encoder weights. The file records a SHA-256 of itself (graph,
initializers and metadata, with the hash's own place blanked) and, with a shared signing key set,
an HMAC of that hash (core/signing.py): a file that no longer matches is refused. Input checks happen here, before onnxruntime sees
the data: a wrong rank, H×W or dtype, or NaN/Inf, is one `HdmapError` line instead of a runtime
stack trace.

    scorer = OnnxScorer(Path("model.onnx"))
    scores, maps = scorer.score(maps_n_h_w_float32, keep_maps=True)
    threshold = decision.threshold_for(scorer, "domain_A")
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hdmap_ad.core.errors import HdmapError

INPUT_NAME = "maps"
OUTPUT_NAMES = ("anomaly_map", "score")
METADATA_PREFIX = "hdmap_ad."
FORMAT = 2  # 2: the file records its content hash (and, with a signing key, its signature)
# The file's own hash and signature live in its metadata; they are computed over the serialized file
# with these placeholders in their place (same length, so nothing else moves).
HASH_KEY, SIGNATURE_KEY = "content_sha256", "signature"
HASH_PLACEHOLDER, SIGNATURE_PLACEHOLDER = "0" * 64, "1" * 64


def _quoted(value: str) -> bytes:
    return json.dumps(value).encode()


def content_hash(data: bytes, recorded_hash: str, recorded_signature: str | None) -> str | None:
    """SHA-256 of the serialized model `data` with its recorded hash (and signature) put back to their
    placeholders; None when a recorded value is not found exactly once in the file."""
    swaps = [(_quoted(recorded_hash), _quoted(HASH_PLACEHOLDER))]
    if recorded_signature is not None:
        swaps.append((_quoted(recorded_signature), _quoted(SIGNATURE_PLACEHOLDER)))
    spans = []
    for needle, placeholder in swaps:
        at = data.find(needle)
        if at < 0 or data.find(needle, at + 1) >= 0:
            return None
        spans.append((at, needle, placeholder))
    h, pos, view = hashlib.sha256(), 0, memoryview(data)
    for at, needle, placeholder in sorted(spans):
        h.update(view[pos:at])
        h.update(placeholder)
        pos = at + len(needle)
    h.update(view[pos:])
    return h.hexdigest()


def fill_hash_and_signature(data: bytes, signature: Callable[[str], str | None]) -> bytes:
    """The serialized model `data` (holding the placeholders) with its content hash and, when
    `signature(hash)` gives one, its signature filled in."""
    digest = content_hash(
        data, HASH_PLACEHOLDER, SIGNATURE_PLACEHOLDER if _quoted(SIGNATURE_PLACEHOLDER) in data else None
    )
    if digest is None:
        raise HdmapError("ONNX export: the hash placeholder is not found exactly once in the serialized model")
    out = data.replace(_quoted(HASH_PLACEHOLDER), _quoted(digest))
    if _quoted(SIGNATURE_PLACEHOLDER) in data:
        signed = signature(digest)
        if signed is None:
            raise HdmapError("ONNX export: a signature placeholder but no signing key")
        out = out.replace(_quoted(SIGNATURE_PLACEHOLDER), _quoted(signed))
    return out


class OnnxScorer:
    """An exported model on onnxruntime's CPU provider, with what its metadata says about it.

    Attributes: `domains`, `thresholds` (domain or "pooled" -> float; what `decision.threshold_for`
    reads), `input_shape` (H, W), `crop` (the model input size), `batch_size` (the model's
    evaluate.batch_size), `info` (every metadata entry, decoded).
    """

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise HdmapError(f"{self.path}: ONNX model not found")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # onnxruntime's warnings go to stderr unasked; errors are ours to report
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        data = self.path.read_bytes()  # hashed and run from the same bytes
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for a damaged or foreign file
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise HdmapError(f"{self.path}: not a readable ONNX model ({first})") from None
        raw = self.session.get_modelmeta().custom_metadata_map
        info: dict[str, Any] = {}
        for key, text in raw.items():
            if key.startswith(METADATA_PREFIX):
                try:
                    info[key[len(METADATA_PREFIX) :]] = json.loads(text)
                except ValueError:
                    raise HdmapError(f"{self.path}: damaged metadata entry {key!r} (not JSON)") from None
        if info.get("format") != FORMAT:
            what = (
                "no hdmap-ad metadata (not exported by `hdmap-ad export`)"
                if not info
                else f"metadata format {info.get('format')!r}, this hdmap-ad reads format {FORMAT}"
            )
            raise HdmapError(f"{self.path}: {what}" + (" (re-export it with `hdmap-ad export`)" if info else ""))
        recorded, signature = info.get(HASH_KEY), info.get(SIGNATURE_KEY)
        if not isinstance(recorded, str) or content_hash(data, recorded, signature) != recorded:
            raise HdmapError(
                f"{self.path}: ONNX model content does not match its recorded hash (damaged or altered graph, "
                "weights or metadata); export it again from the checkpoint"
            )
        del data
        from hdmap_ad.core import signing

        signing.check(recorded, signature, str(self.path))  # only with a shared key set
        names = [i.name for i in self.session.get_inputs()]
        if names != [INPUT_NAME] or [o.name for o in self.session.get_outputs()] != list(OUTPUT_NAMES):
            raise HdmapError(f"{self.path}: graph inputs {names} / outputs are not those of an hdmap-ad export")
        try:
            self.input_shape = (int(info["input_shape"][0]), int(info["input_shape"][1]))
            self.domains = [str(d) for d in info["domains"]]
            self.thresholds = {str(k): float(v) for k, v in dict(info["thresholds"]).items() if v is not None}
            self.crop = (int(info["preprocess"]["crop"][0]), int(info["preprocess"]["crop"][1]))
            self.batch_size = int(info.get("batch_size") or 32)
        except (KeyError, TypeError, ValueError, IndexError):
            raise HdmapError(f"{self.path}: incomplete hdmap-ad metadata") from None
        self.info = info

    def check(self, maps: Any) -> np.ndarray:
        """`maps` as a float32 N×H×W array, or an HdmapError naming what is wrong with it."""
        if not isinstance(maps, np.ndarray):
            raise HdmapError(
                f"ONNX model {self.path.name}: expected a numpy array of maps, got a {type(maps).__name__}"
            )
        if maps.dtype != np.float32:
            raise HdmapError(
                f"ONNX model {self.path.name}: maps must be float32, got {maps.dtype} "
                "(cast with .astype(numpy.float32))"
            )
        if maps.ndim == 2:
            maps = maps[None]
        h, w = self.input_shape
        if maps.ndim != 3:
            raise HdmapError(
                f"ONNX model {self.path.name}: expected maps of shape (N, {h}, {w}) or one ({h}, {w}) map, "
                f"got an array of shape {tuple(maps.shape)}"
            )
        if tuple(maps.shape[1:]) != (h, w):
            raise HdmapError(
                f"ONNX model {self.path.name}: maps are {maps.shape[1]}x{maps.shape[2]}, the model takes "
                f"{h}x{w} (the training maps' size; the torch backend resizes other sizes)"
            )
        finite = np.isfinite(maps).all(axis=(1, 2))  # (reshape(N, -1) fails for N = 0)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            listed = ", ".join(map(str, bad[:10].tolist())) + (" ..." if len(bad) > 10 else "")
            raise HdmapError(f"ONNX model {self.path.name}: map(s) {listed} contain NaN or Inf values")
        return np.ascontiguousarray(maps)

    def run(self, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One batch through the graph (checked first): anomaly maps N×S×S float32, scores N float32."""
        maps = self.check(maps)
        try:
            amaps, scores = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: maps})
        except Exception as err:  # a runtime failure inside onnxruntime: one line, the rest is its internals
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise HdmapError(
                f"ONNX model {self.path.name}: onnxruntime failed on a batch of {len(maps)} ({first})"
            ) from None
        return amaps, scores

    def score(
        self, maps: Any, batch_size: int | None = None, keep_maps: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores (float64, N) and, with `keep_maps`, anomaly maps (float32, N×S×S) of N×H×W maps."""
        maps = self.check(maps)
        size = int(batch_size or self.batch_size)
        if size <= 0:
            raise HdmapError(f"batch size {size}: must be positive")
        if len(maps) == 0:  # nothing to score: empty results, not an onnxruntime error on an empty batch
            side = tuple(int(v) for v in (self.info.get("score") or {}).get("size") or (0, 0))
            return np.zeros(0), (np.zeros((0, *side), dtype=np.float32) if keep_maps else None)
        scores, kept = [], []
        for start in range(0, len(maps), size):
            amaps, s = self.run(maps[start : start + size])
            scores.append(s.astype(np.float64))
            if keep_maps:
                kept.append(amaps)
        all_scores = np.concatenate(scores) if scores else np.zeros(0)
        return all_scores, (np.concatenate(kept) if kept else None) if keep_maps else None
