"""Model files checked against where they came from, through the `hdmap-ad` command: a file altered
and re-saved with a fresh (valid) content hash is caught by the run's model_sha256 and, with a shared
key, by its signature."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fixtures_pipeline import TinyPipeline

KEY = "a shared secret of 32 characters"


@pytest.fixture(autouse=True)
def _env(monkeypatch, tiny_pipeline):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_pipeline.tracking_uri)
    monkeypatch.delenv("HDMAP_AD_SIGNING_KEY", raising=False)
    monkeypatch.delenv("HDMAP_AD_SIGNING_KEY_FILE", raising=False)


def cli(*args) -> int:
    from hdmap_ad.apps.cli import main

    return main([str(a) for a in args])


def altered_copy(pipeline: TinyPipeline, out: Path) -> Path:
    """The model with every threshold set to -1e9, saved again (its content hash recomputed)."""
    from hdmap_ad.core import checkpoint

    payload = checkpoint.read(pipeline.checkpoint, check_signature=False)[0]
    payload["thresholds"] = {k: -1e9 for k in payload["thresholds"]}
    checkpoint.save(payload, out)
    return out


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_verify_against_the_run_that_trained_it(tiny_pipeline, tmp_path, capsys):
    params = ["--params", tiny_pipeline.params_file]
    assert cli("checkpoint", *params, "verify", tiny_pipeline.checkpoint, "--run", tiny_pipeline.run_id) == 0
    assert f"the model MLflow run {tiny_pipeline.run_id} trained" in capsys.readouterr().out
    altered = altered_copy(tiny_pipeline, tmp_path / "altered.pt")
    assert cli("checkpoint", "verify", altered) == 0  # its own hash matches: a checksum, not a proof
    capsys.readouterr()
    assert cli("checkpoint", *params, "verify", altered, "--run", tiny_pipeline.run_id) == 2
    line = last_error(capsys)
    assert line.startswith(f"error: {altered}: not the model MLflow run {tiny_pipeline.run_id} trained (file ")
    assert line.endswith("altered, or from another run")


def test_with_a_signing_key_unsigned_and_wrongly_signed_files_are_refused(tiny_pipeline, tmp_path, monkeypatch, capsys):
    from hdmap_ad.core import checkpoint

    good = tiny_pipeline.data_root / "domain_A" / "test" / "good"
    predict = ["predict", "--params", tiny_pipeline.params_file, "--device", "cpu", "--out", tmp_path / "p.csv"]
    monkeypatch.setenv("HDMAP_AD_SIGNING_KEY", KEY)
    # the shared model was saved before the key existed: refused until it is signed
    assert cli(*predict, "--model", tiny_pipeline.checkpoint, good) == 2
    assert last_error(capsys) == (
        f"error: {tiny_pipeline.checkpoint}: not signed, and a signing key is set (HDMAP_AD_SIGNING_KEY / "
        "HDMAP_AD_SIGNING_KEY_FILE); only files saved or exported with the key are accepted"
    )
    signed = tmp_path / "signed.pt"
    shutil.copy(tiny_pipeline.checkpoint, signed)
    assert cli("checkpoint", "sign", signed) == 0  # what a team does once with the files it trusts
    assert checkpoint.read(signed)[1] == checkpoint.read(tiny_pipeline.checkpoint, check_signature=False)[1]
    assert cli(*predict, "--model", signed, good) == 0
    # altered by someone without the key: re-saved with another key
    monkeypatch.setenv("HDMAP_AD_SIGNING_KEY", "someone else's key, long enough")
    forged = altered_copy(tiny_pipeline, tmp_path / "forged.pt")
    monkeypatch.setenv("HDMAP_AD_SIGNING_KEY", KEY)
    capsys.readouterr()
    assert cli(*predict, "--model", forged, good) == 2
    assert last_error(capsys) == (
        f"error: {forged}: signature does not match the signing key (altered, or signed with another key); not loaded"
    )
    # the key from a file works the same
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    monkeypatch.delenv("HDMAP_AD_SIGNING_KEY")
    monkeypatch.setenv("HDMAP_AD_SIGNING_KEY_FILE", str(key_file))
    assert cli("checkpoint", "verify", signed) == 0
    assert cli("checkpoint", "verify", forged) == 2
    monkeypatch.setenv("HDMAP_AD_SIGNING_KEY_FILE", str(tmp_path / "missing"))
    capsys.readouterr()
    assert cli("checkpoint", "verify", signed) == 2
    line = last_error(capsys)
    assert line.startswith("error: HDMAP_AD_SIGNING_KEY_FILE=") and "cannot read the signing key" in line


def test_a_short_key_is_refused(tmp_path, monkeypatch, capsys, tiny_pipeline):
    monkeypatch.setenv("HDMAP_AD_SIGNING_KEY", "short")
    shutil.copy(tiny_pipeline.checkpoint, tmp_path / "m.pt")
    assert cli("checkpoint", "verify", tmp_path / "m.pt") == 2
    assert last_error(capsys) == "error: HDMAP_AD_SIGNING_KEY: a signing key needs at least 16 characters"


def test_a_model_fetched_from_a_run_must_be_the_one_it_trained(tiny_pipeline, tmp_path, monkeypatch, capsys):
    import mlflow

    from hdmap_ad.core import checkpoint

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("provenance", artifact_location=(tmp_path / "art").as_uri())
    genuine = checkpoint.read(tiny_pipeline.checkpoint)[1]
    folder = tmp_path / "swap" / "checkpoint"
    folder.mkdir(parents=True)
    altered_copy(tiny_pipeline, folder / "model.safetensors")  # a valid file with a fresh hash of its own
    runs = {}
    for name, source in (("honest", tiny_pipeline.checkpoint), ("swapped", folder / "model.safetensors")):
        run = client.create_run(exp, run_name=name, tags={"model_sha256": genuine})
        client.log_artifact(run.info.run_id, str(source), artifact_path="checkpoint")
        client.set_terminated(run.info.run_id)
        runs[name] = run.info.run_id
    good = tiny_pipeline.data_root / "domain_A" / "test" / "good"
    predict = ["predict", "--params", tiny_pipeline.params_file, "--device", "cpu", "--out", tmp_path / "p.csv"]
    assert cli(*predict, "--model", f"runs:/{runs['honest']}", good) == 0
    capsys.readouterr()
    assert cli(*predict, "--model", f"runs:/{runs['swapped']}", good) == 2
    line = last_error(capsys)
    assert line.startswith(f"error: --model runs:/{runs['swapped']}: the downloaded model (sha256 ")
    assert line.endswith(
        f"is not the one run {runs['swapped']} trained (its model_sha256 {genuine[:12]}): its artifact was "
        "replaced or altered after training; not used"
    )
