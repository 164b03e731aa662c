"""The one preprocessing function: torchvision-equivalent numbers, and one result whichever path a map takes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.preprocess import IMAGENET_MEAN, IMAGENET_STD, center_crop_offset, preprocess
from hdmap_ad.pipeline.data import DEFAULT_DOMAINS, PreparedData, read_map

SIZES = [  # (resize, crop): the paper's square setting, the project's non-square defaults, odd margins (x.5 rounding)
    ((448, 448), (392, 392)),
    ((70, 210), (56, 196)),
    ((28, 84), (28, 84)),
    ((31, 95), (28, 84)),
    ((20, 40), (15, 33)),
    ((45, 21), (14, 14)),
]


def maps_like_hdmap(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 31, 95, generator=g) * 2.5  # values above 1 as in real test maps


@pytest.mark.parametrize("resize,crop", SIZES)
def test_matches_torchvision_v2(resize, crop):
    x = maps_like_hdmap()
    reference = v2.Compose(
        [v2.Resize(resize, antialias=True), v2.CenterCrop(crop), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )(x[:, None].repeat(1, 3, 1, 1))
    out = preprocess(x, resize, crop)
    assert out.shape == (3, 3, *crop) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)


def test_constant_map_gives_imagenet_normalised_channels():
    out = preprocess(np.full((31, 95), 0.7, np.float32), (40, 60), (30, 50))
    assert out.shape == (1, 3, 30, 50) and out.device.type == "cpu"
    for c in range(3):
        expected = (0.7 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(out[0, c], torch.full((30, 50), expected), rtol=0, atol=1e-5)


def test_batch_single_numpy_and_tensor_agree():
    x = maps_like_hdmap(4)
    batch = preprocess(x, (70, 210), (56, 196))
    for i in range(4):
        assert torch.equal(preprocess(x[i], (70, 210), (56, 196))[0], batch[i])
    assert torch.equal(preprocess(x.numpy(), [70, 210], [56, 196]), batch)  # lists as they come from params.yaml
    assert torch.equal(preprocess(x.double(), (70, 210), (56, 196)), batch)


def test_bad_sizes_are_errors():
    x = maps_like_hdmap(1)
    with pytest.raises(HdmapError, match="larger than resize"):
        preprocess(x, (40, 60), (41, 50))
    with pytest.raises(HdmapError, match="larger than resize"):
        preprocess(x, (40, 60), (30, 61))
    for resize, crop in [((0, 60), (0, 50)), ((40, -1), (30, -2)), ((40, 60), (30, 0))]:
        with pytest.raises(HdmapError, match="positive"):
            preprocess(x, resize, crop)
    with pytest.raises(HdmapError, match="two integers"):
        preprocess(x, (40, 60, 3), (30, 50))
    with pytest.raises(HdmapError, match=r"\(B, H, W\)"):
        preprocess(torch.zeros(1, 1, 31, 95), (40, 60), (30, 50))


def test_training_and_prediction_paths_give_identical_tensors(prepared_dir):
    """Training/evaluation read PreparedData; prediction reads the file: the tensors must be equal."""
    data = PreparedData.load(prepared_dir)
    for domain in DEFAULT_DOMAINS:
        for split in ("train", "test"):
            packed = data.maps(domain, split)
            paths = data.paths(domain, split)
            direct = np.stack([read_map(Path(p)) for p in paths])
            trained_on = preprocess(torch.from_numpy(np.ascontiguousarray(packed)), (70, 210), (56, 196))
            predicted = preprocess(direct, (70, 210), (56, 196))
            assert torch.equal(trained_on, predicted)
            one = preprocess(read_map(Path(paths[-1])), (70, 210), (56, 196))  # predict may batch differently
            assert torch.equal(one[0], trained_on[-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = maps_like_hdmap()
    cpu = preprocess(x, (448, 448), (392, 392))
    gpu = preprocess(x, (448, 448), (392, 392), device="cuda")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)
    assert preprocess(x.cuda(), (70, 210), (56, 196)).device.type == "cuda"  # stays on the input's device


def test_centre_crop_offset_is_torchvisions_over_every_margin():
    """The offset shared by preprocessing, mask geometry and plots is torchvision's CenterCrop's, for every
    even and odd margin up to 12 pixels on each axis."""
    for rh in range(1, 25):
        for ch in range(max(1, rh - 12), rh + 1):
            image = torch.arange(rh * (rh + 3), dtype=torch.float32).reshape(1, rh, rh + 3)
            top, left = center_crop_offset((rh, rh + 3), (ch, ch))
            expected = v2.functional.center_crop(image, [ch, ch])
            assert torch.equal(image[:, top : top + ch, left : left + ch], expected), (rh, ch)
