"""Using a trained model: `hdmap-ad predict` and the MLflow pyfunc model (loaded fresh and served).

Everything runs against one tiny model trained by the real pipeline (tests/fixtures_pipeline.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fixtures_pipeline import TinyPipeline

PYTHON = sys.executable
BIN = Path(sys.executable).parent
TOL = 1e-6


@pytest.fixture(autouse=True)
def _tracking_env(monkeypatch, tiny_pipeline):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_pipeline.tracking_uri)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


def predict(args: list[str], pipeline: TinyPipeline) -> int:
    from hdmap_ad.apps.cli import main

    return main(["predict", "--params", str(pipeline.params_file), "--device", "cpu", *map(str, args)])


def eval_scores(pipeline: TinyPipeline) -> pd.DataFrame:
    """metrics/scores.csv with absolute resolved paths (the evaluate stage may store them relative)."""
    df = pd.read_csv(pipeline.scores_csv)
    df["key"] = [str((Path(p) if Path(p).is_absolute() else pipeline.root / p).resolve()) for p in df["path"]]
    return df.set_index("key")


def read_predictions(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, keep_default_na=False)
    assert list(df.columns) == ["path", "domain", "score", "is_anomaly"]
    df["key"] = [str(Path(p).resolve()) for p in df["path"]]
    return df.set_index("key")


def test_predict_reproduces_the_evaluate_stage(tiny_pipeline, tmp_path):
    out = tmp_path / "pred.csv"
    folders = [tiny_pipeline.data_root / d / "test" for d in tiny_pipeline.domains]
    assert predict(["--model", tiny_pipeline.checkpoint, "--out", out, *folders], tiny_pipeline) == 0
    pred, ref = read_predictions(out), eval_scores(tiny_pipeline)
    assert len(pred) == len(ref) == 2 * 12
    assert set(pred.index) == set(ref.index)
    ref = ref.loc[pred.index]
    np.testing.assert_allclose(pred["score"].to_numpy(float), ref["score"].to_numpy(float), rtol=0, atol=TOL)
    assert (pred["domain"] == ref["domain"]).all()
    # the decision uses the domain's VALIDATION threshold stored in the checkpoint
    thr = pred["domain"].map(tiny_pipeline.thresholds)
    assert (pred["is_anomaly"].astype(int) == (pred["score"] >= thr).astype(int)).all()


def test_bad_inputs_are_reported_and_skipped(tiny_pipeline, tmp_path, capsys):
    import tifffile

    src = sorted((tiny_pipeline.data_root / "domain_A" / "test" / "fault").glob("*.tif*"))[:3]
    folder = tmp_path / "batch" / "domain_A"
    folder.mkdir(parents=True)
    for f in src:
        shutil.copy(f, folder / f.name)
    (folder / "broken.tiff").write_bytes(b"this is not a tiff")
    tifffile.imwrite(folder / "nan.tiff", np.full((31, 95), np.nan, dtype=np.float32))
    tifffile.imwrite(folder / "cube.tiff", np.zeros((3, 31, 95), dtype=np.float32), photometric="minisblack")
    out = tmp_path / "pred.csv"
    # cli.main's return value is the console script's exit status
    assert predict(["--model", tiny_pipeline.checkpoint, "--out", out, tmp_path / "batch"], tiny_pipeline) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, stderr
    for name in ("broken.tiff", "nan.tiff", "cube.tiff"):
        assert sum(line.startswith(f"error: {folder / name}: ") for line in errors) == 1, (name, errors)
    assert "Traceback" not in stderr
    pred = read_predictions(out)
    assert sorted(Path(p).name for p in pred["path"]) == sorted(f.name for f in src)
    ref = eval_scores(tiny_pipeline)
    for f in src:  # the good files still score exactly as in evaluation
        got = pred.loc[str((folder / f.name).resolve()), "score"]
        assert abs(got - ref.loc[str(f.resolve()), "score"]) <= TOL


def test_threshold_override_and_pooled_fallback(tiny_pipeline, tmp_path):
    src = sorted((tiny_pipeline.data_root / "domain_C" / "test" / "good").glob("*.tif*"))[:2]
    plain = tmp_path / "no_domain_here"
    plain.mkdir()
    for f in src:
        shutil.copy(f, plain / f.name)
    out = tmp_path / "pooled.csv"
    maps_dir = tmp_path / "maps"
    assert (
        predict(["--model", tiny_pipeline.checkpoint, "--out", out, "--maps", maps_dir, plain, src[0]], tiny_pipeline)
        == 0
    )
    pred = read_predictions(out)
    by_name = {Path(p).parent.name: row for p, row in zip(pred["path"], pred.to_dict("records"))}
    assert by_name["no_domain_here"]["domain"] == "" and by_name["good"]["domain"] == "domain_C"
    pooled, own = tiny_pipeline.thresholds["pooled"], tiny_pipeline.thresholds["domain_C"]
    assert by_name["no_domain_here"]["is_anomaly"] == int(by_name["no_domain_here"]["score"] >= pooled)
    assert by_name["good"]["is_anomaly"] == int(by_name["good"]["score"] >= own)
    assert len(list(maps_dir.rglob("*.png"))) == 3  # one per input, a name clash gets a suffix

    for threshold, expected in ((0.0, 1), (1e9, 0)):
        out = tmp_path / f"thr{threshold}.csv"
        assert (
            predict(
                ["--model", tiny_pipeline.checkpoint, "--out", out, "--threshold", threshold, plain, src[0]],
                tiny_pipeline,
            )
            == 0
        )
        assert (read_predictions(out)["is_anomaly"] == expected).all()


def test_mlflow_run_id_and_registered_model(tiny_pipeline, tmp_path, capsys):
    files = sorted((tiny_pipeline.data_root / "domain_A" / "test" / "good").glob("*.tif*"))[:2]
    a, b = tmp_path / "by_run.csv", tmp_path / "by_name.csv"
    assert (
        predict(["--model", tiny_pipeline.run_id, "--register", "hdmap-tiny", "--out", a, *files], tiny_pipeline) == 0
    )
    assert "models:/hdmap-tiny/" in capsys.readouterr().err
    assert predict(["--model", "models:/hdmap-tiny/1", "--out", b, *files], tiny_pipeline) == 0
    ref = eval_scores(tiny_pipeline)
    for path in (a, b):
        pred = read_predictions(path)
        np.testing.assert_allclose(
            pred["score"].to_numpy(float), ref.loc[pred.index, "score"].to_numpy(float), atol=TOL, rtol=0
        )
    assert predict(["--model", "0" * 32, files[0]], tiny_pipeline) == 2
    assert "cannot fetch it from the MLflow store" in capsys.readouterr().err
    # the model file names no run: --register finds it through the run's model_sha256 tag
    assert predict(["--model", tiny_pipeline.checkpoint, "--register", "hdmap-tiny-file"], tiny_pipeline) == 0
    assert "models:/hdmap-tiny-file/1" in capsys.readouterr().err


def test_models_under_the_old_name_model_pt_are_still_read(tiny_pipeline, tmp_path, monkeypatch, capsys):
    """The model file was called model.pt before (same safetensors content): such a local file, and a run
    that logged its checkpoint as checkpoint/model.pt, still predict what the new names do. New runs log
    checkpoint/model.safetensors."""
    import mlflow

    assert tiny_pipeline.checkpoint.name == "model.safetensors"
    files = sorted((tiny_pipeline.data_root / "domain_A" / "test" / "fault").glob("*.tif*"))[:2]
    ref = tmp_path / "ref.csv"
    assert predict(["--model", tiny_pipeline.checkpoint, "--out", ref, *files], tiny_pipeline) == 0
    client = mlflow.MlflowClient(tiny_pipeline.tracking_uri)
    logged = [a.path for a in client.list_artifacts(tiny_pipeline.run_id, "checkpoint")]
    assert logged == ["checkpoint/model.safetensors"]

    old = tmp_path / "old" / "model.pt"
    old.parent.mkdir()
    shutil.copy(tiny_pipeline.checkpoint, old)
    uri = f"sqlite:///{tmp_path / 'old-store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # a store of its own: the shared one stays as it is
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.MlflowClient().create_experiment("old", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifact(str(old), artifact_path="checkpoint")
    for model in (old, run.info.run_id, f"runs:/{run.info.run_id}"):
        out = tmp_path / "pred.csv"
        assert predict(["--model", model, "--out", out, *files], tiny_pipeline) == 0, capsys.readouterr().err
        assert out.read_text() == ref.read_text()


def test_find_checkpoint_prefers_the_new_name_and_falls_back_to_the_old(tmp_path):
    from hdmap_ad.core.errors import HdmapError
    from hdmap_ad.pipeline.model_source import find_checkpoint

    for layout in ("artifacts", "checkpoint", "."):
        folder = tmp_path / layout.strip(".") / "x"
        (folder / layout).mkdir(parents=True)
        (folder / layout / "model.pt").write_bytes(b"old")
        assert find_checkpoint(folder).name == "model.pt"
        (folder / layout / "model.safetensors").write_bytes(b"new")
        assert find_checkpoint(folder).name == "model.safetensors"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HdmapError, match=r"no \.safetensors model in the downloaded MLflow artifacts"):
        find_checkpoint(empty)


def _sample(pipeline: TinyPipeline, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Four maps (good and faulty, two domains) and their scores from `hdmap-ad predict`."""
    from hdmap_ad.pipeline.data import read_map

    files = [
        sorted((pipeline.data_root / d / "test" / kind).glob("*.tif*"))[0]
        for d in pipeline.domains
        for kind in ("good", "fault")
    ]
    out = tmp_path / "ref.csv"
    assert predict(["--model", pipeline.checkpoint, "--out", out, *files], pipeline) == 0
    pred = read_predictions(out)
    scores = pred.loc[[str(f.resolve()) for f in files], "score"].to_numpy(float)
    return np.stack([read_map(f) for f in files]).astype(np.float32), scores


def test_pyfunc_model_in_a_fresh_process(tiny_pipeline, tmp_path):
    maps, expected = _sample(tiny_pipeline, tmp_path)
    np.save(tmp_path / "maps.npy", maps)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np, mlflow.pyfunc
        model = mlflow.pyfunc.load_model("runs:/{tiny_pipeline.run_id}/model")
        maps = np.load({str(tmp_path / "maps.npy")!r})
        out = model.predict(maps)
        pooled = model.predict(maps, params={{"threshold": 0.0}})
        import hdmap_ad
        json.dump({{"scores": out["score"].tolist(), "flags": out["is_anomaly"].tolist(),
                   "forced": pooled["is_anomaly"].tolist(), "package": hdmap_ad.__file__}}, sys.stdout)
    """)
    proc = subprocess.run(
        [PYTHON, "-c", script], capture_output=True, text=True, timeout=180, env=tiny_pipeline.env(), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got["scores"], expected, atol=TOL, rtol=0)
    pooled = tiny_pipeline.thresholds["pooled"]
    assert got["flags"] == [bool(s >= pooled) for s in got["scores"]]
    assert all(got["forced"])
    # the model carries its own copy of hdmap_ad (code_paths), not the working tree's
    assert not got["package"].startswith(str(Path(__file__).resolve().parents[1] / "src"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _strict_json(raw: bytes) -> dict:
    def refuse(name: str):
        raise AssertionError(f"the answer holds {name}, which is not JSON: {raw[:300]!r}")

    return json.loads(raw, parse_constant=refuse)


def _post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, _strict_json(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, _strict_json(err.read() or b"{}")


@pytest.mark.slow
def test_served_model_answers_like_predict(tiny_pipeline, tmp_path):
    maps, expected = _sample(tiny_pipeline, tmp_path)
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            tiny_pipeline.model_uri,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        # the server execs `uvicorn`, which must be on PATH (the venv's bin/)
        env=tiny_pipeline.env(
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"
        ),
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, (
                "server did not come up in 90 s:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            )
            time.sleep(1)

        status, answer = _post(f"{base}/invocations", {"inputs": maps.tolist()})
        assert status == 200, answer
        rows = answer["predictions"]
        np.testing.assert_allclose([r["score"] for r in rows], expected, atol=TOL, rtol=0)
        pooled = tiny_pipeline.thresholds["pooled"]
        assert [r["is_anomaly"] for r in rows] == [bool(r["score"] >= pooled) for r in rows]

        status, answer = _post(f"{base}/invocations", {"inputs": maps[:1].tolist(), "params": {"domain": "domain_A"}})
        assert status == 200, answer
        assert answer["predictions"][0]["threshold"] == pytest.approx(tiny_pipeline.thresholds["domain_A"])

        bad = maps[:1].copy()
        bad[0, 0, 0] = np.nan
        status, answer = _post(f"{base}/invocations", {"inputs": bad.tolist()})
        assert 400 <= status < 500 and "contains NaN or Inf" in json.dumps(answer), answer

        # finite but huge: the network overflows; a clear 400, never "score": NaN
        status, answer = _post(f"{base}/invocations", {"inputs": np.full((1, 31, 95), 3e38, dtype=np.float32).tolist()})
        assert 400 <= status < 500 and "score is NaN/Inf" in json.dumps(answer), answer
    finally:
        with _suppress():
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with _suppress():
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


def _suppress():
    import contextlib

    return contextlib.suppress(ProcessLookupError, PermissionError)


def test_logged_model_is_code_and_safetensors_not_a_pickle(tiny_pipeline, tmp_path):
    import mlflow
    import yaml

    mlflow.set_tracking_uri(tiny_pipeline.tracking_uri)
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=tiny_pipeline.model_uri, dst_path=str(tmp_path)))
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert "python_model.pkl" not in names and not [n for n in names if n.endswith((".pkl", ".pickle"))], sorted(names)
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor.get("model_code_path") and (folder / Path(flavor["model_code_path"]).name).is_file()
    assert "python_model" not in flavor  # the cloudpickled object's entry
    head = (folder / "artifacts" / "model.safetensors").read_bytes()[:9]
    assert head[8:9] == b"{" and not head.startswith(b"PK")  # a safetensors header, not a torch.save zip


def _load_pyfunc(pipeline: TinyPipeline):
    import mlflow.pyfunc

    mlflow.set_tracking_uri(pipeline.tracking_uri)
    return mlflow.pyfunc.load_model(pipeline.model_uri)


def test_pyfunc_refuses_inputs_whose_score_overflows(tiny_pipeline, monkeypatch):
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("HDMAP_AD_DEVICE", "cpu")
    model = _load_pyfunc(tiny_pipeline)
    huge = np.full((2, 31, 95), 3e38, dtype=np.float32)  # finite, but the network overflows on it
    with pytest.raises(MlflowException, match="score is NaN/Inf") as err:
        model.predict(huge)
    assert err.value.get_http_status_code() == 400
    ok = model.predict(np.zeros((1, 31, 95), dtype=np.float32))
    assert np.isfinite(ok["score"]).all()


def test_pyfunc_stops_after_the_scoring_server_timeout(tiny_pipeline, monkeypatch):
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("HDMAP_AD_DEVICE", "cpu")
    model = _load_pyfunc(tiny_pipeline)
    maps = np.zeros((3, 31, 95), dtype=np.float32)
    assert len(model.predict(maps)) == 3  # no deadline outside `mlflow models serve`
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "-1")  # already past the deadline
    with pytest.raises(MlflowException, match="request timeout with 0 of 3 maps scored"):
        model.predict(maps)


@pytest.mark.parametrize("target", ["out_is_folder", "out_under_a_file", "maps_is_a_file"])
def test_unwritable_outputs_fail_before_scoring(tiny_pipeline, tmp_path, monkeypatch, capsys, target):
    from hdmap_ad.core import inference

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before checking the outputs")

    monkeypatch.setattr(inference, "score_arrays", no_scoring)
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    extra = {
        "out_is_folder": ["--out", tmp_path],
        "out_under_a_file": ["--out", a_file / "pred.csv"],
        "maps_is_a_file": ["--out", tmp_path / "pred.csv", "--maps", a_file],
    }[target]
    src = sorted((tiny_pipeline.data_root / "domain_A" / "test" / "good").glob("*.tif*"))[0]
    assert predict(["--model", tiny_pipeline.checkpoint, *extra, src], tiny_pipeline) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --") and "Traceback" not in err[0], err
    assert not (tmp_path / "pred.csv").exists()
