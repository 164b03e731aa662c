"""The compare stage: read the evaluated runs from MLflow, pair them by seed, test every method against the baseline.

Outputs (each written atomically, and only when there is at least one valid run):
`metrics/compare.json` (what `dvc metrics diff` compares: per method x scope x report metric the mean
over seeds in percent, the number of seeds, Δ vs the baseline in points and the Holm p; nothing that
depends on the machine or the time), `reports/comparison.json` (everything else: runs, left-out runs,
notes, every statistic), `reports/comparison.md` (the experiment plan's tables, filled in), PNG plots
under `reports/plots/`, a summary on the terminal, and one MLflow run named `compare` (tag
`kind=compare`) in the experiment `<mlflow.experiment>-compare`, apart from the training runs.

The flow, one module each: `settings` (the params view) -> `runs` (fetch from MLflow, select and
pair) -> `scores` (each paired run's per-map scores, downloaded once) and `permap` (DeLong and the
hierarchical bootstrap of Δ AUROC from them) -> `analysis` (the typed `ComparisonResult`, and its
JSON) -> `report` (Markdown, terminal, plots) -> `command` (the CLI, writing the outputs, logging the
compare run).
"""

from hdmap_ad.apps.compare.analysis import analyse
from hdmap_ad.apps.compare.command import add_parser, cmd_compare, details_path_for, log_compare_run, run_compare
from hdmap_ad.apps.compare.report import render_markdown
from hdmap_ad.apps.compare.result import Comparison, ComparisonResult, SeedSummary
from hdmap_ad.apps.compare.runs import (
    COMPARE_KIND,
    Reference,
    RunRecord,
    Selection,
    collect,
    fetch_runs,
    select_runs,
    workspace_reference,
)
from hdmap_ad.apps.compare.settings import Settings, load_settings

__all__ = [
    "COMPARE_KIND",
    "Comparison",
    "ComparisonResult",
    "Reference",
    "RunRecord",
    "SeedSummary",
    "Selection",
    "Settings",
    "add_parser",
    "analyse",
    "cmd_compare",
    "collect",
    "details_path_for",
    "fetch_runs",
    "load_settings",
    "log_compare_run",
    "render_markdown",
    "run_compare",
    "select_runs",
    "workspace_reference",
]
