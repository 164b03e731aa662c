"""Runs whose process is gone: recorded at start, ended (KILLED, with a note) the next time the
workspace trains or compares (docs/design.md#pipe-mlflow).

A killed `hdmap-ad train` leaves its MLflow run RUNNING forever (MLflow ends a run only from the
process that holds it). Training tags its run with the process id, the host name and the process's
start time; a RUNNING run whose process on this host no longer exists (or whose pid now belongs to
another process, told apart by its start time) is an orphan. Runs started on other hosts, and runs
without these tags, cannot be checked and are left alone. Resuming an ended run sets it RUNNING
again (MLflow does so when a run is reopened), with fresh tags.
"""

from __future__ import annotations

import socket
import time
from typing import Any

PID_TAG = "hdmap_ad.pid"
HOST_TAG = "hdmap_ad.host"
STARTED_TAG = "hdmap_ad.process_started"
NOTE_TAG = "hdmap_ad.ended_note"


def process_tags() -> dict[str, str]:
    """The tags that let a later process tell whether this one is still alive."""
    import psutil

    me = psutil.Process()
    return {PID_TAG: str(me.pid), HOST_TAG: socket.gethostname(), STARTED_TAG: f"{me.create_time():.2f}"}


def process_gone(tags: dict[str, str]) -> bool:
    """True when the tags name a process on this host that no longer runs; False when it runs, or
    when that cannot be told (another host, no tags)."""
    import psutil

    if tags.get(HOST_TAG) != socket.gethostname() or not str(tags.get(PID_TAG, "")).isdigit():
        return False
    try:
        started = psutil.Process(int(tags[PID_TAG])).create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # e.g. access denied: it exists
        return False
    try:
        return abs(started - float(tags.get(STARTED_TAG, ""))) > 1.0  # the pid was reused by another process
    except ValueError:
        return False


def end_orphan_runs(client: Any, experiment_ids: list[str], by: str) -> list[Any]:
    """Set every RUNNING run of `experiment_ids` whose process is gone to KILLED with a note naming
    `by` (the command that noticed); return those runs."""
    runs = client.search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=1000)
    ended = []
    for run in runs:
        tags = run.data.tags
        if not process_gone(tags):
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        client.set_tag(
            run.info.run_id,
            NOTE_TAG,
            f"process {tags.get(PID_TAG)} on {tags.get(HOST_TAG)} was gone at {when}; ended as KILLED by {by}",
        )
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run)
    return ended
