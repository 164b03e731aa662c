"""The per-map scores of the compared runs, for the statistics that need the test maps themselves
(DeLong and the hierarchical bootstrap of Δ AUROC, docs/design.md#stats-delong).

evaluate writes metrics/scores.csv (path, domain, label, score: one row per test map) and logs it to
its run as the artifact `eval/scores.csv`. compare downloads it once per run into a temporary folder.
A run without it (evaluated by an older version, artifacts lost) gets a note; the per-map statistics
go without that run and everything else is unchanged. Maps are matched between runs by their path
(`align`); runs of one comparison group share the prepared data, so a mismatch means the maps differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hdmap_ad.core.paths import SCORES_FILE

SCORES_ARTIFACT = f"eval/{SCORES_FILE.name}"
COLUMNS = ("path", "domain", "label", "score")
PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@dataclass(frozen=True)
class DomainScores:
    """One domain's test maps as a run scored them, in the file's order."""

    paths: np.ndarray  # map identity (str)
    labels: np.ndarray  # 0 good, 1 fault
    scores: np.ndarray  # float64, NaN/Inf kept (the statistics say "not computable" for them)

    def __len__(self) -> int:
        return int(self.paths.size)


@dataclass
class RunScores:
    """A run's per-map scores by domain; `missing` says why there are none ("" when there are)."""

    run_id: str
    domains: dict[str, DomainScores] = field(default_factory=dict)
    missing: str = ""


def read_scores_csv(path: Path, run_id: str) -> RunScores:
    """scores.csv as evaluate writes it; a file without the expected columns or labels is `missing`."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype={"path": str, "domain": str})
    except Exception as err:  # an empty or garbled file: the run simply has no usable scores
        return RunScores(run_id, missing=f"`{SCORES_ARTIFACT}` unreadable ({type(err).__name__})")
    absent = [c for c in COLUMNS if c not in df.columns]
    if absent:
        return RunScores(run_id, missing=f"`{SCORES_ARTIFACT}` lacks column(s) {', '.join(absent)}")
    labels = pd.to_numeric(df["label"], errors="coerce")
    if not labels.isin([0, 1]).all():
        return RunScores(run_id, missing=f"`{SCORES_ARTIFACT}` has labels other than 0/1")
    scores = pd.to_numeric(df["score"], errors="coerce").to_numpy(dtype=np.float64)
    out = RunScores(run_id)
    for domain, idx in df.groupby("domain", sort=False).indices.items():
        out.domains[str(domain)] = DomainScores(
            df["path"].to_numpy(dtype=str)[idx], labels.to_numpy(dtype=np.int8)[idx], scores[idx]
        )
    return out


class ScoresCache:
    """Downloads each run's scores artifact at most once (into `folder`, a temporary folder)."""

    def __init__(self, client, folder: Path):
        self._client = client
        self._folder = Path(folder)
        self._cache: dict[str, RunScores] = {}
        self.downloads = 0

    def __call__(self, run_id: str) -> RunScores:
        if run_id not in self._cache:
            self._cache[run_id] = self._fetch(run_id)
        return self._cache[run_id]

    def _fetch(self, run_id: str) -> RunScores:
        self.downloads += 1
        # one small file per run: MLflow's progress bar per download would only clutter the terminal
        before = os.environ.get(PROGRESS_BAR)
        os.environ[PROGRESS_BAR] = "false"
        try:
            local = self._client.download_artifacts(run_id, SCORES_ARTIFACT, str(self._mkdir(run_id)))
        except Exception as err:  # MLflow raises several types for a missing artifact; all mean "none"
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            return RunScores(run_id, missing=f"no `{SCORES_ARTIFACT}` artifact ({first})")
        finally:
            if before is None:
                os.environ.pop(PROGRESS_BAR, None)
            else:
                os.environ[PROGRESS_BAR] = before
        return read_scores_csv(Path(local), run_id)

    def _mkdir(self, run_id: str) -> Path:
        folder = self._folder / run_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def align(ref: DomainScores, other: DomainScores, same_data: bool) -> tuple[np.ndarray | None, str]:
    """Row indices of `other` in `ref`'s map order, and how they were matched; None and why when the maps
    differ (other ids or labels).

    By path; when the paths differ but both runs used the same prepared data (`same_data`: equal data
    digests, which do not depend on where the data lies) and the labels agree row by row, by position:
    the prepared rows are the same maps, read from another folder.
    """
    n, k = len(ref), len(other)
    if n == k and np.array_equal(ref.paths, other.paths):
        idx, how = np.arange(n), ""
    else:
        pos = {p: i for i, p in enumerate(other.paths)}
        if n == k and len(pos) == k and all(p in pos for p in ref.paths):
            idx, how = np.array([pos[p] for p in ref.paths], dtype=np.intp), ""
        elif n == k and same_data and np.array_equal(ref.labels, other.labels):
            idx, how = np.arange(n), "paired by position: same data digest, other paths (data read from another folder)"
        else:
            common = len(set(ref.paths) & set(pos))
            return None, f"{n} vs {k} maps, {max(n, k) - common} map id(s) differ"
    bad = int(np.count_nonzero(ref.labels != other.labels[idx]))
    if bad:
        return None, f"{bad} map(s) with another label"
    return idx, how
