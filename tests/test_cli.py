"""The command line as users meet it: help texts, and bad input as one clear line (no traceback)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import shipped
from hdmap_ad.apps.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for name in ("synth", "prepare", "train", "evaluate", "compare", "grid", "predict", "show", "init-tracking"):
        assert name in text, name


def test_every_subcommand_has_help(capsys):
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in sub.choices:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0, name
        assert "--params" in capsys.readouterr().out or name in ("bench",)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["grid", "--dry-run", "--seeds", "42,x"], "expected comma-separated integers, got '42,x'"),
        (["bench", "--sweep-batch", "8,0"], "expected positive integers, got '8,0'"),
        (["bench", "--sweep-batch", "8,a"], "expected comma-separated integers, got '8,a'"),
    ],
)
def test_a_bad_integer_list_is_argparse_s_one_line(capsys, argv, needle):
    """The comma-list options (grid's seeds, bench's batch sweep) share one parser: a bad list is a usage
    error naming the value, exit status 2, before anything runs."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_integer_lists_parse():
    from hdmap_ad.apps.parsing import int_list, positive_int_list

    assert int_list("42, 43,,0") == [42, 43, 0]
    assert positive_int_list("1,16") == [1, 16]


@pytest.fixture()
def workspace(tmp_path, synthetic_root, monkeypatch):
    """A folder with params.yaml reading a private copy of the tiny synthetic data."""
    raw = tmp_path / "raw"
    shutil.copytree(synthetic_root, raw)
    params = shipped.params()
    params["data"].update(root=str(raw), prepared=str(tmp_path / "prepared"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _prepare_fails_naming(capsys, needle: str) -> None:
    code = main(["prepare"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if line.startswith("error: ")]
    # progress lines may come first; the error is one line, the last one, and names the culprit
    assert len(errors) == 1 and err[-1] == errors[0] and needle in errors[0], err
    assert "Traceback" not in "\n".join(err)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "bad", ["corrupt", "nan", "rank3", "shape", "empty_split", "missing_domain", "unknown_domain", "uint16_among_float"]
)
def test_bad_input_is_one_line_and_keeps_prepared(workspace, capsys, bad):
    import tifffile

    assert main(["prepare"]) == 0
    capsys.readouterr()
    before = _snapshot(workspace / "prepared")
    good = workspace / "raw/domain_B/test/good"
    target = good / "000003.tiff"
    needle = target.name
    if bad == "corrupt":
        target.write_bytes(b"II*\x00garbage")
    elif bad == "nan":
        arr = tifffile.imread(target)
        arr[2, 5] = np.nan
        tifffile.imwrite(target, arr)
    elif bad == "rank3":
        tifffile.imwrite(target, np.zeros((2, 31, 95), np.float32))
    elif bad == "shape":
        tifffile.imwrite(target, np.zeros((30, 95), np.float32))
    elif bad == "empty_split":
        for f in good.iterdir():
            f.unlink()
        needle = "good"
    elif bad == "missing_domain":
        shutil.rmtree(workspace / "raw/domain_D")
        needle = "domain_D"
    elif bad == "uint16_among_float":  # rescaled by 1/65535 while its neighbours are used as stored
        tifffile.imwrite(target, np.full((31, 95), 30000, np.uint16))
    elif bad == "unknown_domain":
        params = yaml.safe_load(Path("params.yaml").read_text())
        params["data"]["domains"] = ["domain_A", "domain_Z"]
        Path("params.yaml").write_text(yaml.safe_dump(params))
        needle = "domain_Z"
    _prepare_fails_naming(capsys, needle)
    assert _snapshot(workspace / "prepared") == before
    assert not [p for p in workspace.iterdir() if p.name.startswith(".prepared")]


def test_bad_params_is_one_line(workspace, capsys):
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["train"]["steps"] = 0
    Path("params.yaml").write_text(yaml.safe_dump(params))
    assert main(["train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "train.steps" in err[0]


def test_evaluate_without_model_is_one_line(workspace, capsys):
    assert main(["evaluate"]) == 2
    assert "models/model.safetensors" in capsys.readouterr().err


def test_a_model_file_under_its_old_name_gets_a_one_line_hint(workspace, capsys):
    """A workspace from before the rename holds models/model.pt: evaluate names both and the way out."""
    (workspace / "models").mkdir(exist_ok=True)
    (workspace / "models" / "model.pt").write_bytes(b"anything")
    assert main(["evaluate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "models/model.safetensors: checkpoint not found; models/model.pt is its old name" in err[0]
    assert "dvc checkout" in err[0] and "mv models/model.pt models/model.safetensors" in err[0]


@pytest.mark.parametrize("setting, needle", [("seed=-1", "seed"), ("method=focl", "unknown method 'focl'")])
def test_configure_refuses_bad_params_in_one_line(workspace, capsys, setting, needle):
    assert main(["configure", "--set", setting, "--out", "cfg.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not Path("cfg.json").exists()


def test_batch_larger_than_the_training_set_is_refused(workspace, capsys):
    assert main(["prepare"]) == 0
    capsys.readouterr()
    assert main(["train", "--set", "train.batch_size=100000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: train.batch_size 100000 is larger than the training set (32 maps")
