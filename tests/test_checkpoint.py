"""Checkpoint files: a safetensors + JSON format that loads without unpickling, checked by its hash;
old pickle files refused with a way to convert them; a broken training state never blocks training;
the model file names no MLflow run, and evaluate finds the run (or fails) before scoring."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import shipped
import tiny
from hdmap_ad.apps.cli import main
from hdmap_ad.core import checkpoint, paths, runtime
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.optim import StableAdamW

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ["domain_A", "domain_C"]


def tiny_params(*extra: str):
    return tiny.params("runtime.device=auto", *extra)


def model_payload() -> dict:
    """What training saves as models/model.safetensors, for a tiny untrained model."""
    params = tiny_params()
    torch.manual_seed(0)
    model, method = checkpoint.build(params, DOMAINS, torch.device("cpu"))
    return {
        "model": checkpoint.trainable_state(model),
        "method": method.state_dict(),
        "step": 0,
        "config": params.resolved(),
        "fingerprint": "f" * 16,
        "domains": DOMAINS,
        "thresholds": {"domain_A": 0.5, "domain_C": float("nan"), "pooled": 0.25},
        "map_shape": [31, 95],
    }


def old_save(payload: dict, path: Path) -> None:
    """How format-1 checkpoints were written (torch.save of the payload with format 1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": 1, **payload}, path)


@pytest.fixture()
def a_map(tmp_path) -> Path:
    import tifffile

    path = tmp_path / "maps" / "domain_A" / "m.tiff"
    path.parent.mkdir(parents=True)
    tifffile.imwrite(path, np.random.default_rng(0).uniform(0, 1, (31, 95)).astype(np.float32))
    return path


def predict_cli(model: Path, a_map: Path, out: Path) -> int:
    return main(
        [
            "predict",
            "--params",
            str(shipped.params_file()),
            "--device",
            "cpu",
            "--model",
            str(model),
            "--out",
            str(out),
            str(a_map),
        ]
    )


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error: ")]


def assert_same(a, b, where: str = "") -> None:
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(sorted(a, key=repr)) == list(sorted(b, key=repr)), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), where
    else:
        assert a == b, where


# --------------------------------------------------------------------------------------------------
# the format


def test_codec_round_trips_optimizer_and_rng_state_deterministically(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # a cached gaussian in numpy's legacy state
    a, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))
    opt = StableAdamW(
        [
            {"params": [a], "lr": 1e-3, "name": "model", "lr_mult": 1.0},
            {"params": [b], "lr": 1e-2, "name": "extra", "lr_mult": 10.0},
        ],
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-4,
        amsgrad=True,
    )
    for _ in range(2):
        (a.sum() + (b**2).sum()).backward()
        opt.step()
    payload = {
        "optimizer": opt.state_dict(),
        "rng": runtime.rng_state(),
        "step": 7,
        "run_id": None,
        "history": {"val@2": {"val/domain_A/auroc": float("nan")}, "bad_total": 0},
        "odd": {1: "int key", (2, 3): [True, None, -0.5, 1e300], "__tuple__": "a tag-like key"},
        "half": torch.ones(3, dtype=torch.bfloat16),
        "flags": torch.tensor([True, False]),
        "empty": torch.zeros(0, 2),
        "scalar": torch.tensor(2.5),
        "view": torch.arange(10.0)[2:5],
    }
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    digest = checkpoint.save(payload, first)
    loaded, loaded_digest = checkpoint.read(first)
    assert loaded_digest == digest
    expected = dict(payload, view=torch.arange(10.0)[2:5].clone())
    assert_same(expected, loaded)
    # deterministic: the same payload (even rebuilt from the file) gives the same bytes
    assert checkpoint.save(loaded, second) == digest
    assert first.read_bytes() == second.read_bytes()

    # a safetensors file with plain JSON metadata: nothing to unpickle
    from safetensors import safe_open

    with safe_open(str(first), framework="pt") as f:
        meta = json.loads(f.metadata()[checkpoint.METADATA_KEY])
        assert "optimizer/state/0/exp_avg" in set(f.keys())
    assert meta["format_version"] == 2 and meta["sha256"] == digest
    assert meta["payload"]["optimizer"]["param_groups"][0]["betas"] == {"__tuple__": [0.9, 0.999]}

    # the restored optimizer and RNG continue exactly as the originals
    draws = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    runtime.set_rng_state(loaded["rng"])
    assert_same(draws, (random.random(), np.random.normal(), np.random.rand(), torch.rand(3)))
    a2, b2 = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    opt2 = StableAdamW([{"params": [a2]}, {"params": [b2]}], lr=1.0)
    opt2.load_state_dict(loaded["optimizer"])
    for params_, o in (((a, b), opt), ((a2, b2), opt2)):
        o.zero_grad()
        (params_[0].sum() + (params_[1] ** 2).sum()).backward()
        o.step()
    assert torch.equal(a, a2) and torch.equal(b, b2)


# --------------------------------------------------------------------------------------------------
# loading never runs code; damage is detected


class _Bomb:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this calls open(marker, "w"): creates the marker file
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_bomb_model_never_runs(tmp_path, a_map, capsys, writer):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    bomb = {"format": 1, "config": {}, "model": _Bomb(marker)}
    if writer == "torch.save":
        torch.save(bomb, evil)
    else:
        evil.write_bytes(pickle.dumps(bomb, protocol=2))
    assert predict_cli(evil, a_map, tmp_path / "pred.csv") == 2
    assert not marker.exists(), "loading the model file ran code"
    errors = error_lines(capsys)
    assert len(errors) == 1 and "old pickle-based checkpoint" in errors[0] and "checkpoint migrate" in errors[0], errors
    # migrate's restricted unpickler refuses it too
    assert main(["checkpoint", "migrate", str(evil), str(tmp_path / "new.safetensors")]) == 2
    assert not marker.exists() and not (tmp_path / "new.safetensors").exists()
    assert "cannot be read safely" in error_lines(capsys)[0]


def test_a_flipped_weight_byte_fails_the_hash_check(tmp_path, a_map, capsys):
    model = tmp_path / "model.safetensors"
    checkpoint.save(model_payload(), model)
    assert predict_cli(model, a_map, tmp_path / "ok.csv") == 0
    capsys.readouterr()
    data = bytearray(model.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    data[(header_end + len(data)) // 2] ^= 0x10  # one bit of one weight
    model.write_bytes(bytes(data))
    assert predict_cli(model, a_map, tmp_path / "bad.csv") == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and errors[0] == (
        f"error: {model}: checkpoint content does not match its recorded hash (damaged or altered file); "
        "restore it (`dvc pull` / `dvc checkout`) or retrain it"
    ), errors
    assert not (tmp_path / "bad.csv").exists()


@pytest.mark.parametrize("content", ["truncated", "garbage", "empty", "no_keys", "wrong_shapes"])
def test_bad_model_files_are_one_line_errors(tmp_path, a_map, capsys, content):
    path = tmp_path / "model.safetensors"
    if content == "truncated":
        checkpoint.save(model_payload(), path)
        path.write_bytes(path.read_bytes()[:5000])
    elif content == "garbage":
        path.write_bytes(b"\x01\x02not a checkpoint at all" * 10)
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "no_keys":
        checkpoint.save({"hello": torch.zeros(2)}, path)
    else:
        payload = model_payload()
        payload["model"] = {k: torch.zeros(1) for k in payload["model"]}
        checkpoint.save(payload, path)
    assert predict_cli(path, a_map, tmp_path / "pred.csv") == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}: "), errors
    expected = {
        "truncated": "not a readable checkpoint",
        "garbage": "not a readable checkpoint",
        "empty": "not a readable checkpoint",
        "no_keys": "checkpoint lacks config, domains, model, method",
        "wrong_shapes": "checkpoint does not match the model",
    }[content]
    assert expected in errors[0], errors


# --------------------------------------------------------------------------------------------------
# format 1: refused with a hint, converted by `hdmap-ad checkpoint migrate`


def test_old_format_files_are_refused_and_migrate(tmp_path, a_map, capsys):
    old_model, new_model = tmp_path / "old" / "model.pt", tmp_path / "model.safetensors"
    payload = model_payload()
    # format-1 files were written when the config still had `data.source`
    old_config = {**payload["config"], "data": {**payload["config"]["data"], "source": "synthetic"}}
    old_save({**payload, "config": old_config, "run_id": "0" * 32}, old_model)
    with pytest.raises(
        HdmapError,
        match="old pickle-based checkpoint .*not loaded because unpickling can run code.*hdmap-ad checkpoint migrate",
    ):
        checkpoint.load(old_model)
    assert main(["checkpoint", "migrate", str(old_model), str(new_model)]) == 0
    trained = checkpoint.load_trained(new_model, torch.device("cpu"))
    assert trained.info["run_id"] == "0" * 32 and trained.thresholds["domain_A"] == 0.5
    assert_same(payload["model"], checkpoint.load(new_model)["model"])
    assert predict_cli(new_model, a_map, tmp_path / "pred.csv") == 0
    assert main(["checkpoint", "verify", str(new_model)]) == 0

    # a format-1 training state: numpy RNG arrays, optimizer state, python RNG tuples
    random.seed(5)
    np.random.seed(6)
    p = torch.nn.Parameter(torch.ones(4))
    opt = StableAdamW([{"params": [p], "name": "model", "lr_mult": 1.0}], lr=0.1, betas=(0.9, 0.99), amsgrad=True)
    p.sum().backward()
    opt.step()
    old_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    old_state, new_state = tmp_path / "old" / "last.pt", tmp_path / "last.safetensors"
    old_save(
        {"optimizer": opt.state_dict(), "rng": old_rng, "step": 3, "fingerprint": "x", "model": {}, "method": {}},
        old_state,
    )
    assert main(["checkpoint", "migrate", str(old_state), str(new_state)]) == 0
    state = checkpoint.load(new_state, checkpoint.STATE_KEYS)
    assert_same(opt.state_dict(), state["optimizer"])
    draws = (random.random(), np.random.rand(), torch.rand(2))
    runtime.set_rng_state(state["rng"])
    assert_same(draws, (random.random(), np.random.rand(), torch.rand(2)))
    # nothing to migrate in a new file
    assert main(["checkpoint", "migrate", str(new_state), str(tmp_path / "again.safetensors")]) == 2
    assert "nothing to migrate" in error_lines(capsys)[-1]


# --------------------------------------------------------------------------------------------------
# training and evaluation with the new files


@pytest.fixture()
def workdir(tmp_path, monkeypatch, prepared_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def test_a_broken_train_state_is_moved_aside_and_training_starts_afresh(workdir, prepared_dir, capsys):
    from hdmap_ad.pipeline.training import STATE_FILE, train

    params = tiny_params(f"data.prepared={prepared_dir}", f"data.domains={json.dumps(DOMAINS)}", "runtime.resume=auto")
    for broken in (b"\x00" * 100, "fake"):
        STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
        if broken == "fake":  # a readable file of the right format without the keys resuming needs
            checkpoint.save({"step": 2}, STATE_FILE)
        else:
            STATE_FILE.write_bytes(broken)
        capsys.readouterr()
        summary = train(params)
        err = " ".join(capsys.readouterr().err.split())
        assert f"warning: {STATE_FILE}:" in err and f"moved it to {STATE_FILE}.corrupt; starting afresh" in err, err
        assert "resuming from" not in err
        assert summary["steps"] == 4 and checkpoint.load(STATE_FILE, checkpoint.STATE_KEYS)["step"] == 4
        assert Path(f"{STATE_FILE}.corrupt").is_file()


@pytest.mark.slow
def test_model_file_has_no_run_id_and_evaluate_finds_its_run_first(workdir, prepared_dir, monkeypatch):
    import mlflow

    from hdmap_ad.pipeline import evaluation
    from hdmap_ad.pipeline.training import MODEL_FILE, train

    params = tiny_params(f"data.prepared={prepared_dir}", f"data.domains={json.dumps(DOMAINS)}", "runtime.resume=never")
    first = train(params)
    first_bytes = MODEL_FILE.read_bytes()
    second = train(params)
    assert MODEL_FILE.read_bytes() == first_bytes  # same config, same bytes: nothing run-specific inside
    payload, digest = checkpoint.read(MODEL_FILE)
    assert "run_id" not in payload and first["run_id"] != second["run_id"]
    assert json.loads(paths.RUN_FILE.read_text()) == {"run_id": second["run_id"], "model_sha256": digest}
    client = mlflow.MlflowClient()
    assert client.get_run(first["run_id"]).data.tags["model_sha256"] == digest
    assert "run_id" not in json.loads(Path("metrics/train.json").read_text())

    # without models/run.json: the newest run tagged with the model's hash
    paths.RUN_FILE.unlink()
    evaluation.evaluate(params)
    assert client.get_run(second["run_id"]).data.tags.get("evaluated") == "true"

    def no_scoring(*args, **kwargs):
        raise AssertionError("scoring started before the MLflow run was found")

    monkeypatch.setattr(evaluation, "score_maps", no_scoring, raising=False)
    for run_id in (first["run_id"], second["run_id"]):
        client.delete_run(run_id)
    with pytest.raises(HdmapError, match=r"no run in the MLflow store .* trained this model \(model_sha256 "):
        evaluation.evaluate(params)
    Path("mlflow.db").unlink()  # a lost store is an error, not "metrics not logged"
    with pytest.raises(HdmapError, match=r"MLflow store sqlite:///.*mlflow.db: not found"):
        evaluation.evaluate(params)
    assert not Path("mlflow.db").exists()  # and it is not recreated empty


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["off", "bf16"])  # float32, and bf16 autocast (emulated where the CPU lacks it)
def test_an_interrupted_run_resumes_to_the_identical_model_file(workdir, prepared_dir, monkeypatch, capsys, amp):
    from hdmap_ad.pipeline import training
    from hdmap_ad.pipeline.training import MODEL_FILE, STATE_FILE, train

    params = tiny_params(
        f"data.prepared={prepared_dir}",
        f"data.domains={json.dumps(DOMAINS)}",
        "runtime.resume=auto",
        "train.steps=5",
        "runtime.checkpoint_every=2",
        f"train.amp={amp}",
    )
    train(params)
    reference = MODEL_FILE.read_bytes()
    assert checkpoint.load(MODEL_FILE)["precision"] == amp
    STATE_FILE.unlink()
    MODEL_FILE.unlink()

    original = training.train_step

    def killed_at_step_3(*args, **kwargs):
        if args[7] == 3:  # step: after the state of step 2 was saved
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(params)
    assert checkpoint.load(STATE_FILE)["step"] == 2 and not MODEL_FILE.exists()
    monkeypatch.setattr(training, "train_step", original)
    capsys.readouterr()
    train(params)
    assert f"resuming from {STATE_FILE} at step 2/5" in capsys.readouterr().err
    assert MODEL_FILE.read_bytes() == reference  # arithmetic, optimizer, RNG and weights continued exactly
