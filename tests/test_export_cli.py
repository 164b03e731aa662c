"""`hdmap-ad export` as a command in a workspace: where the file goes without --out (an ignored folder at the
repository root) and which training run it names when models/run.json is stale (after `dvc exp apply`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.mark.slow
def test_export_without_out_writes_an_ignored_file_and_names_the_run_after_exp_apply(tiny_pipeline, tmp_path):
    """`hdmap-ad export --model models/model.safetensors` (no --out), run from a subfolder of a workspace
    whose models/run.json names another model's run (what `dvc exp apply` leaves behind: run.json is not a
    DVC output): the file goes to exports/model.onnx at the repository root, a folder the repository's
    .gitignore ignores, and the export names the run tagged with the model's hash, not run.json's."""
    import shutil
    import subprocess

    from hdmap_ad.core.checkpoint import read
    from hdmap_ad.core.onnx_scorer import OnnxScorer

    work = tmp_path / "work"
    (work / ".git").mkdir(parents=True)  # the repository root, as repo_root() finds it
    (work / "models").mkdir()
    shutil.copy(tiny_pipeline.checkpoint, work / "models" / "model.safetensors")
    shutil.copy(tiny_pipeline.params_file, work / "params.yaml")
    stale = {"run_id": "0" * 32, "model_sha256": "f" * 64}  # the run of the model that was there before
    (work / "models" / "run.json").write_text(json.dumps(stale))
    (work / "sub").mkdir()
    bin_dir = Path(sys.executable).parent
    p = subprocess.run(
        [str(bin_dir / "hdmap-ad"), "export", "--params", "../params.yaml", "--model", "../models/model.safetensors"],
        capture_output=True,
        text=True,
        cwd=work / "sub",
        env=tiny_pipeline.env(),
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    out = work / "exports" / "model.onnx"
    assert sorted(x.name for x in (work / "sub").iterdir()) == [] and out.is_file()
    assert f"run {tiny_pipeline.run_id})" in p.stderr and "run unknown" not in p.stderr
    scorer = OnnxScorer(out)
    assert scorer.info["run_id"] == tiny_pipeline.run_id
    assert scorer.info["model_sha256"] == read(tiny_pipeline.checkpoint)[1]
    # the repository ignores the default folder (nothing untracked appears after an export)
    repo = Path(__file__).resolve().parents[1]
    ignored = subprocess.run(["git", "check-ignore", "-q", "exports/model.onnx"], cwd=repo, timeout=30)
    assert ignored.returncode == 0
