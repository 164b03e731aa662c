"""The `hdmap-ad grid` command line: the local executor (DVC queue) by default, Ray with --executor ray."""

from __future__ import annotations

import argparse

from hdmap_ad.apps.grid.local import DEFAULT_METHODS, DEFAULT_SEEDS, run_grid
from hdmap_ad.apps.parsing import add_command, int_list
from hdmap_ad.core.method_params import JOIN, METHODS


def cmd_grid(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.executor == "ray" or args.cluster:
        from hdmap_ad.apps.grid.cluster import run_grid_ray

        return run_grid_ray(
            args.params,
            methods,
            args.seeds,
            args.set or [],
            address=args.cluster or "auto",
            cpus_per_task=args.cpus_per_task,
            gpus_per_task=args.gpus_per_task,
            max_retries=args.max_retries,
            shared_dir=args.shared_dir,
            git_remote=args.git_remote,
            force=args.force,
            compare=not args.no_compare,
            dry_run=args.dry_run,
        ).code
    return run_grid(
        args.params,
        methods,
        args.seeds,
        args.set,
        args.jobs,
        compare=not args.no_compare,
        dry_run=args.dry_run,
        force=args.force,
        poll_s=args.poll,
    )


DESCRIPTION = """\
Queue the methods x seeds grid as DVC experiments and run it with --jobs parallel workers:

  1. create the MLflow store and experiment (before any worker starts)
  2. dvc exp run --queue -S method=<methods> -S seed=<seeds> [-S KEY=VALUE ...]
  3. dvc queue start -j <jobs>
  4. wait until the queue has run this grid (progress from `dvc queue status`)
  5. name failed experiments, each with the last lines of its log (`dvc queue logs NAME`)
  6. hdmap-ad compare

Untracked files are not copied into queued experiments: commit (or git add) your changes first.
On a machine with several GPUs each training claims a GPU of its own (runtime.device=auto).
Ctrl-C stops waiting; the queue keeps running (`dvc queue status`).

--executor ray --cluster ADDRESS runs each (method, seed) as a Ray task on an existing Ray cluster
instead (docs/multi-machine.md): every node clones the pushed commit, runs the same `dvc exp run
-S method=... -S seed=...` logging to the shared MLflow server (MLFLOW_TRACKING_URI) and pushes the
experiment; a task whose node dies is retried, a failing one is named; finished pairs are skipped.
"""


def methods_help() -> str:
    """The methods --methods takes, one line each, from the method list (hdmap_ad.core.method_params)."""
    lines = [f"  {name:<10}{spec.summary}" for name, spec in METHODS.items()]
    return (
        "methods (README, Methods; docs/design.md §5):\n"
        + "\n".join(lines)
        + f"\n  {JOIN.join(['topk', 'hseg']):<10}parts joined by {JOIN} combine (one part per hook: a loss, the map, the\n"
        "            bottleneck input, the decoder values); a combination is a method of its own in MLflow and compare\n"
    )


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = add_command(
        sub,
        common,
        "grid",
        "run a methods x seeds grid through the DVC queue, then compare",
        DESCRIPTION + "\n" + methods_help(),
    )
    # `--set` (from the common options) and its short form -S are passed to `dvc exp run` as -S KEY=VALUE.
    p.add_argument(
        "-S",
        dest="set",
        action="append",
        metavar="KEY=VALUE",
        help="parameter override for every experiment (same as --set; passed to dvc exp run -S)",
    )
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma list (default: {','.join(DEFAULT_METHODS)})"
    )
    p.add_argument(
        "--seeds",
        type=int_list,
        default=list(DEFAULT_SEEDS),
        help=f"comma list (default: {','.join(map(str, DEFAULT_SEEDS))})",
    )
    p.add_argument("-j", "--jobs", type=int, default=1, help="parallel queue workers (default: 1)")
    p.add_argument(
        "--force",
        action="store_true",
        help="dvc exp run --force: rerun even when the run cache has the result (ray: also rerun pairs "
        "already finished and evaluated at this commit)",
    )
    p.add_argument("--no-compare", action="store_true", help="do not run `hdmap-ad compare` at the end")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between `dvc queue status` polls (default: 10)")
    ray = p.add_argument_group("Ray executor (docs/multi-machine.md)")
    ray.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: the DVC queue on this machine (default); ray: one task per (method, seed) on a Ray cluster",
    )
    ray.add_argument(
        "--cluster",
        metavar="ADDRESS",
        default=None,
        help="Ray cluster address: auto, HOST:PORT (the head's GCS) or ray://HOST:10001; implies --executor ray",
    )
    ray.add_argument(
        "--cpus-per-task", type=float, default=1.0, help="CPUs a task asks for when the cluster has no GPU (default: 1)"
    )
    ray.add_argument(
        "--gpus-per-task",
        type=float,
        default=None,
        help="GPUs a task asks for (default: 1 when the cluster has GPUs, else 0)",
    )
    ray.add_argument(
        "--max-retries",
        type=int,
        default=2,
        help="re-runs of a task whose worker or node died (default: 2); a task that fails by itself is never retried",
    )
    ray.add_argument(
        "--shared-dir",
        default=None,
        metavar="DIR",
        help="work dirs on a file system every node mounts at DIR: a retried task resumes from the dead "
        "attempt's checkpoint (default: each node's temp dir; a retry restarts)",
    )
    ray.add_argument(
        "--git-remote",
        default="origin",
        help="the git remote the nodes clone the commit from and push experiments to (default: origin)",
    )
    p.set_defaults(func=cmd_grid)
    return p
