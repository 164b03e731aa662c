"""What a benchmark case is, and the constants both sides of the subprocess boundary share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hdmap_ad.core.config import HDMAP_DOMAINS

DEFAULT_OUT = Path("benchmarks/results/bench.json")
PAPER_MAPS = 4 * 1000  # 4 domains × 1000 training maps (docs/design.md#data-layout)
RAW_DOMAINS = list(HDMAP_DOMAINS)
ANOMALIB_ENCODERS = {
    "small": "vit_small_patch14_reg4_dinov2",
    "base": "vit_base_patch14_reg4_dinov2",
    "large": "vit_large_patch14_reg4_dinov2",
}
HARD_MINING_STEP = 1000  # global step passed to both losses: hard mining at its final ratio (0.9)
OURS_TRAIN = ("ours_train_cache_on", "ours_train_cache_off")
# Benchmark precision -> our `train.amp`/`evaluate.amp` value; anomalib's model runs under the same autocast.
PRECISIONS = {"float32": "off", "bf16": "bf16"}
PHASE_LABEL = {
    "ours_train_cache_on": ("train", "ours, cache on"),
    "ours_train_cache_off": ("train", "ours, cache off"),
    "anomalib_train": ("train", "anomalib"),
    "ours_infer": ("infer", "ours"),
    "anomalib_infer": ("infer", "anomalib"),
}


@dataclass(frozen=True)
class Case:
    crop: tuple[int, int]
    resize: tuple[int, int]
    batch: int
    encoder: str
    precision: str = "float32"  # a key of PRECISIONS

    @property
    def name(self) -> str:
        return f"{self.crop[0]}x{self.crop[1]} b{self.batch} {self.encoder} {self.precision}"

    def tokens(self, prefix: int = 5, patch: int = 14) -> tuple[int, int]:
        n = (self.crop[0] // patch) * (self.crop[1] // patch)
        return prefix + n, n
