"""Build the model + method from params, and save / load checkpoints atomically.

A checkpoint holds the trainable state only (bottleneck, decoder, method extras): the frozen
encoder is rebuilt from its source (`model.weights`). Random encoder weights are drawn from a
fixed seed, so every run and every process (train, evaluate, predict) sees the same encoder and
seeds vary only what is trained.

File format (version 2): one safetensors file. Its tensors are every tensor of the payload, named
by their path in it (`model/decoder.0.attn.qkv.weight`, `optimizer/state/3/exp_avg`, `rng/torch`;
`/` separates levels, `~1` and `~0` stand for `/` and `~` inside a key). Its `__metadata__` has one
entry, `hdmap_ad`, a JSON object: `format_version`, `payload` (the rest of the payload as plain
JSON, each tensor replaced by `{"__tensor__": "<name>"}`; tuples, dicts with non-string keys and
NaN/Inf floats are tagged the same way) and `sha256`, a hash of the payload JSON and of every
tensor's name, dtype, shape and bytes, taken at save time and checked at load time; with a shared
signing key set (core/signing.py), also `signature`, an HMAC of that hash, checked at load time. Reading one
needs only safetensors and json: nothing is unpickled, so a crafted file cannot run code. Saving
is deterministic (sorted keys, no timestamps): the same payload gives byte-identical files.

Format 1 files (torch.save pickles) are refused with a hint: `hdmap-ad checkpoint migrate OLD NEW`
converts one through torch's restricted `weights_only` unpickler.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hdmap_ad.core import methods, signing
from hdmap_ad.core.config import Params, move_legacy_runtime_keys, parse_params
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.model import Dinomaly, DinomalyConfig
from hdmap_ad.core.paths import LEGACY_SUFFIX

RANDOM_ENCODER_SEED = 0
FORMAT_VERSION = 2
METADATA_KEY = "hdmap_ad"
MODEL_KEYS = ("config", "domains", "model", "method")  # what scoring a model needs
STATE_KEYS = ("model", "method", "optimizer", "rng", "step", "fingerprint")  # what resuming needs
_TENSOR, _TUPLE, _DICT, _FLOAT = "__tensor__", "__tuple__", "__dict__", "__float__"
_TAGS = (_TENSOR, _TUPLE, _DICT, _FLOAT)


def dinomaly_config(params: Params) -> DinomalyConfig:
    return DinomalyConfig.from_params(params.model, params.preprocess.crop)


def build(params: Params, domains: list[str], device: torch.device) -> tuple[Dinomaly, methods.Method]:
    """Model and method for `params`; trainable weights initialised from the current RNG state."""
    trainable_rng = torch.get_rng_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_ENCODER_SEED)
        model = Dinomaly(dinomaly_config(params))
    # The encoder came from the fixed seed; the trainable part must come from the run's seed.
    torch.set_rng_state(trainable_rng)
    model.init_trainable()
    ctx = methods.MethodContext(
        embed_dim=model.encoder.embed_dim,
        num_groups=len(params.model.fuse_groups),
        domains=tuple(domains),
        total_steps=params.train.steps,
        hard_mining_factor=params.train.hard_mining.factor,
        hard_mining_max_ratio=params.train.hard_mining.max_ratio,
        hard_mining_ramp_steps=params.train.hard_mining.ramp_steps,
    )
    method = methods.build_method(params.method, params.method_sections, ctx)
    method.attach(model)  # training-only hooks (hseg, vdrop): identity in eval mode
    return model.to(device), method.to(device)


def trainable_state(model: Dinomaly) -> dict[str, torch.Tensor]:
    """Model state without the frozen encoder (it is rebuilt from its weights source); keys as in an
    uncompiled model (torch.compile inserts `_orig_mod.`)."""
    return {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items() if not k.startswith("encoder.")}


# --------------------------------------------------------------------------------------------------
# the file format: payload <-> (JSON tree, named tensors)


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


class _Encoder:
    """Splits a payload into a JSON tree and the tensors it refers to by name."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[int] = set()

    def tensor(self, value: torch.Tensor, path: tuple[str, ...]) -> dict[str, str]:
        name = "/".join(_escape(p) for p in path) or "_"
        if name in self.tensors:  # e.g. keys 1 and "1" in one dict
            raise ValueError(f"checkpoint payload: two tensors map to the name {name!r}")
        t = value.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        complete = t.data_ptr() == ptr and t.nelement() * t.element_size() == t.untyped_storage().nbytes()
        # safetensors refuses views and tensors sharing memory: those are stored as copies
        if not t.is_contiguous() or not complete or (ptr and ptr in self._storages):
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr()
        if ptr:
            self._storages.add(ptr)
        self.tensors[name] = t
        return {_TENSOR: name}

    def encode(self, value: Any, path: tuple[str, ...] = ()) -> Any:
        if isinstance(value, torch.Tensor):
            return self.tensor(value, path)
        if isinstance(value, np.generic):  # numpy scalars: plain numbers
            value = value.item()
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {_FLOAT: repr(value)}
        if isinstance(value, tuple):
            return {_TUPLE: [self.encode(v, (*path, str(i))) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, (*path, str(i))) for i, v in enumerate(value)]
        if isinstance(value, dict):
            plain = all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in _TAGS)
            if plain:
                return {k: self.encode(v, (*path, k)) for k, v in value.items()}
            return {
                _DICT: [[self.encode(k, (*path, "key")), self.encode(v, (*path, str(k)))] for k, v in value.items()]
            }
        raise TypeError(f"checkpoint payload at {'/'.join(path) or '<root>'}: cannot store a {type(value).__name__}")


def _decode(node: Any, tensors: dict[str, torch.Tensor], used: set[str]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors, used) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        tag, inner = next(iter(node.items()))
        if tag == _TENSOR and isinstance(inner, str) and inner in tensors:
            used.add(inner)
            return tensors[inner]
        if tag == _TUPLE and isinstance(inner, list):
            return tuple(_decode(v, tensors, used) for v in inner)
        if tag == _FLOAT and inner in ("nan", "inf", "-inf"):
            return float(inner)
        if tag == _DICT and isinstance(inner, list) and all(isinstance(p, list) and len(p) == 2 for p in inner):
            return {_decode(k, tensors, used): _decode(v, tensors, used) for k, v in inner}
        if tag in _TAGS:
            raise ValueError(f"malformed {tag} entry")
    return {k: _decode(v, tensors, used) for k, v in node.items()}


def _canonical(tree: Any) -> str:
    return json.dumps(tree, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)


def content_hash(tree: Any, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the payload JSON and of every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(f"hdmap-ad checkpoint {FORMAT_VERSION}\n".encode())
    h.update(_canonical(tree).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\n{json.dumps([name, str(t.dtype), list(t.shape)])}\n".encode())
        h.update(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def save(payload: dict[str, Any], path: Path) -> str:
    """Write `payload` as a format-2 checkpoint (to a temporary name, then rename: never a
    half-written file); return its content hash."""
    from safetensors.torch import save_file

    encoder = _Encoder()
    tree = encoder.encode(dict(payload))
    digest = content_hash(tree, encoder.tensors)
    header = {"format_version": FORMAT_VERSION, "payload": tree, "sha256": digest}
    signature = signing.sign(digest)  # with a shared key set (core/signing.py); else unsigned
    if signature is not None:
        header["signature"] = signature
    meta = _canonical(header)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    from safetensors import SafetensorError

    try:
        save_file(encoder.tensors, str(tmp), metadata={METADATA_KEY: meta})  # one entry: its order is fixed
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:  # a full disk, a read-only folder: the old file stays as it was
        what = os.strerror(err.errno) if isinstance(err, OSError) and err.errno else _first_line(err)
        kept = f"{path} is unchanged" if path.exists() else f"{path} was not written"
        raise HdmapError(f"{path}: cannot write the checkpoint ({what}); {kept}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _is_pickle(head: bytes) -> bool:
    """torch.save output: a zip archive (torch >= 1.6) or a bare pickle stream (protocol 2+)."""
    return head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[8:9] != b"{")


def read(path: Path, required: tuple[str, ...] = (), check_signature: bool = True) -> tuple[dict[str, Any], str]:
    """The payload of the checkpoint at `path` and its verified content hash.

    Every problem is one HdmapError line naming the file: missing, an old pickle file (never
    unpickled), unreadable, not ours, a newer format, content that fails its hash, or lacking one
    of the `required` top-level keys.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        legacy = path.with_suffix(LEGACY_SUFFIX)
        if path.suffix == ".safetensors" and legacy.is_file():  # a workspace from before the rename
            raise HdmapError(
                f"{path}: checkpoint not found; {legacy} is its old name (same format): "
                f"`dvc checkout` restores it under the new name, or rename it (mv {legacy} {path})"
            )
        raise HdmapError(f"{path}: checkpoint not found (run `dvc repro train` first)")
    with open(path, "rb") as f:
        head = f.read(16)
    if _is_pickle(head):
        raise HdmapError(
            f"{path}: an old pickle-based checkpoint (format 1); it is not loaded because unpickling can run code. "
            f"If you trust its origin, convert it: hdmap-ad checkpoint migrate {path} NEW.safetensors"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {name: f.get_tensor(name) for name in f.keys()} if meta is not None else {}
    except Exception as err:  # safetensors raises its own error type, OSError, ... for a damaged file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise HdmapError(f"{path}: not a readable checkpoint (truncated or not a safetensors file: {first})") from None
    if meta is None:
        raise HdmapError(f"{path}: a safetensors file without hdmap-ad metadata (not an hdmap-ad checkpoint)")
    try:
        header = json.loads(meta)
        version, tree, recorded = header.get("format_version"), header.get("payload"), header.get("sha256")
        signature = header.get("signature")
    except (ValueError, AttributeError, RecursionError):
        raise HdmapError(f"{path}: damaged checkpoint metadata (not valid JSON)") from None
    if version != FORMAT_VERSION:
        raise HdmapError(
            f"{path}: checkpoint format {version!r}, this hdmap-ad reads format {FORMAT_VERSION} "
            "(written by another version?)"
        )
    try:
        actual = content_hash(tree, tensors)
    except (ValueError, RecursionError):  # e.g. NaN literals, which saving never writes
        actual = None
    if not isinstance(recorded, str) or actual != recorded:
        raise HdmapError(
            f"{path}: checkpoint content does not match its recorded hash (damaged or altered file); "
            "restore it (`dvc pull` / `dvc checkout`) or retrain it"
        )
    if check_signature:
        signing.check(recorded, signature, str(path))  # only with a shared key set
    used: set[str] = set()
    try:
        payload = _decode(tree, tensors, used)
    except (ValueError, TypeError, RecursionError) as err:
        raise HdmapError(f"{path}: malformed checkpoint payload ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or set(tensors) - used:
        raise HdmapError(f"{path}: malformed checkpoint payload (not a mapping, or tensors it does not refer to)")
    missing = [k for k in required if k not in payload]
    if missing:
        raise HdmapError(f"{path}: checkpoint lacks {', '.join(missing)} (incomplete, or not this kind of checkpoint)")
    return payload, recorded


def sign_file(path: Path) -> str:
    """Sign the checkpoint at `path` with the configured key (its content hash is checked first; the
    payload, and so the hash, stay the same); return the hash."""
    if signing.signing_key() is None:
        raise HdmapError(f"{path}: no signing key set ({signing.KEY_ENV} or {signing.KEY_FILE_ENV})")
    payload, digest = read(path, check_signature=False)
    save(payload, path)
    return digest


def load(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The payload of a format-2 checkpoint (see `read`)."""
    return read(path, required)[0]


def migrate(old: Path, new: Path) -> str:
    """Convert a format-1 (torch.save) checkpoint to format 2; return the new file's content hash.

    The old file is read with torch's `weights_only` unpickler, which builds only tensors, plain
    containers and numbers and refuses any other object; numpy arrays (the numpy RNG state of a
    training state) are allowed too, as plain arrays.
    """
    old, new = Path(old), Path(new)
    if not old.is_file():
        raise HdmapError(f"{old}: not found")
    with open(old, "rb") as f:
        if not _is_pickle(f.read(16)):
            raise HdmapError(f"{old}: not a format-1 (torch.save) checkpoint; nothing to migrate")
    if new.resolve() == old.resolve():
        raise HdmapError(f"{new}: give a new file name (the old file is kept as it is)")
    reconstruct = np._core.multiarray._reconstruct
    numpy_arrays = [
        reconstruct,
        (reconstruct, "numpy.core.multiarray._reconstruct"),  # numpy 2 and 1 names
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]
    try:
        with torch.serialization.safe_globals(numpy_arrays):
            payload = torch.load(old, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError names the refused global; damaged files raise others
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise HdmapError(f"{old}: cannot be read safely ({type(err).__name__}: {first})") from None
    if not isinstance(payload, dict) or payload.get("format") != 1:
        raise HdmapError(f"{old}: not an hdmap-ad format-1 checkpoint")
    payload = {k: v for k, v in payload.items() if k != "format"}

    def plain(value: Any) -> Any:  # numpy arrays -> tensors (set_rng_state accepts both)
        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(plain(v) for v in value)
        return value

    try:
        return save(plain(payload), new)
    except OSError as err:
        raise HdmapError(f"{new}: cannot write it ({err.strerror or err})") from None


def params_from_resolved(resolved: dict[str, Any]) -> Params:
    """Rebuild Params from the resolved config a checkpoint or MLflow run recorded."""
    raw = move_legacy_runtime_keys(dict(resolved))  # recorded before the `runtime` section existed
    if isinstance(raw.get("model"), dict) and "pos_embed" not in raw["model"]:
        # Recorded before model.pos_embed existed: the encoder then always resampled as timm does.
        raw["model"] = {**raw["model"], "pos_embed": "timm"}
    raw["profiles"] = {raw.get("profile", "quick"): {}}
    if isinstance(raw.get("data"), dict) and "source" in raw["data"]:
        # Checkpoints written before `data.source` was folded into `data.root` (the folder prepare reads)
        data = dict(raw["data"])
        if data.pop("source") == "synthetic":
            data["root"] = (raw.get("synth") or {}).get("out", "data/raw/synthetic")
        raw["data"] = data
    return parse_params(raw, source="checkpoint config")


@dataclass
class TrainedModel:
    """A trained model ready to score maps, with everything needed to preprocess and decide."""

    model: Dinomaly
    method: methods.Method
    params: Params
    domains: list[str]
    thresholds: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def load_trained(path: Path, device: torch.device) -> TrainedModel:
    """The model of the checkpoint at `path`; `info` carries its step, fingerprint, map_shape and
    `sha256` (content hash), and `run_id` only for files migrated from format 1."""
    payload, digest = read(path, MODEL_KEYS)
    if not isinstance(payload["config"], dict) or not isinstance(payload["domains"], list):
        raise HdmapError(f"{path}: checkpoint config/domains are malformed")
    try:
        params = params_from_resolved(payload["config"])
    except HdmapError as err:
        raise HdmapError(f"{path}: {err}") from None
    try:
        model, method = build(params, [str(d) for d in payload["domains"]], device)
        missing, unexpected = model.load_state_dict(payload["model"], strict=False)
        missing = [k for k in missing if not k.startswith("encoder.")]
        if missing or unexpected:
            raise HdmapError(
                f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        method.load_state_dict(payload["method"])
        thresholds = {str(k): v for k, v in dict(payload.get("thresholds") or {}).items()}
    except (
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        RuntimeError,
    ) as err:  # a well-formed file of the wrong shapes
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise HdmapError(f"{path}: checkpoint does not match the model ({type(err).__name__}: {first})") from None
    model.eval()
    method.eval()
    info = {k: payload.get(k) for k in ("step", "run_id", "fingerprint", "map_shape", "precision")}
    info["sha256"] = digest
    return TrainedModel(model, method, params, list(payload["domains"]), thresholds, info)
