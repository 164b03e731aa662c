"""The one inference path: packed maps -> preprocess -> model -> anomaly maps and image scores.

Validation during training, the evaluate stage, `predict`, the pyfunc model and the benchmark all
call `score_maps`, so none of them can drift from the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hdmap_ad.checkpoint import score_config
from hdmap_ad.config import Params
from hdmap_ad.methods import Method
from hdmap_ad.model import Dinomaly, Reconstruction, anomaly_map, group_distances, image_score
from hdmap_ad.preprocess import preprocess
from hdmap_ad.runtime import autocast, progress_iter


@dataclass
class Scored:
    scores: np.ndarray                 # N float64, higher = more anomalous
    maps: np.ndarray | None = None     # N×S×S float32 anomaly maps at the score size, when asked for
    extras: dict[str, np.ndarray] | None = None  # method extras per sample (e.g. aux domain prediction)


@torch.inference_mode()  # nothing here needs autograd: cheaper than no_grad (no version counters)
def score_batch(model: Dinomaly, method: Method, images: torch.Tensor, params: Params,
                domain_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], Reconstruction]:
    """Scores B, anomaly maps B×1×S×S (score size, before blur), method extras, for preprocessed images."""
    recon = model(images)
    cfg = score_config(params)
    maps = method.reduce_maps(anomaly_map(group_distances(recon).float(), tuple(images.shape[-2:]), reduce="none"))
    small = torch.nn.functional.interpolate(maps, size=cfg.size, mode="bilinear", align_corners=False)
    scores = image_score(small, cfg)  # already at the score size: image_score only blurs and takes the top k
    extras = method.eval_batch(recon, domain_ids) if domain_ids is not None else {}
    return scores, small, extras, recon


def score_maps(model: Dinomaly, method: Method, maps: np.ndarray, params: Params, device: torch.device,
               batch_size: int, keep_maps: bool = False, domain_id: int | None = None,
               description: str | None = None) -> Scored:
    """Score raw 2-D maps (N×H×W float32) in batches on `device`."""
    model.eval()
    method.eval()
    scores, kept, extras = [], [], {}
    n = len(maps)
    steps = range(0, n, batch_size)
    with progress_iter(len(steps), description or "scoring") as bar:
        for start in steps:
            batch = torch.from_numpy(np.ascontiguousarray(maps[start:start + batch_size])).to(device)
            images = preprocess(batch, params.preprocess.resize, params.preprocess.crop)
            ids = None if domain_id is None else torch.full((len(batch),), domain_id, device=device, dtype=torch.long)
            with autocast(device, params.train.amp):
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
