"""anomalib's Dinomaly phases, measured the way our phases are (the `bench` extra installs anomalib)."""

from __future__ import annotations

from typing import Any

from hdmap_ad.apps.bench.measure import autocast_for, count_flops, summary, timed
from hdmap_ad.apps.bench.ours import synthetic_maps
from hdmap_ad.apps.bench.spec import ANOMALIB_ENCODERS, HARD_MINING_STEP


def anomalib_model(case: dict[str, Any]):
    """anomalib's DinomalyModel with random encoder weights, trainable part initialised as its
    Lightning module does. Its feature extractor asks timm for pretrained weights: only here, and
    only in this subprocess, that call is redirected to pretrained=False."""
    import anomalib.models.components.feature_extractors.timm as fe
    import timm
    import torch
    from anomalib.models.image.dinomaly.lightning_model import Dinomaly
    from anomalib.models.image.dinomaly.torch_model import DinomalyModel

    class _OfflineTimm:
        def __getattr__(self, name: str):
            return getattr(timm, name)

        @staticmethod
        def create_model(*args, **kwargs):
            kwargs["pretrained"] = False
            return timm.create_model(*args, **kwargs)

    fe.timm = _OfflineTimm()
    torch.manual_seed(0)
    model = DinomalyModel(encoder_name=ANOMALIB_ENCODERS.get(case["encoder"], case["encoder"])).float()
    for p in model.parameters():
        p.requires_grad = False
    trainable = torch.nn.ModuleList([model.bottleneck, model.decoder])
    for p in trainable.parameters():
        p.requires_grad = True
    Dinomaly._initialize_trainable_modules(trainable)
    return model, trainable


def anomalib_preprocess(case: dict[str, Any], device):
    """anomalib's Dinomaly pre-processor (Resize, CenterCrop, ImageNet Normalize) for our sizes,
    applied to a batch of grayscale maps repeated to 3 channels."""
    import torch
    from torchvision.transforms.v2 import CenterCrop, Compose, Normalize, Resize

    transform = Compose(
        [
            Resize(tuple(case["resize"])),
            CenterCrop(tuple(case["crop"])),
            Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )

    def run(maps) -> torch.Tensor:
        x = torch.from_numpy(maps).to(device).unsqueeze(1).expand(-1, 3, -1, -1)
        return transform(x)

    return run


def phase_anomalib_train(spec: dict[str, Any], device) -> dict[str, Any]:
    import torch
    from anomalib.models.image.dinomaly.components import StableAdamW, WarmCosineScheduler
    from anomalib.models.image.dinomaly.lightning_model import TRAINING_CONFIG

    case = spec["case"]
    b, warmup, steps = case["batch"], spec["warmup"], spec["steps"]
    maps = synthetic_maps(b * (warmup + steps + 1), spec)
    model, trainable = anomalib_model(case)
    model = model.to(device).train()
    optimizer = StableAdamW([{"params": trainable.parameters()}], **TRAINING_CONFIG["optimizer"])
    scheduler = WarmCosineScheduler(optimizer, **{**TRAINING_CONFIG["scheduler"], "total_iters": 3000})
    clip = TRAINING_CONFIG["trainer"]["gradient_clip_val"]
    preprocess = anomalib_preprocess(case, device)
    trainable_params = [p for g in optimizer.param_groups for p in g["params"]]

    def step(i: int) -> float:  # Lightning's automatic optimisation, without the trainer around it
        images = preprocess(maps[i * b : (i + 1) * b])
        optimizer.zero_grad()
        with autocast_for(device, case.get("precision", "float32")):
            loss = model(images, global_step=HARD_MINING_STEP + i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable_params, clip)
        optimizer.step()
        scheduler.step()
        return float(loss)

    times, first, other = timed(step, warmup, steps, device, spec.get("clock", "wall"))
    return summary(times, first, other, count_flops(lambda: step(warmup + steps)), b, spec.get("clock", "wall"))


def phase_anomalib_infer(spec: dict[str, Any], device) -> dict[str, Any]:
    import torch

    case = spec["case"]
    b, warmup, steps = case["batch"], spec["warmup"], spec["steps"]
    maps = synthetic_maps(b * (warmup + steps + 1), spec, seed=1)
    model, _ = anomalib_model(case)
    model = model.to(device).eval()
    preprocess = anomalib_preprocess(case, device)

    def run(i: int):
        with torch.inference_mode(), autocast_for(device, case.get("precision", "float32")):
            out = model(preprocess(maps[i * b : (i + 1) * b]))
        return out.pred_score.double().cpu().numpy()

    times, first, other = timed(run, warmup, steps, device, spec.get("clock", "wall"))
    return summary(times, first, other, count_flops(lambda: run(warmup + steps)), b, spec.get("clock", "wall"))
