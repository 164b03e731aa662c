"""The package's shape: layers whose imports run one way, and DVC stages that depend on all the code
they run."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
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


def _lint_imports(src: Path = PACKAGE.parent) -> subprocess.CompletedProcess:
    """import-linter's verdict on pyproject's contracts for the package under `src`."""
    lint = Path(sys.executable).parent / "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(lint), "--no-cache"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    """apps -> pipeline -> core, never upwards, no cycles inside a layer, and core free of mlflow, dvc, ray
    and onnxruntime (pyproject's [tool.importlinter] contracts, checked by import-linter): every contract
    runs and is kept."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    out = _lint_imports()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert f"{len(contracts)} kept, 0 broken" in out.stdout
    forbidden = next(c for c in contracts if c["type"] == "forbidden")
    assert forbidden["source_modules"] == ["hdmap_ad.core"]
    assert set(forbidden["forbidden_modules"]) == {"mlflow", "dvc", "ray", "onnxruntime"}


@pytest.mark.parametrize(("module", "line"), [("core/files.py", "import mlflow"), ("core/devices.py", "import ray")])
def test_the_core_contract_catches_a_tracking_import_in_core(tmp_path, module, line):
    """The forbidden-imports contract is live: the same package with one such import in core (even inside
    a function, where find_run's `import mlflow` sat) breaks it."""
    shutil.copytree(PACKAGE, tmp_path / "hdmap_ad", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "hdmap_ad" / module
    target.write_text(target.read_text() + f"\n\ndef _late() -> None:\n    {line}\n")
    out = _lint_imports(tmp_path)
    assert out.returncode != 0
    assert f"hdmap_ad.{module[:-3].replace('/', '.')} -> {line.split()[1]}" in out.stdout


def _private_imports(root: Path) -> list[str]:
    """`from hdmap_ad.x import _y` (or `from . import _y`) in another module, and `x._y` on an imported
    hdmap_ad module: a private name used outside the module that defines it."""
    found = []
    for f in sorted(root.rglob("*.py")):
        module = ".".join(f.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        package = module if f.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                if not base.startswith("hdmap_ad"):
                    continue
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{f.relative_to(root.parent)}:{node.lineno}: from {base} import {a.name}")
                    if _module_file(f"{base}.{a.name}").is_file():
                        aliases.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                aliases |= {a.asname for a in node.names if a.asname and a.name.startswith("hdmap_ad.")}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append(f"{f.relative_to(root.parent)}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_private_name_is_used_across_modules():
    assert _private_imports(PACKAGE) == []


def test_the_private_name_scan_finds_one(tmp_path):
    """The scan above is not vacuous: it reports both spellings in a copy of the package that has them."""
    shutil.copytree(PACKAGE, tmp_path / "hdmap_ad", ignore=shutil.ignore_patterns("__pycache__"))
    cli = tmp_path / "hdmap_ad" / "apps" / "cli.py"
    cli.write_text(
        cli.read_text()
        + "\n\ndef _x():\n    from hdmap_ad.core.checkpoint import _escape\n"
        + "    from hdmap_ad.core import checkpoint\n    return _escape, checkpoint._canonical\n"
    )
    found = _private_imports(tmp_path / "hdmap_ad")
    assert [line.split(": ", 1)[1] for line in found] == [
        "from hdmap_ad.core.checkpoint import _escape",
        "checkpoint._canonical",
    ]


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


def _readme_stage_layers() -> dict[str, str]:
    """stage -> layer, from the README's layout tree: `core/ ... (DVC stage here: configure)`."""
    readme = (REPO / "README.md").read_text()
    tree = readme.split("## Layout", 1)[1].split("```", 2)[1]
    layers, layer = {}, None
    for line in tree.splitlines():
        named = re.match(r"  (core|pipeline|apps)/ ", line)
        layer = named.group(1) if named else (layer if line.startswith(" " * 39) else None)
        found = re.search(r"\(DVC stages? here: ([a-z, ]+)", line)
        if found and layer:
            for stage in found.group(1).split(","):
                layers[stage.strip().split()[0]] = layer
    return layers


def _cli_hands_off_to(func) -> set[str]:
    """The hdmap_ad modules a `hdmap-ad` subcommand's function runs: its own module, and, for a function of
    cli.py (which only dispatches), the modules it and the cli.py helpers it calls import."""
    import inspect

    if func.__module__ != "hdmap_ad.apps.cli":
        return {func.__module__}
    from hdmap_ad.apps import cli

    modules, todo, seen = set(), [func], set()
    while todo:
        f = todo.pop()
        seen.add(f)
        for node in ast.walk(ast.parse(inspect.getsource(f))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hdmap_ad."):
                modules.add(node.module)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                helper = getattr(cli, node.func.id, None)
                if inspect.isfunction(helper) and helper.__module__ == cli.__name__ and helper not in seen:
                    todo.append(helper)
    return modules


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRY))
def test_each_stage_entry_is_in_the_layer_the_readme_names(stage):
    """A dvc.yaml stage's command reaches its entry module (STAGE_ENTRY, whose imports the deps test
    checks), and that module lives in the layer the README's layout gives the stage (docs/design.md#pipe-stages
    says the same): the layers' descriptions cannot drift from where the stages are."""
    from hdmap_ad.apps.cli import build_parser

    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"].split()
    assert cmd[:2] == ["PYTHONPATH=src", "hdmap-ad"], cmd
    func = build_parser().parse_args(cmd[2:]).func
    entry = STAGE_ENTRY[stage][0]
    reached = _cli_hands_off_to(func)
    assert any(m == entry or m.startswith(entry + ".") for m in reached), f"`{' '.join(cmd[1:])}` runs {reached}"
    assert _readme_stage_layers().get(stage) == entry.split(".")[1], f"README's layout does not put {stage} in {entry}"


def test_the_readme_names_a_layer_for_every_stage_and_nothing_else():
    assert set(_readme_stage_layers()) == set(STAGE_ENTRY)


def test_the_code_fingerprint_in_a_model_file_covers_exactly_what_training_runs():
    """The model file stores a hash of the code training runs. It must cover every module training imports
    (else a code change would resume an old state) and nothing else (else an edit of compare or the CLI,
    which does not rerun train, would change the model's bytes and leave a fresh clone's dvc.lock dirty)."""
    from hdmap_ad.pipeline.fingerprint import code_files

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


def test_every_method_is_documented():
    """Step 5 of the recipe in core/methods/__init__.py: each entry of METHODS has its design.md subsection
    (anchor m-<name>) and a README methods-table row naming its section's settings, and neither names a
    method that METHODS lacks."""
    from hdmap_ad.core.method_params import METHODS

    design = (REPO / "docs" / "design.md").read_text()
    readme = (REPO / "README.md").read_text()
    assert set(re.findall(r'<a id="m-([a-z0-9]+)"></a>', design)) - {"combine"} == set(METHODS)
    rows = dict(re.findall(r"^\| `([a-z0-9]+)` \|.*\| `\1: (\{[^}]*\})` \|$", readme, re.M))
    assert set(rows) == set(METHODS)
    for name, spec in METHODS.items():
        fields = [f for f in rows[name].strip("{}").split(", ") if f]
        assert fields == list(spec.params.model_fields), f"README's methods table: {name} lists {fields}"


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


def _params_schemas() -> dict[str, set[str]]:
    """Each settings class of params.yaml (the sections and the method schemas) -> its field names."""
    import inspect

    from pydantic import BaseModel

    from hdmap_ad.core import config, method_params

    return {
        name: set(cls.model_fields)
        for module in (config, method_params)
        for name, cls in vars(module).items()
        if inspect.isclass(cls) and issubclass(cls, BaseModel) and cls.__module__ == module.__name__
        if cls.model_fields and name != "Params"  # Params' own fields are the section names
    }


def _copied_settings(root: Path) -> list[str]:
    """Classes outside the two schema modules that give defaults to two or more settings of one params
    section or method schema: a second definition of those settings (its defaults and checks would drift)."""
    schemas = _params_schemas()
    found = []
    for f in sorted(root.rglob("*.py")):
        if f.name in ("config.py", "method_params.py") and f.parent.name == "core":
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            defaults = {
                s.target.id
                for s in node.body
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value is not None
            }
            for schema, fields in schemas.items():
                if len(defaults & fields) >= 2:
                    found.append(
                        f"{f.relative_to(root.parent)}: {node.name} copies {schema} {sorted(defaults & fields)}"
                    )
    return found


def test_each_params_setting_is_defined_once():
    """Every setting's default and check live in its params.yaml schema (core/config.py, core/method_params.py);
    what another layer needs from a section is that class or a subclass of it (the model's, the synthetic
    generator's and compare's settings are), never a copy: e.g. the score section once had a dataclass twin
    in model.py, and serve's limits and compare's settings repeated their sections' defaults."""
    from hdmap_ad.apps.compare.settings import Settings
    from hdmap_ad.core.config import CompareParams, MlflowParams, SynthParams
    from hdmap_ad.pipeline.synth import SynthConfig

    assert _copied_settings(PACKAGE) == []
    assert issubclass(SynthConfig, SynthParams)
    assert set(SynthConfig.model_fields) - set(SynthParams.model_fields) == {"domains"}
    assert issubclass(Settings, CompareParams) and issubclass(Settings, MlflowParams)


def test_the_copied_settings_scan_finds_one(tmp_path):
    """The scan above is not vacuous: a dataclass repeating the score section's defaults is reported."""
    pkg = tmp_path / "hdmap_ad"
    pkg.mkdir()
    (pkg / "scoring.py").write_text(
        "from dataclasses import dataclass\n\n\n@dataclass\nclass ScoreConfig:\n"
        "    size: tuple[int, int] = (256, 256)\n    blur_kernel: int = 5\n    top_ratio: float = 0.01\n"
    )
    assert _copied_settings(pkg) == [
        "hdmap_ad/scoring.py: ScoreConfig copies ScoreParams ['blur_kernel', 'size', 'top_ratio']"
    ]


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


LONG_FILE_LINES = 450
LONG_FILE_REASON = re.compile(r"\(Over 450 lines: (.+?)\)\s*$", re.S | re.M)


def test_a_file_over_450_lines_says_why_in_its_docstring():
    """A module over 450 lines gives its reason in its docstring, as a paragraph `(Over 450 lines: <why>.)`,
    so a long file is a decision someone wrote down; one that has shrunk below drops the stale reason."""
    unexplained, stale = [], []
    for f in sorted(PACKAGE.rglob("*.py")):
        text = f.read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(text)) or ""
        reason = LONG_FILE_REASON.search(doc)
        long = len(text.splitlines()) > LONG_FILE_LINES
        if long and not (reason and len(reason.group(1).split()) >= 8):
            unexplained.append(f"{f.relative_to(REPO)} ({len(text.splitlines())} lines)")
        if not long and "Over 450 lines" in text:
            stale.append(str(f.relative_to(REPO)))
    assert not unexplained, (
        f"over {LONG_FILE_LINES} lines without '(Over 450 lines: <why>)' in the docstring: {unexplained}"
    )
    assert not stale, f"under {LONG_FILE_LINES} lines but still saying why it is over: {stale}"


def test_the_suites_longest_first_list_names_existing_test_modules():
    """tests/conftest.py starts these modules first on the xdist workers; a renamed module would silently
    lose its place (and the full suite its packing)."""
    from conftest import LONGEST_FIRST

    missing = [name for name in LONGEST_FIRST if not (REPO / "tests" / name).is_file()]
    assert not missing, f"LONGEST_FIRST names modules that do not exist: {missing}"
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
