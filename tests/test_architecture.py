"""The package's shape: layers whose imports run one way, and DVC stages that depend on all the code
they run."""

from __future__ import annotations

import ast
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


def test_the_method_list_is_defined_once():
    """hdmap_ad.core.method_params.METHODS is the list: the plug-ins register exactly its names in its order
    with its schemas, override exactly the hooks it declares, params.yaml has exactly its sections with
    their defaults, and no other module keeps a list of method names."""
    from hdmap_ad.core import methods
    from hdmap_ad.core.method_params import METHODS
    from hdmap_ad.core.methods.base import Method

    assert list(methods.REGISTRY) == list(METHODS)
    assert all(methods.REGISTRY[name].Params is spec.params for name, spec in METHODS.items())
    base = methods.REGISTRY["baseline"]
    for name, cls in methods.REGISTRY.items():
        if name == "baseline":
            continue
        own_loss = cls.loss is not base.loss
        own_map = cls.reduce_maps is not Method.reduce_maps
        own_model_hook = cls.attach is not Method.attach
        hooks = METHODS[name].hooks
        assert own_loss == ("loss" in hooks), name
        assert own_map == ("map" in hooks), name
        assert own_model_hook == bool(hooks & {"bottleneck_input", "decoder_values"}), name

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    top_level = set(raw) - {"profiles"}
    from hdmap_ad.core.config import Params

    sections = top_level - set(Params.model_fields)
    assert sections == set(METHODS), "params.yaml's method sections differ from hdmap_ad.core.method_params.METHODS"
    for name, spec in METHODS.items():
        assert spec.params.model_validate(raw[name]) == spec.params(), (
            f"params.yaml `{name}:` differs from its defaults"
        )

    # a second list of the names anywhere in src/ (a tuple for a CLI default, a dict of labels) would drift
    names = [n for n in METHODS if n != "baseline"]
    for f in sorted((REPO / "src").rglob("*.py")):
        if f.name == "method_params.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            elts = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
            if isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict)):
                found = {e.value for e in elts if isinstance(e, ast.Constant) and e.value in names}
                assert len(found) < 3, f"{f.relative_to(REPO)}:{node.lineno} lists methods {sorted(found)}"


def test_each_model_setting_is_defined_once():
    """A model setting is declared once, in hdmap_ad.core.config.ModelParams: the model's config is that
    class plus the input size, params.yaml's `model:` section has exactly its keys, and no other class in
    src/ declares a field of the same name."""
    from hdmap_ad.core import checkpoint
    from hdmap_ad.core.config import ModelParams
    from hdmap_ad.core.model import DinomalyConfig

    assert issubclass(DinomalyConfig, ModelParams)
    assert set(DinomalyConfig.model_fields) - set(ModelParams.model_fields) == {"image_size"}
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw["model"]) == set(ModelParams.model_fields)
    from hdmap_ad.core.config import load_params

    params = load_params(shipped.params_file())
    cfg = checkpoint.dinomaly_config(params)
    assert cfg.model_dump(exclude={"image_size"}) == params.model.model_dump()  # every setting reaches the model
    fields = set(ModelParams.model_fields) - {"encoder", "weights"}  # generic words other sections use too
    for f in sorted((REPO / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ClassDef) and node.name != "ModelParams":
                declared = {
                    s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                }
                assert not declared & fields, f"{f.relative_to(REPO)}: {node.name} declares {sorted(declared & fields)}"


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
