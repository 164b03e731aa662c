"""One benchmark phase in a fresh interpreter: `python -m hdmap_ad.apps.bench.worker SPEC.json OUT.json`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from hdmap_ad.apps.bench.measure import maxrss_mb, phase_matmul, rss_mb
from hdmap_ad.apps.bench.ours import phase_ours_infer, phase_ours_train
from hdmap_ad.apps.bench.reference import phase_anomalib_infer, phase_anomalib_train


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one phase in this process (called in a fresh subprocess by `_run_phase`)."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    phase = spec["phase"]
    # Both stacks are imported in every model phase (when anomalib is compared), so all phases
    # start from the same interpreter state and RSS baseline; import costs are nobody's memory.
    if phase.startswith("anomalib") or (phase.startswith("ours") and spec.get("anomalib")):
        import anomalib.models.image.dinomaly  # noqa: F401
        import torchvision.transforms.v2  # noqa: F401
    if phase.startswith("ours") or (phase.startswith("anomalib")):
        import timm  # noqa: F401  (imported lazily by both models' constructors)
        import timm.models.vision_transformer  # noqa: F401

        import hdmap_ad.core.features  # noqa: F401
        import hdmap_ad.core.inference  # noqa: F401
        import hdmap_ad.pipeline.training  # noqa: F401
    rss0 = rss_mb()
    load0 = os.getloadavg()[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = {
        "matmul": phase_matmul,
        "ours_train_cache_on": lambda s, d: phase_ours_train(s, d, "on"),
        "ours_train_cache_off": lambda s, d: phase_ours_train(s, d, "off"),
        "ours_infer": phase_ours_infer,
        "anomalib_train": phase_anomalib_train,
        "anomalib_infer": phase_anomalib_infer,
    }[phase]
    out = run(spec, device)
    peak_rss = maxrss_mb()
    out.update(
        phase=phase,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        rss_after_imports_mb=rss0,
        peak_rss_mb=peak_rss,
        loadavg_start=load0,
        loadavg_end=os.getloadavg()[0],
    )
    if device.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_mb"] = peak_rss - rss0
    return out


if __name__ == "__main__":
    from hdmap_ad.core.files import write_json

    write_json(run_worker(json.loads(Path(sys.argv[1]).read_text())), Path(sys.argv[2]))
