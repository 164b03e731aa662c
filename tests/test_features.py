"""When the encoder-feature cache is used, and how it falls back (exactness: tests/test_bench.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from hdmap_ad.core import features
from hdmap_ad.core.checkpoint import build
from hdmap_ad.core.features import cache_decision, make_feature_source

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


@pytest.mark.parametrize(
    ("mode", "need", "max_gb", "free", "use", "says"),
    [
        ("off", 1, 4.0, 100 * GIB, False, "runtime.feature_cache=off"),
        ("auto", 1 * GIB, 4.0, 100 * GIB, True, "on"),
        ("auto", 5 * GIB, 4.0, 100 * GIB, False, "feature_cache_max_gb=4"),
        ("auto", 3 * GIB, 4.0, 5 * GIB, False, "50% of the 5.00 GiB free"),  # under max_gb, over half the free memory
        ("on", 3 * GIB, 4.0, 5 * GIB, True, "on"),  # on: the user's call, it fits
        ("on", 6 * GIB, 100.0, 5 * GIB, False, "only 5.00 GiB free"),  # cannot fit at all: never tried
    ],
)
def test_cache_decision(mode, need, max_gb, free, use, says):
    got, why = cache_decision(mode, need, max_gb, free)
    assert got is use and says in why


def test_a_cache_that_does_not_fit_falls_back_to_per_batch_encoding(monkeypatch, capsys):
    params = tiny.params("runtime.feature_cache=on", "train.batch_size=2")
    model, _ = build(params, ["domain_A"], torch.device("cpu"))
    maps = np.random.default_rng(0).random((4, 31, 95), dtype=np.float32)
    cached = make_feature_source(model, maps, params, torch.device("cpu"))
    assert cached.describe() == "on"
    monkeypatch.setattr(features, "available_bytes", lambda device: 1000)  # ~1 kB free
    source = make_feature_source(model, maps, params, torch.device("cpu"))
    assert source.describe() == "off" and "only 0.00 GiB free" in capsys.readouterr().err
    idx = np.array([3, 1])
    direct, stored = source.batch(idx), cached.batch(idx)
    assert torch.equal(direct.bottleneck_in, stored.bottleneck_in)
    assert all(torch.equal(a, b) for a, b in zip(direct.groups, stored.groups))
