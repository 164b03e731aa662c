"""Where things live: the repository root that runs belong to, and every output path of the pipeline
(relative to the repository root, where the DVC stages run). dvc.yaml names the same paths; a test holds
the two together."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The repository the run belongs to: `DVC_ROOT` inside DVC experiments, else the enclosing repo."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return here


# models/: written by the configure and train stages
TRAIN_CONFIG_FILE = Path("models/train_config.json")  # what changes a trained model (configure)
MODEL_FILE = Path("models/model.safetensors")  # the trained model
STATE_FILE = Path("models/train_state/last.safetensors")  # resume state: scratch, not a DVC output
LEGACY_SUFFIX = ".pt"  # what both were called before: safetensors content under a PyTorch name
RUN_FILE = Path("models/run.json")  # which MLflow run trained MODEL_FILE: machine-specific
# metrics/ and plots/: the train and evaluate stages
TRAIN_METRICS = Path("metrics/train.json")  # DVC metric
EVAL_FILE = Path("metrics/eval.json")  # DVC metric: the headline metrics in percent
EVAL_DETAILS_FILE = Path("metrics/eval_details.json")  # everything else evaluate computes (fractions)
SCORES_FILE = Path("metrics/scores.csv")
PLOTS_DIR = Path("plots")
# the compare stage
COMPARE_FILE = Path("metrics/compare.json")  # headline numbers of the comparison
REPORT_FILE = Path("reports/comparison.md")  # reports/: a view of the MLflow store, git-ignored
REPORT_PLOTS_DIR = Path("reports/plots")
