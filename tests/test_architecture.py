"""The package's shape: layers whose imports run one way, and DVC stages that depend on all the code
they run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import yaml

import shipped

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "hdmap_ad"
# Each DVC stage and the module its command runs (the CLI only dispatches to it). Modules that are
# loaded by path rather than imported (the MLflow model code) are listed with the stage that logs them.
STAGE_ENTRY = {
    "synth": ["hdmap_ad.pipeline.synth"],
    "prepare": ["hdmap_ad.pipeline.data"],
    "configure": ["hdmap_ad.core.config"],
    "train": ["hdmap_ad.pipeline.training", "hdmap_ad.pipeline.pyfunc_model"],
    "evaluate": ["hdmap_ad.pipeline.evaluation"],
    "compare": ["hdmap_ad.apps.compare"],
}


def test_import_contracts_hold():
    """apps -> pipeline -> core, never upwards, and no cycles inside a layer (pyproject's
    [tool.importlinter] contracts, checked by import-linter)."""
    lint = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def _module_file(module: str) -> Path:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRY))
def test_stage_deps_cover_every_module_the_stage_runs(stage):
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_ENTRY), "a stage was added or renamed: list its entry module here"
    deps = [REPO / d for d in stages[stage].get("deps", []) if not str(d).startswith("${")]
    graph = grimp.build_graph("hdmap_ad")
    runs = set()
    for entry in STAGE_ENTRY[stage]:
        runs |= {entry} | {m for m in graph.find_upstream_modules(entry) if m.startswith("hdmap_ad.")}
    runs.discard("hdmap_ad")
    missing = []
    for module in sorted(runs):
        f = _module_file(module)
        if not any(f == d or d in f.parents for d in deps):
            missing.append(str(f.relative_to(REPO)))
    assert not missing, f"dvc.yaml stage {stage!r} runs code it does not depend on: {missing}"


def test_the_code_fingerprint_in_a_model_file_covers_exactly_what_training_runs():
    """The model file stores a hash of the code training runs. It must cover every module training imports
    (else a code change would resume an old state) and nothing else (else an edit of compare or the CLI,
    which does not rerun train, would change the model's bytes and leave a fresh clone's dvc.lock dirty)."""
    from hdmap_ad.pipeline.training import code_files

    graph = grimp.build_graph("hdmap_ad")
    entry = "hdmap_ad.pipeline.training"
    runs = {entry} | {m for m in graph.find_upstream_modules(entry) if m.startswith("hdmap_ad.")}
    packages = {".".join(m.split(".")[:i]) for m in runs for i in range(1, len(m.split(".")))}
    assert set(code_files()) == {_module_file(m) for m in runs | packages}
    assert not any("apps" in f.parts for f in code_files())


def test_params_load_without_torch_and_method_schemas_come_from_one_place():
    """One params loader for every command, torch-free (compare and grid run where torch is absent);
    each method plug-in takes its schema from the same table the loader validates with."""
    code = (
        "import sys; from hdmap_ad.core.config import load_params; "
        f"load_params({str(shipped.params_file())!r}); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"

    from hdmap_ad.core import methods
    from hdmap_ad.core.method_params import METHOD_PARAMS

    assert list(methods.REGISTRY) == list(METHOD_PARAMS)
    assert all(methods.REGISTRY[name].Params is schema for name, schema in METHOD_PARAMS.items())


def test_output_paths_are_named_once_and_match_dvc_yaml():
    """Stages write where dvc.yaml says: every DVC output of the pipeline is a path of
    hdmap_ad.core.paths, and the code's paths that DVC tracks appear in dvc.yaml."""
    from hdmap_ad.core import paths

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    declared = set()
    for stage in stages.values():
        for section in ("outs", "metrics"):
            for out in stage.get(section, []):
                declared.add(next(iter(out)) if isinstance(out, dict) else out)
    declared = {d for d in declared if not d.startswith("${")}
    named = {str(v) for k, v in vars(paths).items() if k.isupper() and isinstance(v, Path)}
    assert declared <= named, f"dvc.yaml outputs not named in hdmap_ad.core.paths: {declared - named}"
    untracked = {str(paths.STATE_FILE), str(paths.RUN_FILE), str(paths.REPORT_FILE), str(paths.REPORT_PLOTS_DIR)}
    assert named - untracked == declared


def test_the_centre_crop_offset_is_computed_in_one_place():
    """Preprocessing, the masks' geometry and the plots' crop frame must agree on where the crop sits: only
    core/preprocess.py computes the offset; everything else calls `center_crop_offset`."""
    pattern = re.compile(r"round\(\(\s*\w+\s*-\s*\w+\s*\)\s*/\s*2")
    computing = sorted(
        str(f.relative_to(REPO)) for f in PACKAGE.rglob("*.py") if pattern.search(f.read_text(encoding="utf-8"))
    )
    assert computing == ["src/hdmap_ad/core/preprocess.py"]


def test_the_tests_build_one_tiny_encoder():
    """Every test's tiny encoder is tests/tiny.py's (or named as a variant of it), so changing it changes
    them all: no test module spells out its size again."""
    spelled = re.compile(r"""embed_dim["']?\s*[:=]\s*\d""")
    again = [
        f"{f.name}: {line.strip()}"
        for f in sorted((REPO / "tests").glob("*.py"))
        if f.name != "tiny.py"
        for line in f.read_text().splitlines()
        if spelled.search(line) and "**" not in line  # `{**tiny.ENCODER, "embed_dim": 64}` is a named variant
    ]
    assert again == []


def test_the_settings_that_make_runs_comparable_are_listed_once():
    """Which settings pair runs (comparison_key) and which differences compare names come from one place:
    core/config.py's NOT_TRAINING_SECTIONS / NOT_COMPARED_KEYS. A second literal list of those names
    elsewhere would drift from the key (as compare's own list once did, naming train.amp_resolved)."""
    import ast

    names = {
        "runtime",
        "evaluate",
        "mlflow",
        "compare",
        "synth",
        "profile",
        "method",
        "seed",
        "data.root",
        "data.prepared",
    }
    found = []
    for f in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                words = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                if len(words & names) >= 3:
                    found.append(f"{f.relative_to(REPO)}:{node.lineno}")
    assert len(found) == 2 and all(x.startswith("src/hdmap_ad/core/config.py:") for x in found), found

    from hdmap_ad.core.config import Params, flatten, is_compared_setting

    p = Params()
    assert set(flatten(p.comparable_config())) == {k for k in flatten(p.resolved()) if is_compared_setting(k)}
