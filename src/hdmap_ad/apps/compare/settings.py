"""What compare reads from the params: a small view of what the one params loader returns."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import Field

from hdmap_ad.core.config import HDMAP_DOMAINS, HEADLINE_METRICS, CompareParams, MlflowParams, Params, load_params

# The metrics each run logs to MLflow as test_<metric>/<scope> (the rest of an evaluation is in its
# eval_details.json artifact): the only ones compare can read.
KNOWN_METRICS = HEADLINE_METRICS


class Settings(CompareParams, MlflowParams):
    """The parameters compare reads: params.yaml's `compare` and `mlflow` sections (each setting, its default
    and its check are defined once, in hdmap_ad.core.config) plus what it takes from `data` and `profile`."""

    domains: tuple[str, ...] = HDMAP_DOMAINS
    profile: str | None = Params.model_fields["profile"].default  # only runs tagged with this profile; None: any
    # The params file (and --set overrides) whose comparison group is compared; None: the newest baseline run's.
    params_path: str | None = None
    overrides: tuple[str, ...] = ()
    # The params loaded from params_path (so the workspace's comparison group needs no second load).
    params: Params | None = Field(default=None, repr=False)

    def margin(self, metric: str) -> float | None:
        """The metric's margin in its own unit (a fraction for percent metrics); None without one."""
        from hdmap_ad.apps.compare.labels import NOT_PERCENT

        points = self.rope.get(metric)
        return None if points is None else (points if metric in NOT_PERCENT else points / 100.0)

    @classmethod
    def from_params(cls, params: Params, path: Path | str, overrides: Sequence[str] = ()) -> Settings:
        """The view of params loaded by `load_params(path, overrides)` (which refuses metrics runs do not log)."""
        return cls(
            **params.compare.model_dump(),
            **params.mlflow.model_dump(),
            domains=tuple(params.data.domains),
            profile=params.profile,
            params_path=str(path),
            overrides=tuple(overrides),
            params=params,
        )


def load_settings(path: Path | str = "params.yaml", overrides: Sequence[str] = ()) -> Settings:
    """What compare needs from params.yaml, through the one params loader (`load_params`: profile
    merged, `--set` applied, everything validated; no torch is imported)."""
    return Settings.from_params(load_params(path, list(overrides)), path, overrides)
