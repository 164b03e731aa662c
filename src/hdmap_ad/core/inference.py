"""The one inference path: packed maps -> preprocess -> model -> anomaly maps and image scores.

Validation during training, the evaluate stage, `predict`, the pyfunc model and the benchmark all
call `score_maps`, so none of them can drift from the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hdmap_ad.core.checkpoint import TrainedModel
from hdmap_ad.core.config import Params, ScoreParams
from hdmap_ad.core.decision import decide, threshold_for  # noqa: F401  (torch-free; re-exported for callers)
from hdmap_ad.core.methods import Method
from hdmap_ad.core.model import Dinomaly, Reconstruction, anomaly_map, group_distances, image_score
from hdmap_ad.core.preprocess import preprocess
from hdmap_ad.core.runtime import autocast, progress_iter


@dataclass
class Scored:
    scores: np.ndarray  # N float64, higher = more anomalous
    maps: np.ndarray | None = None  # N×S×S float32 anomaly maps at the score size, when asked for
    extras: dict[str, np.ndarray] | None = None  # method extras per sample (e.g. aux domain prediction)


def score_images(
    model: Dinomaly, method: Method, images: torch.Tensor, cfg: ScoreParams
) -> tuple[torch.Tensor, torch.Tensor, Reconstruction]:
    """Scores B and anomaly maps B×1×S×S (score size, before blur) for preprocessed images.

    Free of autograd modes and data-dependent branches, so `export.py` traces this same function
    into the ONNX graph.
    """
    recon = model(images)
    maps = method.reduce_maps(anomaly_map(group_distances(recon).float(), tuple(images.shape[-2:]), reduce="none"))
    small = torch.nn.functional.interpolate(maps, size=cfg.size, mode="bilinear", align_corners=False)
    scores = image_score(small, cfg)  # already at the score size: image_score only blurs and takes the top k
    return scores, small, recon


@torch.inference_mode()  # nothing here needs autograd: cheaper than no_grad (no version counters)
def score_batch(
    model: Dinomaly, method: Method, images: torch.Tensor, params: Params, domain_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], Reconstruction]:
    """Scores B, anomaly maps B×1×S×S (score size, before blur), method extras, for preprocessed images."""
    scores, small, recon = score_images(model, method, images, params.score)
    extras = method.eval_batch(recon, domain_ids) if domain_ids is not None else {}
    return scores, small, extras, recon


def score_maps(
    model: Dinomaly,
    method: Method,
    maps: np.ndarray,
    params: Params,
    device: torch.device,
    batch_size: int,
    keep_maps: bool = False,
    domain_id: int | None = None,
    description: str | None = None,
    amp: str | None = None,
) -> Scored:
    """Score raw 2-D maps (N×H×W float32) in batches on `device`, under autocast at `amp`
    (default: params.evaluate.amp, the inference precision; training validation passes train.amp)."""
    amp = params.evaluate.amp if amp is None else amp
    model.eval()
    method.eval()
    scores, kept, extras = [], [], {}
    n = len(maps)
    steps = range(0, n, batch_size)
    with progress_iter(len(steps), description or "scoring") as bar:
        for start in steps:
            batch = torch.from_numpy(np.ascontiguousarray(maps[start : start + batch_size])).to(device)
            images = preprocess(batch, params.preprocess.resize, params.preprocess.crop)
            ids = None if domain_id is None else torch.full((len(batch),), domain_id, device=device, dtype=torch.long)
            with autocast(device, amp):
                s, m, ex, _ = score_batch(model, method, images, params, ids)
            scores.append(s.double().cpu().numpy())
            if keep_maps:
                kept.append(m[:, 0].float().cpu().numpy())
            for k, v in ex.items():
                extras.setdefault(k, []).append(v.cpu().numpy())
            bar.update(1)
    return Scored(
        scores=np.concatenate(scores) if scores else np.zeros(0),
        maps=np.concatenate(kept) if kept else None,
        extras={k: np.concatenate(v) for k, v in extras.items()} or None,
    )


# --------------------------------------------------------------------------------------------------
# a trained model on maps of any shape, and the decision rule (predict and the served model use these)


def score_arrays(
    trained: TrainedModel,
    maps: Sequence[np.ndarray],
    device: torch.device,
    batch_size: int,
    keep_maps: bool = False,
    description: str = "scoring",
    amp: str | None = None,
) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """Scores (and anomaly maps at the score size) for 2-D float32 maps that may differ in shape, at the
    precision `amp` (default: the model's evaluate.amp).

    Maps of one shape are stacked and scored together through `inference.score_maps`; the results
    come back in input order.
    """
    scores = np.full(len(maps), np.nan, dtype=np.float64)
    amaps: list[Any] = [None] * len(maps)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(maps):
        groups.setdefault(tuple(m.shape), []).append(i)
    for shape, idx in groups.items():
        stack = np.stack([np.asarray(maps[i], dtype=np.float32) for i in idx])
        label = description if len(groups) == 1 else f"{description} {shape[0]}x{shape[1]}"
        scored = score_maps(
            trained.model,
            trained.method,
            stack,
            trained.params,
            device,
            batch_size,
            keep_maps=keep_maps,
            description=label,
            amp=amp,
        )
        scores[idx] = scored.scores
        if keep_maps:
            for j, i in enumerate(idx):
                amaps[i] = scored.maps[j]
    return scores, (amaps if keep_maps else None)
