"""ONNX export: the graph scores like PyTorch for every method, carries its metadata, refuses bad
input with one line, and `predict --backend onnx` and the served model run on it.

One tiny trained pipeline (tests/fixtures_pipeline.py) is exported once through the CLI; the
per-method parity checks export 2-block models (export time is mostly fixed per graph).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tiny
from fixtures_pipeline import TinyPipeline, tiny_params
from hdmap_ad.core.method_params import METHODS
from servers import http, serving

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
# every test here runs a torch.onnx.export (30-60 s each on 2 cores): the full suite only
pytestmark = pytest.mark.slow

SCORE_RTOL = 1e-4
MAP_ATOL = 1e-3


@pytest.fixture(autouse=True)
def _tracking_env(monkeypatch, tiny_pipeline):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_pipeline.tracking_uri)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="session")
def exported(tiny_pipeline, tmp_path_factory) -> Path:
    """`hdmap-ad export --log-model` of the tiny pipeline's model, run in its folder (models/run.json
    there names the training run)."""
    import os

    from hdmap_ad.apps.cli import main

    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    old_cwd = Path.cwd()
    os.chdir(tiny_pipeline.root)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", tiny_pipeline.tracking_uri)
            rc = main(
                [
                    "export",
                    "--params",
                    str(tiny_pipeline.params_file),
                    "--model",
                    str(tiny_pipeline.checkpoint),
                    "--format",
                    "onnx",
                    "--out",
                    str(out),
                    "--log-model",
                ]
            )
    finally:
        os.chdir(old_cwd)
    assert rc == 0
    return out


def _test_maps(pipeline: TinyPipeline) -> tuple[list[Path], np.ndarray]:
    from hdmap_ad.pipeline.data import read_map

    files = sorted(f for d in pipeline.domains for f in (pipeline.data_root / d / "test").rglob("*.tif*"))
    return files, np.stack([read_map(f) for f in files])


def _torch_scores(trained, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The PyTorch path (inference.score_maps) in float32 on the CPU."""
    import torch

    from hdmap_ad.core.inference import score_maps

    scored = score_maps(
        trained.model, trained.method, maps, trained.params, torch.device("cpu"), 8, keep_maps=True, amp="off"
    )
    return scored.scores, scored.maps


def _assert_parity(scores, maps, ref_scores, ref_maps) -> None:
    assert np.isfinite(ref_scores).all() and ref_scores.std() > 0  # a real comparison, not all zeros
    np.testing.assert_allclose(scores, ref_scores, rtol=SCORE_RTOL, atol=0)
    np.testing.assert_allclose(maps, ref_maps, rtol=0, atol=MAP_ATOL)


def test_export_cli_writes_a_checked_onnx_model_with_its_metadata(exported, tiny_pipeline):
    import onnx
    import torch

    from hdmap_ad.core.checkpoint import load_trained, read
    from hdmap_ad.core.onnx_scorer import OnnxScorer

    proto = onnx.load(str(exported))
    (graph_input,) = proto.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # dynamic batch
    assert [d.dim_value for d in dims[1:]] == [31, 95]
    assert [o.name for o in proto.graph.output] == ["anomaly_map", "score"]
    assert not list(exported.parent.glob(".*"))  # no temporary file left beside it

    scorer = OnnxScorer(exported)
    assert scorer.domains == tiny_pipeline.domains
    assert scorer.thresholds == pytest.approx(tiny_pipeline.thresholds)
    assert scorer.input_shape == (31, 95) and scorer.crop == (28, 84)
    assert scorer.info["model_sha256"] == read(tiny_pipeline.checkpoint)[1]
    assert scorer.info["run_id"] == tiny_pipeline.run_id
    assert scorer.info["preprocess"]["resize"] == [28, 84] and scorer.info["method"] == "baseline"

    files, maps = _test_maps(tiny_pipeline)
    scores, amaps = scorer.score(maps, batch_size=5, keep_maps=True)  # ragged batches through the dynamic axis
    ref_scores, ref_maps = _torch_scores(load_trained(tiny_pipeline.checkpoint, torch.device("cpu")), maps)
    assert amaps.shape == (len(files), 256, 256)
    _assert_parity(scores, amaps, ref_scores, ref_maps)


# Methods differ at inference only in how group maps are reduced (their `map` hook: mean, generalised
# mean, weighted sum); a loss-only method's graph is the baseline's (test_architecture.py checks that the
# hooks a method declares are the ones it overrides), so exporting it again would check nothing new.
MAP_METHODS = ["baseline"] + [name for name, spec in METHODS.items() if "map" in spec.hooks]


@pytest.mark.parametrize("method", MAP_METHODS)
def test_onnx_scores_equal_pytorch_for_every_method(method, tiny_pipeline, tmp_path):
    """Each way of reducing group maps is exported as its method's own graph and compared with the
    PyTorch path."""
    import torch

    from hdmap_ad.core.checkpoint import TrainedModel, build
    from hdmap_ad.core.config import parse_params
    from hdmap_ad.core.export import export_onnx
    from hdmap_ad.core.onnx_scorer import OnnxScorer

    raw = tiny_params(tmp_path)
    raw["method"] = method
    raw["model"].update(
        target_blocks=[0, 1],
        fuse_groups=[[0], [1]],
        decoder_depth=2,
        encoder_overrides={**tiny.ENCODER, "depth": 2},
    )
    raw["evaluate"]["amp"] = "off"
    params = parse_params(raw, source="test")
    torch.manual_seed(1)
    model, m = build(params, tiny_pipeline.domains, torch.device("cpu"))
    with torch.no_grad():
        for p in model.decoder.parameters():  # decoder weights far from init: distances of all sizes
            p.add_(0.2 * torch.randn_like(p))
        if method == "scale":
            m.logits.copy_(torch.tensor([1.0, -0.5]))  # unequal group weights must be baked into the graph
    trained = TrainedModel(
        model.eval(), m.eval(), params, list(tiny_pipeline.domains), {"pooled": 0.5}, {"sha256": "t"}
    )
    out = export_onnx(trained, tmp_path / f"{method}.onnx", (31, 95))
    _, maps = _test_maps(tiny_pipeline)
    scores, amaps = OnnxScorer(out).score(maps, keep_maps=True)
    _assert_parity(scores, amaps, *_torch_scores(trained, maps))


def test_bad_input_is_one_clear_line(exported, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from hdmap_ad.core.errors import HdmapError
    from hdmap_ad.core.onnx_scorer import OnnxScorer

    scorer = OnnxScorer(exported)
    good = np.full((2, 31, 95), 0.3, dtype=np.float32)
    nan, inf = good.copy(), good.copy()
    nan[1, 3, 4] = np.nan
    inf[0, 0, 0] = np.inf
    cases = [
        (good[None], r"expected maps of shape \(N, 31, 95\).*got an array of shape \(1, 2, 31, 95\)"),
        (good[0, 0], r"shape \(95,\)"),
        (np.zeros((2, 28, 84), np.float32), r"maps are 28x84, the model takes 31x95"),
        (nan, r"map\(s\) 1 contain NaN or Inf"),
        (inf, r"map\(s\) 0 contain NaN or Inf"),
        (good.astype(np.float64), r"must be float32, got float64"),
        (good.tolist(), r"expected a numpy array"),
    ]
    for maps, message in cases:
        with pytest.raises(HdmapError, match=message) as err:
            scorer.score(maps)
        assert "\n" not in str(err.value)
    assert scorer.score(good[0])[0].shape == (1,)  # one H×W map is a batch of one
    scores, amaps = scorer.score(good[:0], keep_maps=True)  # no maps: empty results, no onnxruntime error
    assert scores.shape == (0,) and amaps.shape == (0, *scorer.info["score"]["size"])

    with pytest.raises(HdmapError, match="not a readable ONNX model"):
        OnnxScorer(Path(__file__))
    plain = tmp_path / "plain.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    onnx.save(
        helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])), str(plain)
    )
    with pytest.raises(HdmapError, match="no hdmap-ad metadata"):
        OnnxScorer(plain)


def _predict(args: list) -> int:
    from hdmap_ad.apps.cli import main

    return main(["predict", *map(str, args)])


def test_predict_onnx_backend_matches_the_torch_backend(exported, tiny_pipeline, tmp_path, capsys):
    import tifffile

    folders = [tiny_pipeline.data_root / d / "test" for d in tiny_pipeline.domains]
    common = ["--params", tiny_pipeline.params_file]
    assert (
        _predict(
            [
                *common,
                "--model",
                tiny_pipeline.checkpoint,
                "--device",
                "cpu",
                "--precision",
                "off",
                "--out",
                tmp_path / "torch.csv",
                *folders,
            ]
        )
        == 0
    )
    # an odd-sized map in the ONNX run: reported and skipped, the rest scored
    odd = tmp_path / "odd" / "domain_A"
    odd.mkdir(parents=True)
    tifffile.imwrite(odd / "small.tiff", np.full((20, 40), 0.2, dtype=np.float32))
    maps_dir = tmp_path / "pictures"
    capsys.readouterr()
    assert (
        _predict(
            [
                *common,
                "--backend",
                "onnx",
                "--model",
                exported,
                "--out",
                tmp_path / "onnx.csv",
                "--maps",
                maps_dir,
                *folders,
                odd,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"error: {odd / 'small.tiff'}: shape 20x40, the model was trained on 31x95 maps" in err
    assert "Traceback" not in err
    ref = pd.read_csv(tmp_path / "torch.csv", keep_default_na=False).set_index("path")
    got = pd.read_csv(tmp_path / "onnx.csv", keep_default_na=False).set_index("path")
    assert list(got.index) == list(ref.index) and (got["domain"] == ref["domain"]).all()
    np.testing.assert_allclose(got["score"], ref["score"], rtol=SCORE_RTOL, atol=0)
    thr = ref["domain"].map(tiny_pipeline.thresholds)
    clear = (ref["score"] - thr).abs() > 1e-3 * thr  # decisions agree wherever rounding cannot flip them
    assert clear.sum() >= len(ref) // 2
    assert (got["is_anomaly"][clear] == ref["is_anomaly"][clear]).all()
    assert (got["is_anomaly"].astype(int) == (got["score"] >= thr).astype(int)).all()
    assert len(list(maps_dir.rglob("*.png"))) == len(got)

    capsys.readouterr()
    assert _predict([*common, "--backend", "onnx", "--device", "cuda", "--model", exported, *folders]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: --device: not available with --backend onnx (float32 on the CPU, an exported file)"
    )


def test_served_onnx_model_scores_like_pytorch_without_importing_torch(exported, tiny_pipeline, tmp_path):
    """The pyfunc model `export --log-model` logged into the training run, loaded in a fresh process."""
    import mlflow
    import torch

    from hdmap_ad.apps.export import ONNX_MODEL_NAME
    from hdmap_ad.core.checkpoint import load_trained
    from hdmap_ad.pipeline import serving

    mlflow.set_tracking_uri(tiny_pipeline.tracking_uri)
    logged = serving.find_logged_model(mlflow.MlflowClient().get_run(tiny_pipeline.run_id), ONNX_MODEL_NAME)
    assert logged is not None
    _, maps = _test_maps(tiny_pipeline)
    maps = maps[:6]
    ref, _ = _torch_scores(load_trained(tiny_pipeline.checkpoint, torch.device("cpu")), maps)
    np.save(tmp_path / "maps.npy", maps)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np, mlflow.pyfunc
        from mlflow.exceptions import MlflowException
        model = mlflow.pyfunc.load_model("models:/{logged.model_id}")
        maps = np.load({str(tmp_path / "maps.npy")!r})
        out = model.predict(maps, params={{"domain": "domain_A"}})
        try:
            model.predict(np.zeros((1, 20, 40), np.float32)); odd = None
        except MlflowException as err:
            odd = [err.get_http_status_code(), err.message]
        json.dump({{"scores": out["score"].tolist(), "flags": out["is_anomaly"].tolist(),
                   "threshold": out["threshold"].tolist(), "odd": odd, "torch": "torch" in sys.modules}}, sys.stdout)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        env=tiny_pipeline.env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got["scores"], ref, rtol=SCORE_RTOL, atol=0)
    thr = tiny_pipeline.thresholds["domain_A"]
    assert got["threshold"] == pytest.approx([thr] * len(maps))
    assert got["flags"] == [bool(s >= thr) for s in got["scores"]]
    assert got["odd"][0] == 400 and "shape 20x40, the model was trained on 31x95 maps" in got["odd"][1]
    assert got["torch"] is False


def test_predict_onnx_counts_an_overflowing_map_as_failed_and_refuses_resize(exported, tiny_pipeline, tmp_path, capsys):
    import tifffile

    folder = tmp_path / "domain_A"
    folder.mkdir()
    huge = folder / "huge.tiff"
    tifffile.imwrite(huge, np.full((31, 95), 3e38, dtype=np.float32))
    good = sorted((tiny_pipeline.data_root / "domain_A" / "test" / "good").glob("*.tif*"))[0]
    out = tmp_path / "p.csv"
    common = ["--params", tiny_pipeline.params_file, "--backend", "onnx", "--model", exported, "--out", out]
    capsys.readouterr()
    assert _predict([*common, good, huge]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: {huge}: the model's score is NaN/Inf (largest absolute value in the map 3e+38); "
        "values this large overflow the model's arithmetic"
    ]
    assert "1 failed" in err and list(pd.read_csv(out)["path"]) == [str(good)]
    assert _predict([*common, "--resize", good]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --resize: not available with --backend onnx (float32 on the CPU, an exported file)"
    )


# --------------------------------------------------------------------------------------------------
# provenance: the file records a hash of itself; with a signing key, a signature


def _tampered(exported: Path, tmp_path: Path, how: str) -> Path:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(exported))
    if how == "weights":  # an initializer multiplied by 10
        init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 10, init.name))
    else:  # a threshold edited in metadata_props
        for prop in model.metadata_props:
            if prop.key == "hdmap_ad.thresholds":
                prop.value = json.dumps({k: -1e9 for k in json.loads(prop.value)})
    out = tmp_path / f"{how}.onnx"
    onnx.save(model, str(out))
    return out


@pytest.mark.parametrize("how", ["weights", "threshold"])
def test_an_altered_onnx_file_is_refused(exported, tiny_pipeline, tmp_path, capsys, how):
    altered = _tampered(exported, tmp_path, how)
    good = sorted((tiny_pipeline.data_root / "domain_A" / "test" / "good").glob("*.tif*"))[0]
    capsys.readouterr()
    rc = _predict(
        [
            "--params",
            tiny_pipeline.params_file,
            "--backend",
            "onnx",
            "--model",
            altered,
            "--out",
            tmp_path / "p.csv",
            good,
        ]
    )
    assert rc == 2 and not (tmp_path / "p.csv").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {altered}: ONNX model content does not match its recorded hash (damaged or altered graph, "
        "weights or metadata); export it again from the checkpoint"
    )


def test_signed_onnx_export_with_a_shared_key(exported, tiny_pipeline, tmp_path, monkeypatch, capsys):
    from hdmap_ad.apps.cli import main
    from hdmap_ad.core.onnx_scorer import OnnxScorer

    key = "k" * 32
    monkeypatch.setenv("HDMAP_AD_SIGNING_KEY", key)
    # an unsigned file (exported without the key) is refused while a key is set
    with pytest.raises(Exception, match="not signed, and a signing key is set"):
        OnnxScorer(exported)
    monkeypatch.chdir(tiny_pipeline.root)
    import shutil

    model = tmp_path / "model.pt"  # the shared checkpoint, unsigned: export refuses it until it is signed
    shutil.copy(tiny_pipeline.checkpoint, model)
    export = ["export", "--params", tiny_pipeline.params_file, "--model", model]
    assert main([*map(str, export), "--format", "onnx", "--out", str(tmp_path / "refused.onnx")]) == 2
    assert "not signed, and a signing key is set" in capsys.readouterr().err
    assert main(["checkpoint", "sign", str(model)]) == 0
    signed = tmp_path / "signed.onnx"
    assert main([*map(str, export), "--format", "onnx", "--out", str(signed)]) == 0
    scorer = OnnxScorer(signed)
    assert len(scorer.info["signature"]) == 64
    capsys.readouterr()
    assert main(["checkpoint", "verify", str(signed)]) == 0
    assert "content matches its hash and its signature" in capsys.readouterr().out
    monkeypatch.setenv("HDMAP_AD_SIGNING_KEY", "another key, also long")
    assert main(["checkpoint", "verify", str(signed)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {signed}: signature does not match the signing key (altered, or signed with another key); not loaded"
    )
    monkeypatch.delenv("HDMAP_AD_SIGNING_KEY")  # no key: the signature is not checked, the hash still is
    assert OnnxScorer(signed).thresholds == OnnxScorer(exported).thresholds


def test_onnx_backend_serves_the_same_contract(exported, tiny_pipeline, tmp_path):
    """`hdmap-ad serve --backend onnx` of the exported file: MLflow's /invocations contract, and the
    requests an ONNX graph cannot answer refused with one line."""
    onnx_pipeline = TinyPipeline(**{**tiny_pipeline.__dict__, "checkpoint": exported})
    with serving(onnx_pipeline, tmp_path, "--backend", "onnx") as (port, _, _):
        maps = _test_maps(tiny_pipeline)[1][:4]  # within the server's MAX_MAPS
        status, answer = http("127.0.0.1", port, "POST", "/invocations", json.dumps({"inputs": maps.tolist()}).encode())
        assert status == 200 and len(answer["predictions"]) == len(maps), answer
        body = json.dumps({"inputs": [[[1.0]]], "params": {"resize": True}}).encode()
        status, answer = http("127.0.0.1", port, "POST", "/invocations", body)
        assert status == 400 and "not available on an exported ONNX model" in answer["message"]
        status, answer = http("127.0.0.1", port, "POST", "/invocations", json.dumps({"inputs": [[[1.0]]]}).encode())
        assert status == 400 and "shape 1x1, the model was trained on 31x95" in answer["message"]
