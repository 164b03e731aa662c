"""Fail fast on the MLflow tracking store: reachable (and writable) within seconds, or one line.

MLflow's HTTP client retries a dead address for minutes (7 retries with back-off, 120 s timeouts:
`init-tracking` took 272 s to say so), and a read-only sqlite file is only found at the first write,
after the slow work. Every command that uses the store calls `check_store` first
(README.md, "Failures"):

- reachable: one read (`search_experiments`, at most one result) with MLflow's HTTP retries off and
  a short timeout (STORE_TIMEOUT_S, or MLFLOW_HTTP_REQUEST_TIMEOUT when the user set it lower);
- writable: one write that changes nothing anyone reads, an experiment tag holding the time of the
  last check, on the experiment the command logs to.

A local sqlite store whose file is missing is not an error here (it is created); `find_run` refuses it
where an existing run must be found.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator

from hdmap_ad.core.errors import HdmapError

STORE_TIMEOUT_S = 5
CHECK_TAG = "hdmap_ad.store_checked_at"


@contextlib.contextmanager
def short_http_timeouts(seconds: int = STORE_TIMEOUT_S) -> Iterator[None]:
    """MLflow's HTTP calls inside the block: no retries, `seconds` timeout (unless the user set less)."""
    keys = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    old = {k: os.environ.get(k) for k in keys}
    user_timeout = old["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    if not (user_timeout and user_timeout.isdigit() and int(user_timeout) < seconds):
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(seconds)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _reason(err: BaseException, timeout: int) -> str:
    """The useful part of a store error: MLflow wraps the socket's own words in a long sentence."""
    text = str(getattr(err, "message", None) or err)
    for pattern, short in (
        (r"Connection refused", "connection refused"),
        (r"timed out|Timeout", f"no answer within {timeout} s"),
        (r"Name or service not known|nodename nor servname|getaddrinfo failed", "unknown host name"),
        (r"readonly database|read-only", "the database is read-only"),
        (r"unable to open database file", "cannot open the database file"),
        (r"malformed|file is not a database", "the database file is damaged (truncated or not sqlite)"),
    ):
        if re.search(pattern, text):
            return short
    return (text.strip().splitlines() or [type(err).__name__])[0][:200]


def _advice(uri: str, write: bool) -> str:
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    if write:
        return (
            "make the database file and its folder writable, or point MLFLOW_TRACKING_URI (mlflow.tracking_uri) "
            "at a writable store"
            if local
            else "check your write access on the tracking server"
        )
    if local:
        return "check the path, or point MLFLOW_TRACKING_URI (mlflow.tracking_uri) at the store"
    return (
        "start the tracking server or point MLFLOW_TRACKING_URI (mlflow.tracking_uri) at a reachable one "
        "(unset, the local sqlite store mlflow.db is used)"
    )


def check_store(uri: str, experiment_id: str | None = None, write: bool = True) -> None:
    """Raise HdmapError (one line naming `uri` and what to do) unless the store at `uri` answers
    within seconds and, with `write` and `experiment_id`, accepts a write to that experiment."""
    import mlflow

    from hdmap_ad.pipeline.tracking import sqlite_file

    db = sqlite_file(uri)
    if db is not None and not db.is_file():  # nothing to reach; opening it would create it (callers decide)
        return
    started = time.monotonic()
    # MLflow's sqlite store logs each database error with its traceback before raising it
    db_log = logging.getLogger("mlflow.store.db.utils")
    with short_http_timeouts(), _muted(db_log):
        try:
            client = mlflow.MlflowClient(uri)
            client.search_experiments(max_results=1)
        except Exception as err:  # MlflowException, requests and sqlalchemy errors: all "unusable store"
            raise HdmapError(
                f"MLflow store {uri}: {'cannot be read' if db is not None else 'not reachable'} ({_reason(err, STORE_TIMEOUT_S)}, after "
                f"{time.monotonic() - started:.0f} s); " + _advice(uri, write=False)
            ) from None
        if write and experiment_id is not None:
            try:
                client.set_experiment_tag(experiment_id, CHECK_TAG, str(int(time.time())))
            except Exception as err:
                raise HdmapError(
                    f"MLflow store {uri}: not writable ({_reason(err, STORE_TIMEOUT_S)}); " + _advice(uri, write=True)
                ) from None


def is_store_error(err: BaseException) -> bool:
    """Whether `err` comes from talking to the tracking store (MLflow, HTTP, database), not from our code."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, (MlflowException, ConnectionError, TimeoutError)):
        return True
    module = type(err).__module__ or ""
    return module.split(".")[0] in ("requests", "urllib3", "sqlalchemy", "sqlite3")


def store_failed(uri: str, err: BaseException, kept: str) -> HdmapError:
    """The one line for a store that failed while a command logged: what failed, then what was kept."""
    return HdmapError(f"MLflow store {uri}: logging failed ({_reason(err, STORE_TIMEOUT_S)}); {kept}")


def open_experiment(name: str, configured_uri: str | None = None) -> str:
    """The id of experiment `name` (created if missing) in a store that answered and took a write,
    all within seconds; else one HdmapError line. Commands that log call this before their slow work."""
    from hdmap_ad.pipeline.tracking import ensure_experiment, tracking_uri

    uri = tracking_uri(configured_uri)
    check_store(uri, write=False)
    with short_http_timeouts(), _muted(logging.getLogger("mlflow.store.db.utils")):
        try:
            experiment_id = ensure_experiment(name, configured_uri)
        except HdmapError as err:  # creating the experiment is the first write
            raise HdmapError(
                f"MLflow store {uri}: cannot create experiment {name!r} ({_reason(err, STORE_TIMEOUT_S)}); "
                + _advice(uri, write=True)
            ) from None
    check_store(uri, experiment_id, write=True)
    return experiment_id


@contextlib.contextmanager
def _muted(logger: logging.Logger) -> Iterator[None]:
    old = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(old)
