"""What compare reads from the params: a small view of what the one params loader returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hdmap_ad.core.config import DEFAULT_ROPE, HDMAP_DOMAINS, HEADLINE_METRICS

if TYPE_CHECKING:
    from hdmap_ad.core.config import Params

# The metrics each run logs to MLflow as test_<metric>/<scope> (the rest of an evaluation is in its
# eval_details.json artifact): the only ones compare can read.
KNOWN_METRICS = HEADLINE_METRICS


@dataclass(frozen=True)
class Settings:
    """The few parameters compare reads (params.yaml sections `compare`, `mlflow`, `data`, `profile`)."""

    baseline: str = "baseline"
    metrics: tuple[str, ...] = ("auroc", "tpr_at_fpr_1", "tpr_at_fpr_5")
    methods: tuple[str, ...] | None = None  # None: every method found
    experiment: str = "hdmap-dinomaly"
    tracking_uri: str | None = None
    domains: tuple[str, ...] = HDMAP_DOMAINS
    profile: str | None = "quick"  # only runs tagged with this profile; None: any
    # The params file (and --set overrides) whose comparison group is compared; None: the newest baseline run's.
    params_path: str | None = None
    overrides: tuple[str, ...] = ()
    # The uncertainty of each Δ (compare.confidence, ...; docs/design.md#stats-intervals).
    confidence: float = 0.95
    bootstrap_resamples: int = 10000
    bootstrap_seed: int = 0
    alpha: float = 0.05
    power: float = 0.8
    # The practical margin per metric in points (compare.rope; docs/design.md#stats-margins).
    rope: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_ROPE), hash=False)
    # The params loaded from params_path (so the workspace's comparison group needs no second load).
    params: Params | None = field(default=None, repr=False, compare=False)

    def margin(self, metric: str) -> float | None:
        """The metric's margin in its own unit (a fraction for percent metrics); None without one."""
        from hdmap_ad.apps.compare.labels import NOT_PERCENT

        points = self.rope.get(metric)
        return None if points is None else (points if metric in NOT_PERCENT else points / 100.0)

    @classmethod
    def from_params(cls, params: Params, path: Path | str, overrides: Sequence[str] = ()) -> Settings:
        """The view of params loaded by `load_params(path, overrides)` (which refuses metrics runs do not log)."""
        cp = params.compare
        return cls(
            baseline=cp.baseline,
            metrics=tuple(cp.metrics),
            methods=tuple(cp.methods) if cp.methods else None,
            confidence=cp.confidence,
            bootstrap_resamples=cp.bootstrap_resamples,
            bootstrap_seed=cp.bootstrap_seed,
            alpha=cp.alpha,
            power=cp.power,
            rope=dict(cp.rope),
            experiment=params.mlflow.experiment,
            tracking_uri=params.mlflow.tracking_uri,
            domains=tuple(params.data.domains),
            profile=params.profile,
            params_path=str(path),
            overrides=tuple(overrides),
            params=params,
        )


def load_settings(path: Path | str = "params.yaml", overrides: Sequence[str] = ()) -> Settings:
    """What compare needs from params.yaml, through the one params loader (`load_params`: profile
    merged, `--set` applied, everything validated; no torch is imported)."""
    from hdmap_ad.core.config import load_params

    return Settings.from_params(load_params(path, list(overrides)), path, overrides)
