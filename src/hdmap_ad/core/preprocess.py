"""The one preprocessing function: raw HDMAP maps -> normalised 3-channel ViT input.

Training, evaluation and prediction all call `preprocess`, so a map is transformed identically
whichever path it takes (the experiment log lost a day to nearest vs bilinear resizing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hdmap_ad.core.errors import HdmapError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pair(name: str, size: int | Sequence[int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in pair):
        raise HdmapError(f"preprocess {name}={size!r}: expected (height, width) as two integers")
    if min(pair) <= 0:
        raise HdmapError(f"preprocess {name}={list(pair)}: sizes must be positive")
    return int(pair[0]), int(pair[1])


def center_crop_offset(resize: Sequence[int], crop: Sequence[int]) -> tuple[int, int]:
    """(top, left) of the centre crop inside the resized map, rounded as torchvision's CenterCrop: the one
    definition that preprocessing, the masks' geometry and the plots' crop frame share."""
    (rh, rw), (ch, cw) = _pair("resize", resize), _pair("crop", crop)
    return int(round((rh - ch) / 2.0)), int(round((rw - cw) / 2.0))


def preprocess(
    maps: torch.Tensor | np.ndarray,
    resize: Sequence[int],
    crop: Sequence[int],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B,H,W) or (H,W) float maps -> (B,3,crop_h,crop_w) float32 on `device` (default: the input
    tensor's device; NumPy input goes to the CPU).

    Bilinear resize with antialiasing, center crop, grayscale repeated to 3 channels, ImageNet
    normalisation: the same numbers as torchvision.transforms.v2 Resize(antialias=True) +
    CenterCrop + Normalize on the 3-channel tensor, computed once on the single channel.
    """
    (rh, rw), (ch, cw) = _pair("resize", resize), _pair("crop", crop)
    if ch > rh or cw > rw:
        raise HdmapError(f"preprocess crop={[ch, cw]} is larger than resize={[rh, rw]}")
    if isinstance(maps, np.ndarray):
        x = torch.from_numpy(np.array(maps, dtype=np.float32))  # a copy: memmaps and read-only arrays are fine
    else:
        x = maps
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise HdmapError(f"preprocess: expected maps of shape (B, H, W) or (H, W), got {tuple(x.shape)}")
    x = x.to(device=device if device is not None else x.device, dtype=torch.float32)[:, None]
    if x.shape[-2:] != (rh, rw):  # torchvision leaves an image of the target size untouched
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
    top, left = center_crop_offset((rh, rw), (ch, cw))
    x = x[..., top : top + ch, left : left + cw].expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
