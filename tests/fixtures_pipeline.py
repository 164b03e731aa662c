"""A tiny but real trained pipeline (synth -> prepare -> train -> evaluate) for tests of a trained model.

Built with the project's own code in a temporary folder: a 10-block ViT with 32-d embeddings
(random weights), 28×84 inputs, 5 training steps, two domains, and an MLflow sqlite store of its
own. `build_tiny_pipeline(root)` makes it (and records it in root/tiny_pipeline.json);
`clone_tiny_pipeline(root, dest)` copies it, MLflow store included, so each pytest-xdist worker uses a
copy of one build (tests/conftest.py `tiny_pipeline`).

The process-global state it touches (cwd, MLFLOW_TRACKING_URI / DVC_ROOT, MLflow's tracking URI)
is restored afterwards; `pipeline.env()` gives the environment a subprocess needs.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

import shipped
import tiny
from dvc_repo import clone_repo

REPO = Path(__file__).resolve().parents[1]
RECORD = "tiny_pipeline.json"
PATH_FIELDS = ("root", "params_file", "checkpoint", "scores_csv", "data_root")
DOMAINS = ["domain_A", "domain_C"]
EXPERIMENT = "hdmap-tiny-test"


@dataclass(frozen=True)
class TinyPipeline:
    root: Path  # the working directory the stages ran in
    params_file: Path
    tracking_uri: str
    checkpoint: Path  # models/model.safetensors
    scores_csv: Path  # metrics/scores.csv of the evaluate stage
    data_root: Path  # the synthetic raw maps
    domains: list[str]
    run_id: str
    model_uri: str  # the pyfunc model logged into the run (models:/<model id>)
    thresholds: dict

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(MLFLOW_TRACKING_URI=self.tracking_uri, DVC_NO_ANALYTICS="1", HDMAP_AD_DEVICE="cpu", **extra)
        return env


def tiny_params(root: Path) -> dict:
    raw = shipped.params()
    raw.update(method="baseline", seed=0, profile="quick")
    raw["data"].update(root="data/raw/synthetic", domains=DOMAINS, prepared="data/prepared", val_ratio=0.25)
    raw["synth"].update(
        out="data/raw/synthetic", n_train=16, n_test_good=6, n_test_fault=6, height=31, width=95, seed=0
    )
    raw["preprocess"] = {"resize": list(tiny.SIZE), "crop": list(tiny.SIZE)}
    raw["model"].update(
        encoder="small",
        weights="random",
        target_blocks=None,
        encoder_overrides=dict(tiny.ENCODER),
    )
    raw["train"].update(steps=5, batch_size=4, warmup_steps=2, val_every=1000, amp="off")
    raw["runtime"].update(log_every=5, checkpoint_every=5, device="cpu", resume="never", feature_cache="auto")
    raw["evaluate"].update(batch_size=8, n_examples=2)
    raw["mlflow"].update(experiment=EXPERIMENT, tracking_uri=None)
    return raw


@contextlib.contextmanager
def _inside(root: Path, env: dict[str, str]):
    old_cwd, old_env = Path.cwd(), {k: os.environ.get(k) for k in env}
    os.chdir(root)
    os.environ.update(env)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_tiny_pipeline(root: Path) -> TinyPipeline:
    import mlflow

    from hdmap_ad.core.checkpoint import load
    from hdmap_ad.core.config import load_params
    from hdmap_ad.pipeline import evaluation, serving, training
    from hdmap_ad.pipeline.data import prepare_dataset
    from hdmap_ad.pipeline.synth import SynthConfig, generate

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params(root), sort_keys=False))
    previous_uri = mlflow.get_tracking_uri() if "MLFLOW_TRACKING_URI" in os.environ else None
    with _inside(root, {"MLFLOW_TRACKING_URI": uri, "DVC_ROOT": str(root), "DVC_NO_ANALYTICS": "1"}):
        params = load_params(params_file)
        s = params.synth
        generate(
            Path(s.out),
            SynthConfig(
                n_train=s.n_train,
                n_test_good=s.n_test_good,
                n_test_fault=s.n_test_fault,
                height=s.height,
                width=s.width,
                seed=s.seed,
                domains=tuple(params.data.domains),
            ),
            progress=False,
        )
        prepare_dataset(params.data_root, params.data.domains, Path(params.data.prepared), progress=False)
        summary = training.train(params)
        evaluation.evaluate(params)
        run_id = summary["run_id"]
        mlflow.set_tracking_uri(uri)
        run = mlflow.MlflowClient().get_run(run_id)
        logged = serving.find_logged_model(run)
        if logged is None:  # until training logs the pyfunc model itself
            with mlflow.start_run(run_id=run_id):
                serving.log_pyfunc_model(training.MODEL_FILE)
            logged = serving.find_logged_model(run)
        thresholds = load(training.MODEL_FILE)["thresholds"]
    if previous_uri is not None:
        mlflow.set_tracking_uri(previous_uri)
    built = TinyPipeline(
        root=root,
        params_file=params_file,
        tracking_uri=uri,
        checkpoint=root / training.MODEL_FILE,
        scores_csv=root / evaluation.SCORES_FILE,
        data_root=root / params.data_root,
        domains=list(DOMAINS),
        run_id=run_id,
        model_uri=f"models:/{logged.model_id}",
        thresholds=dict(thresholds),
    )
    (root / RECORD).write_text(json.dumps(asdict(built), default=str))
    return built


def clone_tiny_pipeline(template: Path, dest: Path) -> TinyPipeline:
    """A working copy of a built pipeline at `dest`: its files, and its MLflow store pointing at the
    copy's artifacts (tests/dvc_repo.py `clone_repo`); same run and model ids."""
    template, dest = Path(template).resolve(), clone_repo(template, dest)
    record = json.loads((dest / RECORD).read_text())
    for name in PATH_FIELDS:
        record[name] = dest / Path(record[name]).relative_to(template)
    record["tracking_uri"] = f"sqlite:///{dest / 'mlflow.db'}"
    return TinyPipeline(**record)
