"""Build the model + method from params, and save / load checkpoints atomically.

A checkpoint holds the trainable state only (bottleneck, decoder, method extras): the frozen
encoder is rebuilt from its source (`model.weights`). Random encoder weights are drawn from a
fixed seed, so every run and every process (train, evaluate, predict) sees the same encoder and
seeds vary only what is trained.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hdmap_ad import methods
from hdmap_ad.config import Params, parse_params
from hdmap_ad.errors import HdmapError
from hdmap_ad.model import Dinomaly, DinomalyConfig, ScoreConfig

RANDOM_ENCODER_SEED = 0
FORMAT_VERSION = 1


def dinomaly_config(params: Params) -> DinomalyConfig:
    m = params.model
    return DinomalyConfig(
        encoder=m.encoder, weights=m.weights, image_size=tuple(params.preprocess.crop),
        target_blocks=m.target_blocks, fuse_groups=[list(g) for g in m.fuse_groups],
        decoder_depth=m.decoder_depth, mlp_ratio=m.mlp_ratio, bottleneck_dropout=m.bottleneck_dropout,
        ln_eps=m.ln_eps, init_std=m.init_std, init_cutoff=m.init_cutoff, encoder_overrides=dict(m.encoder_overrides),
    )


def score_config(params: Params) -> ScoreConfig:
    s = params.score
    return ScoreConfig(size=tuple(s.size), blur_kernel=s.blur_kernel, blur_sigma=s.blur_sigma, top_ratio=s.top_ratio)


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
        embed_dim=model.encoder.embed_dim, num_groups=len(params.model.fuse_groups), domains=tuple(domains),
        total_steps=params.train.steps, hard_mining_factor=params.train.hard_mining.factor,
        hard_mining_max_ratio=params.train.hard_mining.max_ratio, hard_mining_ramp_steps=params.train.hard_mining.ramp_steps,
    )
    method = methods.build(params.method, params.method_params, ctx)
    return model.to(device), method.to(device)


def trainable_state(model: Dinomaly) -> dict[str, torch.Tensor]:
    """Model state without the frozen encoder (it is rebuilt from its weights source); keys as in an
    uncompiled model (torch.compile inserts `_orig_mod.`)."""
    return {k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items() if not k.startswith("encoder.")}


def save(payload: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary name in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"format": FORMAT_VERSION, **payload}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise HdmapError(f"{path}: checkpoint not found (run `dvc repro train` first)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise HdmapError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise HdmapError(f"{path}: not an hdmap-ad checkpoint (format {payload.get('format') if isinstance(payload, dict) else '?'})")
    return payload


def params_from_resolved(resolved: dict[str, Any]) -> Params:
    """Rebuild Params from the resolved config a checkpoint or MLflow run recorded."""
    raw = dict(resolved)
    raw["profiles"] = {raw.get("profile", "quick"): {}}
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
    payload = load(path)
    params = params_from_resolved(payload["config"])
    model, method = build(params, payload["domains"], device)
    missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    missing = [k for k in missing if not k.startswith("encoder.")]
    if missing or unexpected:
        raise HdmapError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    method.load_state_dict(payload["method"])
    model.eval()
    method.eval()
    return TrainedModel(model, method, params, list(payload["domains"]), dict(payload.get("thresholds", {})),
                        {k: payload.get(k) for k in ("step", "run_id", "fingerprint", "map_shape")})
