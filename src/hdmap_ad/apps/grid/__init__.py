"""`hdmap-ad grid`: the methods × seeds grid of DVC experiments, then compare.

Two executors: `local` (the default: the DVC queue with N workers on this machine, `local`) and `ray`
(one Ray task per (method, seed) on an existing Ray cluster, with retries: `cluster`, whose tasks run
`node` on the machine that executes them). `command` is the CLI.
"""

from hdmap_ad.apps.grid.command import DESCRIPTION, add_parser, cmd_grid
from hdmap_ad.apps.grid.local import (
    DEFAULT_METHODS,
    DEFAULT_SEEDS,
    DONE_STATES,
    Task,
    dvc_commands,
    parse_queue_status,
    run_grid,
    validate,
    wait_for_tasks,
    worker_env,
)

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_SEEDS",
    "DESCRIPTION",
    "DONE_STATES",
    "Task",
    "add_parser",
    "cmd_grid",
    "dvc_commands",
    "parse_queue_status",
    "run_grid",
    "validate",
    "wait_for_tasks",
    "worker_env",
]
