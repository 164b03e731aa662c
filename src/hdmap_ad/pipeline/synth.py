"""Synthetic HDMAP: a seeded generator that writes the real dataset's folder layout (docs/design.md#data-synth).

Each domain has a fixed periodic pattern that varies mostly from row to row (strong horizontal
orientation), scaled per image by a recording-phase amplitude (warm ≈ 1.4 × cold) and a small
jitter, shifted a little per image, times right-skewed noise (log-normal, correlated along rows, with
rare single-pixel spikes). Train maps are a random 50/50 mix of cold and warm recordings, so a model sees both; in each
test folder the first half is cold and the second half warm, as in the real data.

A fault is an additive horizontal band, 1–2 rows high and ~10–80 columns wide, sometimes broken in
the middle, whose height above its surroundings depends on the domain (faint in domain_C: ≈ 1.3×)
and is weaker on cold maps. Its pixels are written as a 0/255 uint8 mask.

Values are built in raw units whose train maximum is the real domain's (docs/design.md#data-layout),
then min-max scaled per domain with min 0 and max = the train set's global max, without clipping:
train maps lie in [0, 1], test maps (warm or faulty) may exceed 1.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import field_validator

from hdmap_ad.core.config import SynthParams
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.files import atomic_dir
from hdmap_ad.pipeline.data import DEFAULT_DOMAINS, folder_phases

WARM_FACTOR = 1.4  # warm / cold amplitude (docs/design.md#data-layout)
COLD_FAULT_FACTOR = 0.7  # a fault shows less on a cold machine
BUMP_SHARPNESS = 2.0  # narrow bright rows rather than a sine: right-skewed values
SPIKE_RATE = 0.002  # fraction of pixels with a spike
SPIKE_GAIN = (0.35, 0.7)  # a spike multiplies its pixel by 1 + U(gain)


@dataclass(frozen=True)
class DomainStyle:
    raw_train_max: float  # the real domain's raw train maximum (docs/design.md#data-layout)
    row_period: float  # rows per cycle of the fixed pattern
    row_depth: float  # relative strength of the row-to-row pattern
    col_period: float  # columns per cycle of the (weaker) along-row pattern
    col_depth: float
    phase: float  # fixed pattern offset, radians
    noise: float  # sigma of the log-normal pixel noise
    fault: float  # band height over its surroundings on a warm map (0.3 -> 1.3×)


STYLES: dict[str, DomainStyle] = {
    "domain_A": DomainStyle(0.324670, 31 / 4, 1.2, 95 / 5, 0.06, 0.3, 0.15, 1.00),
    "domain_B": DomainStyle(1.324418, 31 / 3, 1.0, 95 / 3, 0.05, 1.7, 0.14, 0.90),
    "domain_C": DomainStyle(0.087341, 31 / 5, 1.1, 95 / 7, 0.07, 2.9, 0.10, 0.30),
    "domain_D": DomainStyle(0.418999, 31 / 6, 1.3, 95 / 4, 0.06, 4.4, 0.13, 0.50),
}


class SynthConfig(SynthParams):
    """What the generator makes: params.yaml's `synth` section (each setting, its default and its check are
    defined once, in hdmap_ad.core.config.SynthParams; `out` is generate's argument) and which domains."""

    domains: tuple[str, ...] = DEFAULT_DOMAINS

    @field_validator("domains")
    @classmethod
    def _known_once(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or any(d not in STYLES for d in v):
            raise ValueError(f"synth domains {list(v)}: choose from {', '.join(DEFAULT_DOMAINS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"synth domains {list(v)}: a domain is listed twice")
        return v

    def summary(self) -> dict[str, Any]:
        """The settings as synth.json records them (keys in the order files written so far have them)."""
        keys = ("n_train", "n_test_good", "n_test_fault", "height", "width", "domains", "seed")
        return {k: list(self.domains) if k == "domains" else getattr(self, k) for k in keys}


@dataclass
class DomainMaps:
    """One domain's generated maps, already scaled (float32), in file order."""

    train: np.ndarray  # N×H×W
    test_good: np.ndarray
    test_fault: np.ndarray
    masks: np.ndarray  # uint8 {0, 1}, one per fault map
    train_warm: np.ndarray  # bool per train map
    raw_train_max: float  # the divisor of the min-max scaling
    stats: dict[str, Any] = field(default_factory=dict)


def _normal_maps(
    rng: np.random.Generator, style: DomainStyle, amplitude: np.ndarray, h: int, w: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fault-free maps (amplitude × pattern × noise) and their noise-free level, in units before the domain scale."""
    n = len(amplitude)
    rows = np.arange(h)[None, :, None] + rng.uniform(-0.3, 0.3, (n, 1, 1))  # per-image shift of the pattern
    cols = np.arange(w)[None, None, :] + rng.uniform(-1.5, 1.5, (n, 1, 1))
    # Sharp periodic row bumps (right-skewed) plus a weak wave along the row.
    bumps = np.exp(BUMP_SHARPNESS * (np.cos(2 * np.pi * rows / style.row_period + style.phase) - 1.0))
    pattern = (
        1.0 + style.row_depth * bumps + style.col_depth * np.cos(2 * np.pi * cols / style.col_period + 2 * style.phase)
    )
    z = rng.standard_normal((n, h, w + 2))
    z = (z[..., :-2] + 2 * z[..., 1:-1] + z[..., 2:]) / np.sqrt(6.0)  # unit variance, correlated along a row
    z = np.clip(z, -3.0, 3.0)  # bounded tails keep the train max, hence the scaling, stable across set sizes
    level = amplitude[:, None, None] * rng.uniform(0.92, 1.08, (n, 1, 1)) * pattern
    # Rare single-pixel spikes give the long right tail (train max ≈ 4 × mean) at a moderate spread.
    spikes = 1.0 + (rng.random((n, h, w)) < SPIKE_RATE) * rng.uniform(*SPIKE_GAIN, (n, h, w))
    return level * np.exp(style.noise * z - style.noise**2 / 2) * spikes, level


def _add_faults(
    rng: np.random.Generator, style: DomainStyle, maps: np.ndarray, level: np.ndarray, cold: np.ndarray
) -> np.ndarray:
    """Add one band per map in place; return the uint8 {0, 1} masks."""
    n, h, w = maps.shape
    masks = np.zeros(maps.shape, dtype=np.uint8)
    for i in range(n):
        height = int(rng.integers(1, 3))
        top = int(rng.integers(0, h - height + 1))
        width = int(rng.integers(min(10, w // 2), min(80, w - 2) + 1))
        left = int(rng.integers(0, w - width + 1))
        band = np.zeros(w, dtype=bool)
        band[left : left + width] = True
        if rng.random() < 0.35:  # a broken band: a gap in the middle
            gap = int(rng.integers(2, max(3, width // 4) + 1))
            start = left + (width - gap) // 2
            band[start : start + gap] = False
        strength = style.fault * rng.uniform(0.8, 1.2) * (COLD_FAULT_FACTOR if cold[i] else 1.0)
        masks[i, top : top + height, band] = 1
        # Proportional to the local noise-free level, so the band is (1 + strength) × its surroundings.
        maps[i] += strength * level[i] * masks[i]
    return masks


def make_domain(cfg: SynthConfig, domain: str) -> DomainMaps:
    """Generate one domain in memory; depends only on (seed, domain, counts, size), not on the other domains."""
    if domain not in STYLES:
        raise HdmapError(f"synth domain {domain!r}: choose from {', '.join(DEFAULT_DOMAINS)}")
    style = STYLES[domain]
    h, w = cfg.height, cfg.width
    streams = np.random.SeedSequence([cfg.seed, DEFAULT_DOMAINS.index(domain)]).spawn(3)
    rng_train, rng_good, rng_fault = (np.random.default_rng(s) for s in streams)

    train_warm = rng_train.random(cfg.n_train) < 0.5
    train, _ = _normal_maps(rng_train, style, np.where(train_warm, WARM_FACTOR, 1.0), h, w)

    def phase_amplitude(n: int) -> tuple[np.ndarray, np.ndarray]:
        cold = np.array([p == "cold" for p in folder_phases(n)])
        return cold, np.where(cold, 1.0, WARM_FACTOR)

    _, amp_good = phase_amplitude(cfg.n_test_good)
    good, _ = _normal_maps(rng_good, style, amp_good, h, w)
    cold_fault, amp_fault = phase_amplitude(cfg.n_test_fault)
    fault, level = _normal_maps(rng_fault, style, amp_fault, h, w)
    masks = _add_faults(rng_fault, style, fault, level, cold_fault)

    # Raw units carry the real domain's scale (its train max as in docs/design.md#data-layout); the
    # written maps are min-max scaled like `1000_tiff_minmax`: min 0, max = the train set's global max, no clipping.
    to_raw = style.raw_train_max / train.max()
    raw_train, raw_good, raw_fault = train * to_raw, good * to_raw, fault * to_raw
    raw_max = float(raw_train.max())

    def scale(raw: np.ndarray) -> np.ndarray:
        return (raw / raw_max).astype(np.float32)

    out = DomainMaps(scale(raw_train), scale(raw_good), scale(raw_fault), masks, train_warm, raw_max)
    test = np.concatenate([out.test_good, out.test_fault])
    out.stats = {
        "raw_train_max": raw_max,
        "train": cfg.n_train,
        "test_good": cfg.n_test_good,
        "test_fault": cfg.n_test_fault,
        "train_warm": int(train_warm.sum()),
        "train_mean": float(out.train.mean()),
        "test_max": float(test.max()),
        "n_test_above_1": int((test.max(axis=(1, 2)) > 1.0).sum()),
    }
    return out


def _progress(total: int, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    from hdmap_ad.core.runtime import progress_iter  # imports torch; only needed when showing progress

    return progress_iter(total, "writing synthetic maps")


def generate(out: Path, cfg: SynthConfig, progress: bool = True) -> dict:
    """Write the synthetic dataset to `out` (replaced atomically) and return a summary (also in synth.json)."""
    import tifffile

    out = Path(out)
    summary = {
        "seed": cfg.seed,
        "shape": [cfg.height, cfg.width],
        "config": cfg.summary(),
        "domains": {},
    }
    total = len(cfg.domains) * (cfg.n_train + cfg.n_test_good + 2 * cfg.n_test_fault)
    with atomic_dir(out) as tmp, _progress(total, progress) as bar:
        for domain in cfg.domains:
            maps = make_domain(cfg, domain)
            parts = [
                ("train/good", maps.train),
                ("test/good", maps.test_good),
                ("test/fault", maps.test_fault),
                ("ground_truth/fault", maps.masks * np.uint8(255)),
            ]
            for folder, arrays in parts:
                target = tmp / domain / folder
                target.mkdir(parents=True)
                for i, a in enumerate(arrays):
                    tifffile.imwrite(target / f"{i:06d}.tiff", a)
                if bar is not None:
                    bar.update(len(arrays))
            summary["domains"][domain] = maps.stats
        (tmp / "synth.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
