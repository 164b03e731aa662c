"""Several machines, one `mlflow server`, experiments shared through a DVC remote (docs/multi-machine.md).

Two independent clones of a tiny git+DVC repository play two machines. Each logs a run to a loopback
`mlflow server` (MLFLOW_TRACKING_URI); `dvc exp push origin` / `dvc exp pull origin` move an experiment
from one to the other through a bare git remote and a local-directory DVC remote; machine A then runs
a real `hdmap-ad grid` (DVC queue, 2 workers) for one more seed, which ends with `hdmap-ad compare`
against the server, and compare finds every run of both machines.

The clones' stage is a stand-in for `hdmap-ad train && hdmap-ad evaluate`: it logs one run with the
tags and metric names the real stages log (run name, method, seed, profile, git_commit, dvc_exp_name,
comparison_key, evaluated, invalid_domains, test_<metric>/<domain>), so the sharing mechanics are what is tested.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import shipped
from servers import running_mlflow_server, sh

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXPERIMENT = "hdmap-multimachine"

STAND_IN = '''\
"""Stand-in for `hdmap-ad train && hdmap-ad evaluate`: one MLflow run tagged and named like the real one."""
import hashlib, json, os, random
from pathlib import Path

import mlflow
import yaml

from hdmap_ad.pipeline import tracking

p = yaml.safe_load(open("params.yaml"))
method, seed = p["method"], int(p["seed"])
exp_id = tracking.ensure_experiment(p["mlflow"]["experiment"], p["mlflow"].get("tracking_uri"))
rng = random.Random(f"{method}-{seed}")
level = {"baseline": 0.90, "gem": 0.93}.get(method, 0.9)
metrics = {}
for m in ("auroc", "tpr_at_fpr_1", "tpr_at_fpr_5"):
    per = [min(1.0, level + rng.gauss(0, 0.01)) for _ in p["data"]["domains"]]
    metrics.update({f"test_{m}/{d}": v for d, v in zip(p["data"]["domains"], per)})
    metrics[f"test_{m}/mean"] = sum(per) / len(per)
# (stands in for Params.comparison_key: the training sections only, so any method, seed or compare setting shares it)
key = hashlib.sha256(json.dumps({k: p.get(k) for k in ("data", "preprocess", "model", "score", "train")},
                                sort_keys=True).encode()).hexdigest()[:16]
tags = {"method": method, "seed": str(seed), "profile": p["profile"], "stage": "trained", "comparison_key": key,
        "git_commit": tracking.git_commit() or "unknown", "machine": os.environ.get("MACHINE", "")}
if os.environ.get("DVC_EXP_NAME"):
    tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
with mlflow.start_run(experiment_id=exp_id, run_name=f"{method}-seed{seed}", tags=tags) as run:
    mlflow.log_metrics(metrics)
    mlflow.set_tags({"evaluated": "true", "invalid_domains": ""})
Path("models").mkdir(exist_ok=True)
Path("models/run.txt").write_text(run.info.run_id + "\\n")
Path("metrics").mkdir(exist_ok=True)
Path("metrics/eval.json").write_text(json.dumps({"run_id": run.info.run_id, "mean_auroc": metrics["test_auroc/mean"]}))
'''

DVC_YAML = """\
stages:
  train:
    cmd: python standin.py
    deps: [standin.py]
    params: [method, seed, mlflow]
    outs: [models/run.txt]
    metrics:
      - metrics/eval.json:
          cache: false
"""


@pytest.fixture
def mlflow_server(tmp_path):
    with running_mlflow_server(tmp_path) as url:
        yield url


def test_two_machines_share_one_server_and_a_dvc_remote(tmp_path, mlflow_server):
    import mlflow

    from hdmap_ad.pipeline import tracking

    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        DVC_NO_ANALYTICS="1",
        MLFLOW_TRACKING_URI=mlflow_server,
        PYTHONPATH=str(REPO / "src"),
    )
    env.pop("DVC_ROOT", None)
    origin, remote, seed_repo = tmp_path / "origin.git", tmp_path / "dvc-remote", tmp_path / "seed"
    sh(["git", "init", "-q", "--bare", str(origin)], tmp_path, env)
    seed_repo.mkdir()
    sh(["git", "init", "-q", "-b", "main"], seed_repo, env)
    params = shipped.text("params.yaml").replace("experiment: hdmap-dinomaly", f"experiment: {EXPERIMENT}")
    (seed_repo / "params.yaml").write_text(params)
    (seed_repo / "dvc.yaml").write_text(DVC_YAML)
    (seed_repo / "standin.py").write_text(STAND_IN)
    (seed_repo / ".gitignore").write_text("mlflow.db\nmlartifacts/\n/reports/\n/metrics/compare.json\n")
    sh([str(BIN / "dvc"), "init", "-q"], seed_repo, env)
    sh([str(BIN / "dvc"), "remote", "add", "-d", "storage", str(remote)], seed_repo, env)
    for cmd in (
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "tiny repo"],
        ["git", "remote", "add", "origin", str(origin)],
        ["git", "push", "-q", "origin", "main"],
    ):
        sh(cmd, seed_repo, env)

    machines = {}
    for name in ("A", "B"):
        clone = tmp_path / f"machine-{name}"
        sh(["git", "clone", "-q", "-b", "main", str(origin), str(clone)], tmp_path, env)
        sh(["git", "config", "user.name", f"machine {name}"], clone, env)
        sh(["git", "config", "user.email", f"{name}@example.invalid"], clone, env)
        machines[name] = (clone, dict(env, MACHINE=name))

    # the store and experiment are created once, before any machine logs (hdmap-ad init-tracking does this)
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    try:
        exp_id = tracking.ensure_experiment(EXPERIMENT)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]

    (a, env_a), (b, env_b) = machines["A"], machines["B"]
    dvc = str(BIN / "dvc")
    sh([dvc, "exp", "run", "-n", "a-baseline-42", "-S", "method=baseline", "-S", "seed=42"], a, env_a)
    sh([dvc, "exp", "run", "-n", "b-gem-42", "-S", "method=gem", "-S", "seed=42"], b, env_b)
    run_id_b = (b / "models/run.txt").read_text().strip()

    # B shares its experiment: git refs to origin, the cached output to the DVC remote; A pulls it
    sh([dvc, "exp", "push", "origin", "b-gem-42"], b, env_b)
    assert any(remote.rglob("*")), "dvc exp push sent nothing to the DVC remote"
    assert "b-gem-42" in sh([dvc, "exp", "list", "origin", "--name-only"], a, env_a)
    sh([dvc, "exp", "pull", "origin", "b-gem-42"], a, env_a)
    shown = json.loads(sh([dvc, "exp", "show", "--json"], a, env_a))
    names = {
        e.get("name") for entry in shown for exp in (entry.get("experiments") or []) for e in (exp.get("revs") or [])
    }
    assert {"a-baseline-42", "b-gem-42"} <= names
    sh([dvc, "exp", "apply", "b-gem-42"], a, env_a)  # B's output comes from the DVC remote's cache
    assert (a / "models/run.txt").read_text().strip() == run_id_b

    # machine A runs a real grid (DVC queue, 2 workers) for seed 43; it ends with compare against the server
    sh(["git", "checkout", "-q", "--", "."], a, env_a)
    out = sh(
        [
            str(BIN / "hdmap-ad"),
            "grid",
            "--methods",
            "baseline,gem",
            "--seeds",
            "43",
            "-j",
            "2",
            "--poll",
            "1",
            "--set",
            "compare.metrics=[auroc]",
        ],
        a,
        env_a,
        timeout=150,
    )
    (tmp_path / "grid.out").write_text(out)
    assert "2/2 done (0 failed)" in out, out

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([exp_id])  # (a filter `tags.kind != 'compare'` would also drop runs without the tag)
    by_key = {
        (r.data.tags.get("method"), r.data.tags.get("seed")): r for r in runs if r.data.tags.get("kind") != "compare"
    }
    assert set(by_key) == {("baseline", "42"), ("gem", "42"), ("baseline", "43"), ("gem", "43")}
    assert by_key[("gem", "42")].data.tags["dvc_exp_name"] == "b-gem-42"  # MLflow run <-> DVC experiment
    assert by_key[("gem", "42")].data.tags["machine"] == "B" and by_key[("baseline", "43")].data.tags["machine"] == "A"

    saved = json.loads((a / "reports/comparison.json").read_text())
    assert saved["tracking_uri"] == mlflow_server
    assert {m: sorted(r) for m, r in saved["runs"].items()} == {"baseline": ["42", "43"], "gem": ["42", "43"]}
    c = [c for c in saved["comparisons"] if (c["method"], c["scope"], c["metric"]) == ("gem", "mean", "auroc")][0]
    assert c["seeds"] == [42, 43] and c["p_ttest"] is not None
    assert client.search_runs([exp_id], "tags.kind = 'compare'") == []  # compare runs have their own experiment
    (crun,) = client.search_runs(
        [client.get_experiment_by_name(f"{EXPERIMENT}-compare").experiment_id], "tags.kind = 'compare'"
    )
    assert {a.path for a in client.list_artifacts(crun.info.run_id)} >= {
        "compare.json",
        "comparison.md",
        "comparison.json",
        "plots",
    }
