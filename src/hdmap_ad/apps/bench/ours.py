"""Our phases: the training loop's own step and the scoring path, on synthetic maps of the HDMAP shape."""

from __future__ import annotations

import json
import time
from typing import Any

from hdmap_ad.apps.bench.measure import count_flops, summary, sync, timed
from hdmap_ad.apps.bench.spec import HARD_MINING_STEP, PRECISIONS, RAW_DOMAINS


def params_for(spec: dict[str, Any], feature_cache: str = "off"):
    from hdmap_ad.core.checkpoint import params_from_resolved

    case = spec["case"]
    raw = json.loads(json.dumps(spec["resolved"]))
    raw["preprocess"] = {"resize": list(case["resize"]), "crop": list(case["crop"])}
    raw["model"].update(encoder=case["encoder"], weights="random")
    amp = PRECISIONS[case.get("precision", "float32")]
    raw["train"].update(batch_size=case["batch"], compile=bool(spec["compile"]), amp=amp)
    if "amp" in raw["evaluate"]:
        raw["evaluate"]["amp"] = amp
    raw["runtime"].update(
        device=spec["device"], feature_cache=feature_cache, feature_cache_max_gb=1e6, num_threads=spec["threads"]
    )
    raw["evaluate"]["batch_size"] = case["batch"]
    return params_from_resolved(raw)


def synthetic_maps(n: int, spec: dict[str, Any], seed: int = 0):
    """n raw maps of the HDMAP geometry (synth.height × synth.width), float32, HDMAP-like range."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.gamma(8.0, 0.03, size=(n, *spec["raw_size"])).astype(np.float32)


def ours_train_step(model, method, optimizer, features, params, device, n_maps: int, scaler=None):
    """A closure `step(i) -> loss` running train_steps.train_step, the training loop's own step, with
    its lr schedule and batch draw; steps count from HARD_MINING_STEP (hard mining at full ratio)."""
    import numpy as np

    from hdmap_ad.core.optim import warm_cosine_lr
    from hdmap_ad.pipeline.train_steps import batch_indices, build_optimizer, set_lr, train_step

    t = params.train
    domain_ids = np.zeros(n_maps, dtype=np.int64)
    scaler = scaler or build_optimizer(model, method, params, device)[1]

    def step(i: int) -> float:
        gstep = HARD_MINING_STEP + i
        set_lr(optimizer, warm_cosine_lr(gstep, t.lr, t.final_lr, max(t.steps, gstep + 1), t.warmup_steps))
        idx = batch_indices(n_maps, t.batch_size, i, params.seed)
        return train_step(model, method, optimizer, scaler, features, idx, domain_ids[idx], gstep, params, device).loss

    return step


def build_ours(params, device):
    import torch

    from hdmap_ad.core import checkpoint
    from hdmap_ad.core.runtime import seed_everything
    from hdmap_ad.pipeline.train_steps import build_optimizer

    t = params.train
    seed_everything(params.seed)
    model, method = checkpoint.build(params, RAW_DOMAINS, device)
    optimizer, _ = build_optimizer(model, method, params, device)
    if t.compile:
        model.decoder = torch.compile(model.decoder)
    return model, method, optimizer


def phase_ours_train(spec: dict[str, Any], device, cache: str) -> dict[str, Any]:
    from hdmap_ad.core.features import cache_bytes, make_feature_source

    params = params_for(spec, feature_cache=cache)
    b, warmup, steps = params.train.batch_size, spec["warmup"], spec["steps"]
    n_maps = b * (warmup + steps + 1)  # every step (and the FLOP-counted one) draws maps not seen before
    maps = synthetic_maps(n_maps, spec)
    model, method, optimizer = build_ours(params, device)
    model.train()
    method.train()
    sync(device)
    t0 = time.perf_counter()
    features = make_feature_source(model, maps, params, device)
    sync(device)
    cache_build_s = time.perf_counter() - t0 if cache == "on" else 0.0
    step = ours_train_step(model, method, optimizer, features, params, device, n_maps)
    times, first, other = timed(step, warmup, steps, device, spec.get("clock", "wall"))
    flops = count_flops(lambda: step(warmup + steps))
    out = {
        **summary(times, first, other, flops, b, spec.get("clock", "wall")),
        "feature_cache": features.describe(),
        "n_maps": n_maps,
    }
    if cache == "on":
        encode_flops = count_flops(lambda: features_for_flops(model, maps[:b], params, device))
        out.update(
            cache_build_s=cache_build_s,
            cache_mb=cache_bytes(model, n_maps, params, device) / 2**20,
            encoder_flops_per_image=encode_flops / b,
        )
    return out


def features_for_flops(model, maps, params, device):
    import numpy as np
    import torch

    from hdmap_ad.core.features import OnTheFly

    with torch.no_grad():
        return OnTheFly(model, maps, params, device).batch(np.arange(len(maps)))


def phase_ours_infer(spec: dict[str, Any], device) -> dict[str, Any]:
    from hdmap_ad.core.inference import score_maps

    params = params_for(spec)
    b, warmup, steps = params.train.batch_size, spec["warmup"], spec["steps"]
    maps = synthetic_maps(b * (warmup + steps + 1), spec, seed=1)
    model, method, _ = build_ours(params, device)
    model.eval()
    method.eval()

    def run(i: int):
        return score_maps(model, method, maps[i * b : (i + 1) * b], params, device, b).scores

    times, first, other = timed(run, warmup, steps, device, spec.get("clock", "wall"))
    return summary(times, first, other, count_flops(lambda: run(warmup + steps)), b, spec.get("clock", "wall"))
