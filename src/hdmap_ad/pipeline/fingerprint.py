"""What a training run must match: the code it runs (hashed into the model file and the resume state's
fingerprint) and, under DVC, the configuration the `configure` stage resolved."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

from hdmap_ad.core.config import Params
from hdmap_ad.core.errors import HdmapError

TRAINING_ENTRY = "hdmap_ad.pipeline.training"  # the module whose code a trained model depends on


def code_files(entry: str = TRAINING_ENTRY) -> list[Path]:
    """The source files of `entry` and every hdmap_ad module it imports, directly or not (anywhere in a
    file, as the DVC stage deps are checked), with the packages' __init__ files: the code training runs."""
    src = Path(__file__).resolve().parents[2]  # the folder holding the hdmap_ad package

    def source(module: str) -> Path | None:
        base = src / module.replace(".", "/")
        for f in (base / "__init__.py", base.with_suffix(".py")):
            if f.is_file():
                return f
        return None  # a name imported from a module, not a module

    seen: dict[str, Path] = {}
    todo = [entry]
    while todo:
        module = todo.pop()
        if module in seen or (f := source(module)) is None:
            continue
        seen[module] = f
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run on import
        for node in ast.walk(ast.parse(f.read_bytes(), str(f))):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        todo = [m for m in todo if m == "hdmap_ad" or m.startswith("hdmap_ad.")]
    return sorted(seen.values())


def code_digest() -> str:
    """Hash of the code training runs (`code_files`): a change there must not resume an old run's state.
    Only that code: the fingerprint is stored in the model file, and DVC reruns train exactly when that
    code changes, so a change elsewhere (compare, the CLI) must not change the model's bytes."""
    src = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for f in code_files():
        h.update(f.relative_to(src).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_fingerprint(params: Params, data_digest: str, precision: str = "") -> str:
    """What a training state must match to be resumed: configuration, code, prepared data and the precision
    train.amp resolved to (train.amp=auto may mean bf16 on one machine and float32 on another)."""
    parts = f"{params.training_fingerprint()}:{code_digest()}:{data_digest}:{precision}"
    return hashlib.sha256(parts.encode()).hexdigest()[:16]


def check_config_unchanged(
    params: Params, expected_config: Path | None, params_file: Path | str | None, overrides: list[str] | None = None
) -> None:
    """Under DVC: the params this run trains with must still be the ones the `configure` stage resolved,
    and params.yaml must still say so. A second `dvc exp run` in the same workspace writes its `-S`
    values into params.yaml before failing on DVC's lock; without this check the first run would finish
    and DVC would record the other values beside a model trained with these."""
    if expected_config is None:
        return
    from hdmap_ad.core.config import load_params

    expected_path = Path(expected_config)
    if not expected_path.is_file():
        raise HdmapError(f"{expected_path}: not found (the DVC `configure` stage writes it; run `dvc repro`)")
    expected = json.loads(expected_path.read_text())
    unreadable = ""
    try:
        now = (
            load_params(params_file, overrides).training_config()
            if params_file is not None
            else params.training_config()
        )
    except HdmapError as err:  # caught while DVC rewrites it (half written, or with a typo): a change all the same
        now, unreadable = None, f"; it cannot be read now: {err}"
    if params.training_config() != expected or now != expected:
        raise HdmapError(
            f"params.yaml changed while this run was in progress (it no longer matches {expected_path}{unreadable}); another "
            "`dvc exp run` in this workspace? DVC runs one experiment per workspace at a time: queue them with "
            "`dvc exp run --queue ...` + `dvc queue start`, or use `hdmap-ad grid`. This run was stopped so that "
            "no result is recorded under settings it was not trained with"
        )
