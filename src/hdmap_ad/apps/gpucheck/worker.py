"""One gpu-check task in a fresh interpreter: `python -m hdmap_ad.apps.gpucheck.worker TASK.json OUT.json`.

A task runs the pipeline functions the `hdmap-ad train` / `evaluate` commands call, in the task's own
folder, so the allocator high-water mark it reports is that task's alone:

  train    train (optionally stopped by a KeyboardInterrupt before step K, as a killed run is), then
           evaluate unless told not to
  pyfunc   load the run's logged MLflow pyfunc model and score one domain's test maps
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> dict[str, float]:
    """CUDA: the allocator's high-water marks since the last reset; CPU: the process's RSS high-water mark."""
    import torch

    if device.type == "cuda":
        return {
            "peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
        }
    import resource

    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # kB on Linux


def interrupt_before(step: int) -> None:
    """Make training raise KeyboardInterrupt when it is about to run `step`, as Ctrl-C or a kill would."""
    from hdmap_ad.pipeline import training

    original = training.train_step
    signature = inspect.signature(original)

    def stopping(*args: Any, **kwargs: Any):
        if signature.bind(*args, **kwargs).arguments["step"] == step:
            raise KeyboardInterrupt(f"gpu-check: stopped before step {step}")
        return original(*args, **kwargs)

    training.train_step = stopping


def task_train(spec: dict[str, Any]) -> dict[str, Any]:
    from hdmap_ad.core.config import load_params
    from hdmap_ad.core.runtime import select_device
    from hdmap_ad.pipeline import evaluation, training

    params = load_params("params.yaml")
    device = select_device(params.runtime.device)
    out: dict[str, Any] = {"device": str(device), "interrupted": False}
    if spec.get("interrupt_at"):
        interrupt_before(int(spec["interrupt_at"]))
    _reset_peak(device)
    start = time.perf_counter()
    try:
        summary = training.train(params)
    except KeyboardInterrupt:
        out.update(interrupted=True, train_s=time.perf_counter() - start, train_memory=_peak(device))
        return out
    _sync(device)
    out.update(
        train_s=time.perf_counter() - start,
        train_memory=_peak(device),
        run_id=summary["run_id"],
        bad_steps=summary["bad_steps"],
    )
    if spec.get("evaluate", True):
        _reset_peak(device)
        start = time.perf_counter()
        result = evaluation.evaluate(params)
        _sync(device)
        out.update(
            evaluate_s=time.perf_counter() - start,
            evaluate_memory=_peak(device),
            inference_precision=result["inference_precision"],
        )
    return out


def task_pyfunc(spec: dict[str, Any]) -> dict[str, Any]:
    import mlflow.pyfunc
    import numpy as np

    from hdmap_ad.pipeline.data import PreparedData
    from hdmap_ad.pipeline.serving import DEVICE_ENV

    os.environ[DEVICE_ENV] = spec["device"]
    mlflow.set_tracking_uri(spec["tracking_uri"])
    start = time.perf_counter()
    model = mlflow.pyfunc.load_model(f"runs:/{spec['run_id']}/model")
    load_s = time.perf_counter() - start
    maps = np.ascontiguousarray(
        PreparedData.load(Path(spec["prepared"])).maps(spec["domain"], "test"), dtype=np.float32
    )
    start = time.perf_counter()
    predictions = model.predict(maps, params={"domain": spec["domain"]})
    return {
        "load_s": load_s,
        "predict_s": time.perf_counter() - start,
        "scores": [float(s) for s in predictions["score"]],
    }


TASKS = {"train": task_train, "pyfunc": task_pyfunc}


def run_task(spec: dict[str, Any]) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    os.chdir(spec["workdir"])
    os.environ["MLFLOW_TRACKING_URI"] = spec["tracking_uri"]
    return TASKS[spec["task"]](spec)


if __name__ == "__main__":
    from hdmap_ad.core.files import write_json

    write_json(run_task(json.loads(Path(sys.argv[1]).read_text())), Path(sys.argv[2]))
