"""The compare stage against runs built directly in a temporary sqlite MLflow store (no training).

Every store is a copy of one migrated template database, so a test pays no schema migration. The fake
runs carry what training.py and evaluation.py log: tags (method, seed, profile, comparison_key,
data_digest), a few flattened config params and metrics named test_<metric>/<scope>.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from scipy.stats import ttest_rel

import shipped
from hdmap_ad.apps import compare
from hdmap_ad.core.config import Params, flatten
from hdmap_ad.core.method_params import METHODS
from hdmap_ad.pipeline.stats import holm_adjust

if TYPE_CHECKING:
    import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ["domain_A", "domain_B", "domain_C", "domain_D"]
METRICS = ["auroc", "ap", "f1_max", "tpr_at_fpr_1", "tpr_at_fpr_5"]  # what runs log to MLflow (headline metrics)
SEEDS = [42, 43, 44, 123, 456]
EXPERIMENT = "hdmap-compare-test"
LEVEL = {"baseline": 0.90, "gem": 0.92, "focal": 0.89, "topk": 0.93}
KEY = "a1b2c3d4e5f60718"  # the comparison group of most fake runs
MANIFEST = "9c8d7e6f" + "0" * 24
# the flattened resolved config training.py logs as params (the defaults; a run's own values override them)
CONFIG = {k: str(v) for k, v in flatten(Params().resolved()).items()}


def fake_metrics(method: str, seed: int, invalid: tuple[str, ...] = ()) -> dict[str, float]:
    """test_<metric>/<scope> as evaluation.py logs them: fractions, per domain + mean + pooled."""
    rng = np.random.default_rng([seed, sum(map(ord, method))])
    out, per = {}, {}
    for d in DOMAINS:
        if d in invalid:  # evaluation logs no metrics for a domain with NaN/Inf scores
            continue
        for k, m in enumerate(METRICS):
            v = LEVEL.get(method, 0.9) - 0.02 * k / len(METRICS) + rng.normal(0, 0.01)
            v = float(np.clip(v, 0, 1)) if m != "threshold" else float(rng.uniform(0.2, 0.5))
            out[f"test_{m}/{d}"] = v
            per.setdefault(m, []).append(v)
    for m, vs in per.items():
        if m != "threshold":
            out[f"test_{m}/mean"] = float(np.mean(vs))  # logged even when a domain is invalid (mean of the valid ones)
            out[f"test_{m}/pooled"] = float(np.clip(np.mean(vs) + rng.normal(0, 0.003), 0, 1))
    return out


def fake_scores(method: str, seed: int, n_good: int = 20, n_fault: int = 20) -> pd.DataFrame:
    """metrics/scores.csv as evaluation.py writes it (path, domain, label, score), every domain, in file
    order. One seed's two methods share most of their noise (same initialisation and batches), as real
    paired runs do; the method adds a little of its own and its level."""
    import pandas as pd

    frames = []
    for k, d in enumerate(DOMAINS):
        labels = np.r_[np.zeros(n_good, int), np.ones(n_fault, int)]
        paths = [f"data/raw/{d}/test/{'fault' if y else 'good'}/{i:04d}.png" for i, y in enumerate(labels)]
        shared = np.random.default_rng([seed, k]).normal(size=labels.size)
        own = np.random.default_rng([seed, k, sum(map(ord, method))]).normal(size=labels.size)
        score = shared + 0.5 * own + (1.0 + 10 * (LEVEL.get(method, 0.9) - 0.9)) * labels
        frames.append(pd.DataFrame({"path": paths, "domain": d, "label": labels, "score": score}))
    return pd.concat(frames, ignore_index=True)


def metrics_from_scores(method: str, seed: int, scores: pd.DataFrame) -> dict[str, float]:
    """fake_metrics with the AUROCs of the given per-map scores (as evaluate computes them from the same file)."""
    from sklearn.metrics import roc_auc_score

    out = fake_metrics(method, seed)
    aucs = [roc_auc_score(g["label"], g["score"]) for _, g in scores.groupby("domain", sort=False)]
    out.update({f"test_auroc/{d}": float(a) for d, a in zip(DOMAINS, aucs)})
    out["test_auroc/mean"] = float(np.mean(aucs))
    return out


def log_run(
    experiment_id: str,
    method: str,
    seed: int,
    *,
    status: str = "FINISHED",
    evaluated: bool = True,
    invalid: tuple[str, ...] = (),
    profile: str = "quick",
    metrics: dict | None = None,
    key: str | None = KEY,
    manifest: str = MANIFEST,
    params: dict | None = None,
    scores: pd.DataFrame | None = None,
    tags: dict | None = None,
) -> str:
    """One training+evaluation run, logged as training.py/evaluation.py do (fluent API). `key` None: a
    run of an older version (no comparison_key tag). `scores`: logged as the artifact eval/scores.csv.
    `tags`: more tags (evaluation's eval_precision)."""
    import tempfile

    import mlflow

    tags = {
        "method": method,
        "seed": str(seed),
        "profile": profile,
        "git_commit": "abc1234def",
        "stage": "trained",
        "data_digest": manifest,
        **(tags or {}),
    }
    if key is not None:
        tags["comparison_key"] = key
    name = f"{method}-seed{seed}-{(key or 'old')[:6]}"
    if status == "RUNNING":  # a process killed mid-run leaves its run RUNNING: never ended
        run = mlflow.MlflowClient().create_run(experiment_id, run_name=name, tags=tags)
        mlflow.MlflowClient().log_batch(
            run.info.run_id,
            metrics=[
                mlflow.entities.Metric(k, v, int(time.time() * 1000), 0)
                for k, v in (metrics or fake_metrics(method, seed)).items()
            ],
        )
        return run.info.run_id
    run = mlflow.start_run(experiment_id=experiment_id, run_name=name)
    mlflow.set_tags(tags)
    mlflow.log_params({**CONFIG, "method": method, "seed": str(seed), **(params or {})})
    mlflow.log_metric("train/loss", 0.1, step=10)
    if evaluated:
        mlflow.log_metrics(metrics or fake_metrics(method, seed, invalid))
        mlflow.set_tags({"evaluated": "true", "invalid_domains": ",".join(invalid)})
        if scores is not None:
            with tempfile.TemporaryDirectory() as tmp:
                scores.to_csv(Path(tmp) / "scores.csv", index=False)
                mlflow.log_artifact(str(Path(tmp) / "scores.csv"), artifact_path="eval")
    mlflow.end_run(status=status)
    return run.info.run_id


@pytest.fixture(scope="session")
def template_db(tmp_path_factory) -> Path:
    import mlflow

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # creates and migrates the schema
    return path


@pytest.fixture
def store(template_db, tmp_path, monkeypatch):
    """A fresh store (copy of the template) with the experiment created as `hdmap-ad init-tracking` does."""
    import mlflow

    from hdmap_ad.pipeline import tracking

    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    exp_id = tracking.ensure_experiment(EXPERIMENT)
    mlflow.set_tracking_uri(uri)
    yield exp_id
    while mlflow.active_run():
        mlflow.end_run()


def settings(**kw) -> compare.Settings:
    """The test experiment, with few bootstrap resamples (fast; the numbers are checked against direct calls)."""
    return compare.Settings(experiment=EXPERIMENT, **{"bootstrap_resamples": 200, **kw})


def run(tmp_path: Path, plots: bool = False, settings_: compare.Settings | None = None, **kw) -> tuple[dict, str]:
    """compare.run_compare; returns the details (reports/comparison.json) and the Markdown report."""
    from rich.console import Console

    with open(tmp_path / "console.txt", "w") as f:
        compare.run_compare(
            settings_ or settings(),
            console=Console(width=200, file=f),
            plots_dir=(tmp_path / "reports/plots") if plots else None,
            **kw,
        )
    saved = json.loads((tmp_path / "reports/comparison.json").read_text())
    return saved, (tmp_path / "reports/comparison.md").read_text()


OUTPUTS = ("metrics/compare.json", "reports/comparison.md", "reports/comparison.json")


def snapshot(root: Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in OUTPUTS}


def fake_prepared(folder: Path, content: str = "one map") -> str:
    """A prepared-data folder as `prepare` leaves it (PreparedData.load accepts it); returns its data digest."""
    from hdmap_ad.pipeline.data import PreparedData

    folder.mkdir(parents=True)
    manifest = f"path,mask_path,phase,domain,split,index\n{content},,train,domain_A,train,0\n"
    (folder / "manifest.csv").write_text(manifest)
    (folder / "summary.json").write_text(json.dumps({"domains": {d: {"train": 1} for d in DOMAINS}, "shape": [31, 95]}))
    for d in DOMAINS:
        (folder / d).mkdir()
        for name in ("train.npy", "test.npy", "test_labels.npy"):
            (folder / d / name).write_bytes(content.encode())
    return PreparedData.load(folder).data_digest()


def workspace_params(tmp_path: Path, *extra: str) -> Path:
    """A small params.yaml (defaults for everything else) naming the test experiment and a prepared folder."""
    path = tmp_path / "params.yaml"
    path.write_text(
        "\n".join(
            [
                f"mlflow: {{experiment: {EXPERIMENT}}}",
                "data: {prepared: prepared}",
                "profile: quick",
                "profiles: {quick: {}}",
                *extra,
            ]
        )
        + "\n"
    )
    return path


def read_back() -> dict[str, dict[str, dict[int, float]]]:
    """method -> metric key -> seed -> value, as MLflow stores them (independent of compare's own reading)."""
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    out: dict = {}
    for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED' and tags.evaluated = 'true'"):
        for key, value in r.data.metrics.items():
            out.setdefault(r.data.tags["method"], {}).setdefault(key, {})[int(r.data.tags["seed"])] = value
    return out


def comparison(saved: dict, method: str, scope: str, metric: str) -> dict:
    (c,) = [c for c in saved["comparisons"] if (c["method"], c["scope"], c["metric"]) == (method, scope, metric)]
    return c


def table_cells(md: str) -> list[str]:
    cells = []
    for line in md.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[\s\-:|]+\|", line):
            cells += [c.strip() for c in line.strip().strip("|").split("|")]
    return cells


def test_full_grid_matches_scipy_fills_every_table_and_logs_a_compare_run(store, tmp_path):
    import mlflow

    for method in ("baseline", "gem", "focal"):
        for seed in SEEDS:
            log_run(store, method, seed)
    saved, md = run(tmp_path)  # (plots: see test_grid, which compares with them)

    assert saved["methods"] == ["baseline", "gem", "focal"]
    assert saved["left_out"] == [] and saved["invalid"] == []
    # p-values equal scipy's on the per-seed numbers read back from MLflow, for every scope and metric
    back = read_back()
    for method in ("gem", "focal"):
        for scope in DOMAINS + ["mean", "pooled"]:
            for metric in METRICS:
                key = f"test_{metric}/{scope}"
                b, m = back["baseline"].get(key), back[method].get(key)
                if not b:
                    continue  # threshold has no mean/pooled value
                c = comparison(saved, method, scope, metric)
                t = ttest_rel([m[s] for s in SEEDS], [b[s] for s in SEEDS])
                assert c["seeds"] == SEEDS and c["n"] == 5
                assert c["p_ttest"] == pytest.approx(t.pvalue, rel=1e-9)
                assert c["t_stat"] == pytest.approx(t.statistic, rel=1e-9)
                assert c["delta"] == pytest.approx(np.mean(list(m.values())) - np.mean(list(b.values())))
    # Holm over one table: every method x (domains + mean) of one metric
    family = [c for c in saved["comparisons"] if c["holm_family"] == "auroc:table"]
    assert len(family) == 2 * 5
    assert [c["p_holm"] for c in family] == pytest.approx(holm_adjust([c["p_ttest"] for c in family]))
    assert {c["significance"] for c in family} <= {"*", "**", "***", "n.s."}

    # the report: the plan's tables, every cell filled, percent with 2 decimals, std stated as ddof=1
    for title in (
        "## Baseline (`baseline`)",
        "## Method 1 (GEM) (`gem`)",
        "### AUROC",
        "### TPR@FPR=1%",
        "### TPR@FPR=5%",
        "## Summary Table (All Methods)",
        "### AUROC (Mean±Std)",
        "### TPR@FPR=5% (Mean±Std)",
        "## Statistical significance (vs Baseline)",
        "### AUROC: p-value",
        "### TPR@FPR=1%: details",
    ):
        assert title in md
    assert "ddof=1" in md and "| **Mean±Std** |" in md
    cells = table_cells(md)
    assert not [c for c in cells if c in ("-", "–", "—", "", "n/a", "no data", "missing (no run)")]
    b42 = back["baseline"]["test_auroc/domain_C"][42]
    assert "| 42 | " in md and f"{100 * b42:.2f}" in md
    assert re.search(r"\| Method 3 \(Focal\) \| [\d.]+ → [\d.]+ ", md)  # p-value table: t-test p → Holm p, mark

    # the compare run holds the outputs; a second compare does not count compare runs as training runs
    client = mlflow.MlflowClient()
    assert client.search_runs([store], "tags.kind = 'compare'") == []  # the training experiment: training runs only
    compare_exp = client.get_experiment_by_name(f"{EXPERIMENT}-compare")
    (crun,) = client.search_runs([compare_exp.experiment_id], "tags.kind = 'compare'")
    # named by what it compares; the verdicts are tags, the same as in the outputs
    assert crun.info.run_name == "gem,focal vs baseline × seeds 42,43,44,123,456 × group a1b2c3"
    # the terminal names the run and the experiment it went to (not one of the metric keys)
    assert f"{crun.info.run_id} (experiment '{EXPERIMENT}-compare')" in (tmp_path / "console.txt").read_text()
    assert crun.info.status == "FINISHED"
    assert crun.data.tags["verdict/gem"] == saved["verdicts"]["gem"]["verdict"]
    assert crun.data.tags["verdict/gem/mean/auroc"] == comparison(saved, "gem", "mean", "auroc")["verdict"]["verdict"]
    assert crun.data.metrics["n_paired_auroc/gem/mean"] == 5
    arts = {a.path for a in client.list_artifacts(crun.info.run_id)}
    assert {"compare.json", "comparison.md", "comparison.json"} <= arts
    assert crun.data.tags["comparison_key"] == KEY
    assert crun.data.metrics["p_holm_auroc/gem/mean"] == pytest.approx(
        comparison(saved, "gem", "mean", "auroc")["p_holm"]
    )
    again, _ = run(tmp_path, log_run=False)
    assert again["n_runs_found"] == 15 and again["left_out"] == []
    # the terminal summary: the verdicts first, then one table per listed metric
    console = (tmp_path / "console.txt").read_text()
    assert "baseline   5 run(s), seeds 42, 43, 44, 123, 456" in console
    assert console.index("Verdicts") < console.index("AUROC (%): mean ± std")
    assert "gem (Method 1 (GEM): " in console


def test_killed_failed_unevaluated_and_repeated_runs(store, tmp_path):
    for seed in SEEDS:
        log_run(store, "baseline", seed)
    log_run(store, "gem", 42, metrics=fake_metrics("gem", 999))  # older duplicate of (gem, 42): superseded
    time.sleep(0.01)
    for seed in (42, 43, 456):
        log_run(store, "gem", seed)
    killed = log_run(store, "gem", 44, status="RUNNING")
    failed = log_run(store, "gem", 123, status="FAILED")
    trained_only = log_run(store, "baseline", 44, evaluated=False)  # newer but never evaluated: ignored
    other_profile = log_run(store, "gem", 44, profile="paper")
    saved, md = run(tmp_path)

    reasons = {x["run_id"]: x["reason"] for x in saved["left_out"]}
    assert reasons[killed].startswith("unfinished (status RUNNING")
    assert reasons[failed].startswith("failed")
    assert reasons[trained_only].startswith("not evaluated")
    assert reasons[other_profile].startswith("profile 'paper'")
    assert saved["runs"]["gem"].keys() == {"42", "43", "456"}
    (dup,) = saved["superseded"]
    assert dup["method"] == "gem" and dup["seed"] == 42 and len(dup["ignored"]) == 1
    assert saved["runs"]["gem"]["42"]["run_id"] == dup["used"]

    c = comparison(saved, "gem", "domain_B", "auroc")
    assert c["seeds"] == [42, 43, 456]
    b, m = (
        read_back()["baseline"]["test_auroc/domain_B"],
        {s: fake_metrics("gem", s)["test_auroc/domain_B"] for s in (42, 43, 456)},
    )
    assert c["p_ttest"] == pytest.approx(
        ttest_rel([m[s] for s in c["seeds"]], [b[s] for s in c["seeds"]]).pvalue, rel=1e-9
    )
    assert any("gem seed(s) 44, 123 have no valid run" in n for n in c["notes"])
    # the report says which runs are missing and why, in the per-seed rows and the notes
    assert re.search(r"\| 44 \| missing \(unfinished, profile paper\)", md)
    assert re.search(r"\| 123 \| missing \(failed\)", md)
    assert "gem: paired on seeds 42, 43, 456" in md
    assert "(n=3)" in md  # gem's Mean±Std over fewer seeds than the baseline's
    assert f"`{killed}`" in md and "Left out" in md and "the latest" in md


def test_runs_pair_only_at_one_precision(store, tmp_path):
    """train.amp=auto resolves per machine: the same params train in bf16 on one machine and in float32 on
    another. Such runs share a comparison key but must not be paired."""

    def log(method, seed, train="off", scored="off", **kw):
        return log_run(store, method, seed, params={"train.amp_resolved": train}, tags={"eval_precision": scored}, **kw)

    for seed in (42, 43, 44):
        log("baseline", seed)
    log("gem", 42), log("gem", 43)
    older_gem44 = log("gem", 44)
    time.sleep(0.01)
    newer_bf16 = log("gem", 44, train="bf16", metrics=fake_metrics("gem", 999))  # newer, another machine
    scored_bf16 = log("focal", 42, scored="bf16")
    trained_bf16 = log("focal", 43, train="bf16")
    predates = log_run(store, "focal", 44)  # logged before precision was recorded: matches any
    saved, md = run(tmp_path)

    assert saved["precision"] == {"train": "off", "evaluate": "off"}
    assert saved["runs"]["gem"]["44"]["run_id"] == older_gem44  # the newer bf16 run does not hide it
    assert saved["superseded"] == []
    assert sorted(saved["runs"]["focal"]) == ["44"] and saved["runs"]["focal"]["44"]["run_id"] == predates
    reasons = {x["run_id"]: x["reason"] for x in saved["left_out"]}
    assert set(reasons) == {newer_bf16, scored_bf16, trained_bf16}
    assert reasons[newer_bf16].startswith(
        "other precision: trained in bf16, scored in float32, the compared runs trained in float32, scored in float32"
    )
    assert reasons[scored_bf16].startswith("other precision: trained in float32, scored in bf16")
    assert comparison(saved, "gem", "domain_A", "auroc")["seeds"] == [42, 43, 44]
    assert "Every compared run was trained in float32, scored in float32" in md
    console = (tmp_path / "console.txt").read_text()
    assert "precision: trained in float32, scored in float32" in console
    assert "set them to off or bf16" in console

    # the newest baseline run sets the group's precision
    time.sleep(0.01)
    for seed in (42, 43):
        log("baseline", seed, train="bf16")
    saved, _ = run(tmp_path)
    assert saved["precision"] == {"train": "bf16", "evaluate": "off"}
    assert {m: sorted(r) for m, r in saved["runs"].items()} == {
        "baseline": ["42", "43"],
        "gem": ["44"],
        "focal": ["43", "44"],
    }


def test_fewer_than_two_pairs_and_a_single_method(store, tmp_path):
    from hdmap_ad.apps import cli

    for seed in (42, 43):
        log_run(store, "baseline", seed)
    log_run(store, "focal", 42)
    log_run(store, "focal", 44)
    params = tmp_path / "params.yaml"
    params.write_text(shipped.text("params.yaml").replace("experiment: hdmap-dinomaly", f"experiment: {EXPERIMENT}"))
    assert cli.main(["compare", "--params", str(params), "--no-plots"]) == 0
    saved = json.loads((tmp_path / "reports/comparison.json").read_text())
    md = (tmp_path / "reports/comparison.md").read_text()
    c = comparison(saved, "focal", "domain_A", "auroc")
    assert c["n"] == 1 and c["seeds"] == [42] and c["p_ttest"] is None and c["p_holm"] is None
    assert "fewer than 2 paired seeds: no p-value" in c["notes"]
    assert "n/a (n=1)" in md and "fewer than 2 paired seeds → no p-value" in md
    assert c["delta"] is not None  # the difference itself is still reported

    # one method only: all outputs still written, and they say there is nothing to compare
    saved, md = run(tmp_path, methods=["baseline"])
    assert saved["methods"] == ["baseline"] and saved["comparisons"] == []
    assert "MLflow run 'baseline alone × seeds 42" in (tmp_path / "console.txt").read_text()
    assert "nothing to compare" in md and "### AUROC (Mean±Std)" in md
    assert any("not compared" in n for n in saved["notes"])  # focal's runs: not selected, said so


def test_invalid_domain_is_left_out_of_that_domain_and_the_mean(store, tmp_path):
    for seed in SEEDS:
        log_run(store, "baseline", seed)
        log_run(store, "topk", seed, invalid=("domain_C",) if seed == 43 else ())
    saved, md = run(tmp_path)

    assert saved["invalid"] == [
        {"method": "topk", "seed": 43, "run_id": saved["runs"]["topk"]["43"]["run_id"], "domains": ["domain_C"]}
    ]
    others = [42, 44, 123, 456]
    assert comparison(saved, "topk", "domain_C", "auroc")["seeds"] == others
    assert comparison(saved, "topk", "mean", "auroc")["seeds"] == others  # a mean over 3 domains is not comparable
    assert comparison(saved, "topk", "pooled", "auroc")["seeds"] == others
    assert comparison(saved, "topk", "domain_A", "auroc")["seeds"] == SEEDS
    assert "43" not in saved["values"]["topk"]["mean"]["auroc"]
    assert any("NaN/Inf" in n for n in comparison(saved, "topk", "domain_C", "auroc")["notes"])
    assert re.search(r"\| 43 \| [\d.]+ \| [\d.]+ \| invalid \| [\d.]+ \| invalid \(domain_C\) \|", md)
    assert "**topk seed 43**" in md and "NaN/Inf scores in domain_C" in md


def test_settings_from_params_and_missing_experiment(tmp_path, monkeypatch, template_db):
    from hdmap_ad.core.errors import HdmapError

    params = tmp_path / "params.yaml"
    params.write_text(shipped.text("params.yaml") + "\n")
    s = compare.load_settings(params, ["compare.methods=[gem,baseline]", "compare.baseline=gem", "profile=paper"])
    assert s.methods == ["gem", "baseline"] and s.baseline == "gem" and s.profile == "paper"
    assert s.metrics == ["auroc", "tpr_at_fpr_1", "tpr_at_fpr_5"] and s.domains[0] == "domain_A"
    with pytest.raises(HdmapError, match="unknown metric"):
        compare.load_settings(params, ["compare.metrics=[auroc,speed]"])
    # runs log only the headline metrics to MLflow: comparing another one could only give "no data"
    with pytest.raises(HdmapError, match=r"unknown metric\(s\) \['precision'\] \(known: auroc, ap, f1_max"):
        compare.load_settings(params, ["compare.metrics=[precision]"])
    # ... refused by the params schema itself (every command that loads the params), naming the key
    from hdmap_ad.core.config import load_params

    with pytest.raises(HdmapError, match=r"compare\.metrics: .*unknown metric\(s\) \['speed'\]"):
        load_params(params, ["compare.metrics=[auroc,speed]"])
    # the uncertainty settings: shipped values, overridable, validated
    assert (s.confidence, s.bootstrap_resamples, s.bootstrap_seed, s.alpha, s.power) == (0.95, 10000, 0, 0.05, 0.8)
    o = compare.load_settings(
        params, ["compare.confidence=0.9", "compare.bootstrap_resamples=500", "compare.power=0.9"]
    )
    assert (o.confidence, o.bootstrap_resamples, o.power) == (0.9, 500, 0.9)
    for bad in ("compare.confidence=1.5", "compare.bootstrap_resamples=0", "compare.alpha=0", "compare.power=1"):
        with pytest.raises(HdmapError, match=re.escape(bad.split("=")[0])):
            compare.load_settings(params, [bad])
    # the one params loader: the whole file is validated, and loading it imports no torch
    with pytest.raises(HdmapError, match="data.source"):
        compare.load_settings(params, ["data.source=anything"])
    assert compare.load_settings(params, ["data.root=/elsewhere"]).domains == s.domains
    assert compare.load_settings(params, ["data.domains=[domain_X]"]).domains == ("domain_X",)
    assert s.params_path == str(params) and compare.load_settings(params, ["seed=3"]).overrides == ("seed=3",)
    shutil.copy(template_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(HdmapError, match="not found"):
        compare.collect(compare.Settings(experiment="never-created"))


def test_no_common_seed_prints_the_unpaired_delta_and_the_command_that_pairs(store, tmp_path):
    log_run(store, "baseline", 42)
    log_run(store, "focal", 44)  # `dvc exp run -S method=focal -S seed=44` next to the default baseline
    saved, md = run(tmp_path)

    console = (tmp_path / "console.txt").read_text()
    line = (
        "not paired: no common seed — run `dvc exp run -S method=baseline -S seed=44` "
        "(or `hdmap-ad grid --methods baseline,focal --seeds 42,44`)"
    )
    assert line in console and line in md and any(line in n for n in saved["notes"])
    b, f = fake_metrics("baseline", 42)["test_auroc/domain_A"], fake_metrics("focal", 44)["test_auroc/domain_A"]
    assert f"unpaired Δ {100 * (f - b):+.2f} pt (no p)" in console
    assert "(n=0)" not in console
    c = comparison(saved, "focal", "domain_A", "auroc")
    assert c["pairing"] == "unpaired" and c["n"] == 0 and c["p_ttest"] is None and c["p_holm"] is None
    assert c["unpaired_delta"] == pytest.approx(f - b)
    (hint,) = saved["unpaired"]
    assert hint["method"] == "focal" and hint["method_seeds"] == [44] and hint["baseline_seeds"] == [42]
    assert f"unpaired {100 * (f - b):+.2f}" in md and "n/a (not paired: no common seed)" in md
    metrics = json.loads((tmp_path / "metrics/compare.json").read_text())
    assert metrics["focal"]["domain_A"]["auroc"]["delta_pts_unpaired"] == pytest.approx(round(100 * (f - b), 4))
    assert (
        "delta_pts" not in metrics["focal"]["domain_A"]["auroc"]
        and "p_holm" not in metrics["focal"]["domain_A"]["auroc"]
    )


def test_only_runs_of_the_workspace_comparison_group_are_paired(store, tmp_path):
    from hdmap_ad.core.config import load_params

    manifest = fake_prepared(tmp_path / "prepared")
    params_path = workspace_params(tmp_path)
    key = load_params(params_path).comparison_key(manifest)
    for seed in (42, 43, 44):
        log_run(store, "baseline", seed, key=key, manifest=manifest)
        log_run(store, "gem", seed, key=key, manifest=manifest)
    time.sleep(0.01)
    # newer runs of other settings and other data: must not replace the workspace group's runs
    short = log_run(
        store,
        "gem",
        42,
        key="ffff0000ffff0000",
        manifest="1a2b" + "0" * 28,
        params={"train.steps": "20"},
        metrics=fake_metrics("gem", 999),
    )
    newest_base = log_run(
        store, "baseline", 45, key="eeee0000eeee0000", manifest=manifest, params={"model.encoder": "large"}
    )
    old = log_run(store, "gem", 46, key=None)
    saved, md = run(tmp_path, settings_=compare.load_settings(params_path))

    assert saved["reference"]["comparison_key"] == key and saved["reference"]["fallback"] is None
    assert {m: sorted(r) for m, r in saved["runs"].items()} == {
        "baseline": ["42", "43", "44"],
        "gem": ["42", "43", "44"],
    }
    reasons = {x["run_id"]: x["reason"] for x in saved["left_out"]}
    steps = CONFIG["train.steps"]
    assert reasons[short].startswith(f"other settings: train.steps 20 ≠ {steps}, data (digest 1a2b… ≠ {manifest[:4]}…)")
    assert reasons[newest_base].startswith(f"other settings: model.encoder large ≠ {CONFIG['model.encoder']} (")
    assert "train.device" not in reasons[short] and "data.root" not in reasons[short]  # not part of the key
    assert reasons[old].startswith("no `comparison_key` tag")
    assert comparison(saved, "gem", "domain_A", "auroc")["seeds"] == [42, 43, 44]
    console = (tmp_path / "console.txt").read_text()
    assert f"left out gem-seed42-ffff00 ({short[:8]}): other settings: train.steps 20 ≠ {steps}" in console
    assert f"comparison group {key[:6]}" in console and f"`{key}`" in md

    # without prepared data: the newest baseline run's group, and the report says so
    shutil.rmtree(tmp_path / "prepared")
    saved, md = run(tmp_path, settings_=compare.load_settings(params_path))
    assert saved["reference"]["comparison_key"] == "eeee0000eeee0000"
    assert "no prepared data" in saved["reference"]["fallback"] and "newest baseline run" in md
    assert {m: sorted(r) for m, r in saved["runs"].items()} == {"baseline": ["45"]}


def test_unreadable_store_is_one_clear_line(store, tmp_path, capsys, monkeypatch):
    from hdmap_ad.apps import cli
    from hdmap_ad.core.errors import HdmapError

    for seed in (42, 43):
        log_run(store, "baseline", seed)
    # a truncated copy, as a full disk or an interrupted transfer leaves it (at a new path: MLflow keeps the
    # store object of a URI it opened before, and a fresh `hdmap-ad compare` opens it anew)
    db = tmp_path / "copied" / "mlflow.db"
    db.parent.mkdir()
    db.write_bytes((tmp_path / "mlflow.db").read_bytes()[: (tmp_path / "mlflow.db").stat().st_size // 2])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    with pytest.raises(HdmapError) as err:
        compare.run_compare(settings(), plots_dir=None, log_run=False)
    assert str(db) in str(err.value) and "\n" not in str(err.value) and "cannot be read" in str(err.value)
    workspace_params(tmp_path)
    assert cli.main(["compare", "--params", str(tmp_path / "params.yaml"), "--no-plots"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: MLflow store sqlite:///") and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert not (tmp_path / "metrics/compare.json").exists()


def test_lost_store_or_no_valid_run_is_an_error_and_keeps_the_reports(store, tmp_path, monkeypatch):
    from hdmap_ad.core.errors import HdmapError
    from hdmap_ad.pipeline import tracking

    for seed in (42, 43):
        log_run(store, "baseline", seed)
        log_run(store, "gem", seed)
    run(tmp_path, log_run=False)
    before = snapshot(tmp_path)

    # no valid run (here: none of the asked-for profile): error, nothing written
    with pytest.raises(HdmapError, match="no valid run to compare"):
        compare.run_compare(settings(), profile="paper", plots_dir=None, log_run=False)
    assert snapshot(tmp_path) == before

    # the default sqlite store deleted: an error, not an empty report, and no empty store created
    (tmp_path / "mlflow.db").unlink()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(HdmapError, match="does not exist"):
        compare.run_compare(settings(), plots_dir=tmp_path / "reports/plots", log_run=False)
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "mlflow.db").exists()


def test_compare_run_has_its_own_experiment_also_inside_a_dvc_experiment(store, tmp_path, monkeypatch):
    import mlflow

    from hdmap_ad.apps import cli

    for seed in (42, 43):
        log_run(store, "baseline", seed)
        log_run(store, "gem", seed)
    monkeypatch.setenv("DVC_EXP_NAME", "sunny-dogs")
    params = workspace_params(tmp_path)
    assert cli.main(["compare", "--params", str(params), "--no-plots"]) == 0
    client = mlflow.MlflowClient()
    assert client.search_runs([store], "tags.kind = 'compare'") == []
    exp = client.get_experiment_by_name(f"{EXPERIMENT}-compare")
    (crun,) = client.search_runs([exp.experiment_id])
    assert crun.data.tags["kind"] == "compare" and crun.data.tags["dvc_exp_name"] == "sunny-dogs"
    assert crun.data.tags["comparison_key"] == KEY  # no prepared data here: the newest baseline run's group
    assert crun.info.status == "FINISHED"


def test_metrics_file_is_machine_independent_and_deterministic(store, tmp_path):
    import mlflow

    ids = [log_run(store, m, s) for m in ("baseline", "gem") for s in (42, 43, 44)]
    run(tmp_path, plots=True)
    first = (tmp_path / "metrics/compare.json").read_bytes()
    run(tmp_path)  # logs a second compare run, at another time
    assert (tmp_path / "metrics/compare.json").read_bytes() == first
    text = first.decode()
    assert not any(i in text for i in ids) and "sqlite" not in text and str(tmp_path) not in text
    assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d", text)
    metrics = json.loads(text)
    assert set(metrics) == {"baseline", "gem"} and set(metrics["gem"]) == set(DOMAINS) | {"mean", "verdict"}
    assert metrics["gem"]["verdict"] in ("better", "worse", "equivalent", "inconclusive")
    gem = metrics["gem"]["mean"]["tpr_at_fpr_1"]
    assert set(gem) == {"n", "n_paired", "mean_pct", "delta_pts", "p_holm", "verdict"} and gem["n"] == 3
    back = read_back()
    expect = np.mean(list(back["gem"]["test_tpr_at_fpr_1/mean"].values())) - np.mean(
        list(back["baseline"]["test_tpr_at_fpr_1/mean"].values())
    )
    assert gem["delta_pts"] == pytest.approx(100 * expect, abs=1e-4)
    # the rest is in reports/comparison.json
    details = json.loads((tmp_path / "reports/comparison.json").read_text())
    assert details["tracking_uri"].startswith("sqlite:///") and details["generated"]
    assert {r["run_id"] for by in details["runs"].values() for r in by.values()} == set(ids)
    assert {p.name for p in (tmp_path / "reports/plots").iterdir()} == {"data"} | {
        f"{m}_{s}.png" for m in ("auroc", "tpr_at_fpr_1", "tpr_at_fpr_5") for s in DOMAINS + ["mean"]
    }
    assert not [p for p in (tmp_path / "reports").iterdir() if p.name.startswith(".")]  # no temporary left behind
    assert mlflow.MlflowClient().get_experiment_by_name(f"{EXPERIMENT}-compare") is not None


def test_seed_plot_range_is_honest():
    from hdmap_ad.pipeline import plots

    lo, hi, zoomed = plots.comparison_y_range([96.50, 96.86])  # a 0.36-point gap between two means
    assert zoomed and hi - lo >= 10 and lo <= 96.5 - 2 and hi >= 100
    assert 0.36 / (hi - lo) < 0.05  # the gap takes under 5% of the axis, not all of it
    assert plots.comparison_y_range([25.0, 31.0]) == (0.0, 101.0, False)  # values in the lower half: zero-based
    mean, half = plots.seed_interval([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-5)
    assert plots.seed_interval([0.5]) == (0.5, None)


def test_the_typed_result_is_what_the_outputs_show(store, tmp_path):
    """run_compare returns a ComparisonResult: the details file is its to_json(), metrics/compare.json its
    metrics_json(), and each comparison holds the stats module's PairedResult."""
    from dataclasses import asdict, dataclass, fields, replace

    from rich.console import Console

    from hdmap_ad.pipeline.stats import PairedResult

    for seed in (42, 43, 44):
        log_run(store, "baseline", seed)
        log_run(store, "gem", seed)
    with open(tmp_path / "console.txt", "w") as f:
        result = compare.run_compare(settings(), console=Console(file=f), plots_dir=None, log_run=False)
    assert isinstance(result, compare.ComparisonResult)
    saved = json.loads((tmp_path / "reports/comparison.json").read_text())
    assert json.loads(json.dumps(result.to_json())) == saved
    assert json.loads((tmp_path / "metrics/compare.json").read_text()) == result.metrics_json()
    assert (tmp_path / "reports/comparison.md").read_text() == compare.render_markdown(result)

    c = result.comparison("gem", "domain_A", "auroc")
    assert isinstance(c.paired, PairedResult) and c.pairing == "paired" and c.paired.seeds == [42, 43, 44]
    assert c.to_json() == comparison(saved, "gem", "domain_A", "auroc")
    assert result.comparison("baseline", "domain_A", "auroc") is None  # the baseline is not tested against itself
    summary = result.summary["gem"]["domain_A"]["auroc"]
    assert summary.n == 3 and summary.seeds == (42, 43, 44) and summary.mean == pytest.approx(c.paired.method_mean)
    assert list(result.runs) == ["baseline", "gem"] and set(result.runs["gem"]) == {42, 43, 44}

    # a statistic added as a field after `notes` reaches the details JSON under its own name
    @dataclass(frozen=True)
    class WithExtra(compare.Comparison):
        extra: tuple[float, float] | None = None

    extended = WithExtra(**{f.name: getattr(c, f.name) for f in fields(c)}, extra=(0.1, 0.2))
    assert extended.to_json() == {**c.to_json(), "extra": (0.1, 0.2)}
    # the uncertainty fields are such fields: each reaches the JSON, as the dataclass it holds
    for name in ("interval", "improvement", "seeds_needed"):
        assert c.to_json()[name] == asdict(getattr(c, name))
    assert c.to_json()["seeds_needed_text"] == c.seeds_needed_text and "seeds" in c.seeds_needed_text
    assert replace(c, notes=()).to_json()["notes"] == []


def test_a_baseline_without_runs_is_said_in_the_significance_section(store, tmp_path):
    for seed in (42, 43):
        log_run(store, "gem", seed)
        log_run(store, "topk", seed, invalid=("domain_B",) if seed == 43 else ())
    saved, md = run(tmp_path, log_run=False)
    significance = md.split("## Statistical significance (vs Baseline)", 1)[1]
    assert significance.lstrip().startswith("The baseline `baseline` has no valid run: no paired statistics.")
    assert "the baseline `baseline` has no valid run" in " ".join(saved["notes"])
    # the blanks of a run with an invalid domain are listed in a fixed order: its domains, then mean and pooled
    assert list(saved["blanks"]["topk"]["43"]) == ["domain_B", "mean", "pooled"]


# ------------------------------------------------------------------ uncertainty of Δ (docs/design.md#stats-intervals)


def no_nan(text: str) -> dict:
    """JSON text parsed, failing on NaN/Infinity (the outputs must be NaN-free)."""

    def bad(const):
        raise AssertionError(f"{const} in the JSON")

    return json.loads(text, parse_constant=bad)


def pts(v: float) -> str:
    """A Δ as the report writes it (points, sign, 2 decimals), escaped for a regular expression."""
    return re.escape(f"{100 * v:+.2f}")


def per_map_arrays(frames: dict, method: str, baseline: str, seeds: list[int], domain: str):
    """labels, method (S, N) and baseline (S, N) scores in the first baseline seed's file order, matched by path
    (independently of compare's own matching)."""

    def rows_of(frame):
        return frame[frame["domain"] == domain]

    ref = rows_of(frames[baseline, seeds[0]]).reset_index(drop=True)
    rows = {
        who: np.stack([rows_of(frames[who, s]).set_index("path").loc[ref["path"], "score"].to_numpy() for s in seeds])
        for who in (method, baseline)
    }
    return ref["label"].to_numpy(), rows[method], rows[baseline]


def test_every_delta_gets_intervals_delong_bootstrap_and_seeds_needed(store, tmp_path, monkeypatch):
    import mlflow

    from hdmap_ad.apps import cli
    from hdmap_ad.apps.compare.scores import ScoresCache
    from hdmap_ad.pipeline import stats as U

    seeds, frames, ids = [42, 43, 44], {}, {}
    for method in ("baseline", "gem"):
        for seed in seeds:
            frame = fake_scores(method, seed)
            if method == "gem":  # another row order: maps are matched by their path, not their row
                frame = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
            frames[method, seed] = frame
            ids[method, seed] = log_run(
                store, method, seed, scores=frame, metrics=metrics_from_scores(method, seed, frame)
            )
    fetched: list[str] = []
    original = ScoresCache._fetch
    monkeypatch.setattr(ScoresCache, "_fetch", lambda self, run_id: (fetched.append(run_id), original(self, run_id))[1])
    params = workspace_params(tmp_path, "compare: {bootstrap_resamples: 300, bootstrap_seed: 7, confidence: 0.9}")
    assert cli.main(["compare", "--params", str(params), "--no-plots"]) == 0
    text = (tmp_path / "reports/comparison.json").read_text()
    saved, md = no_nan(text), (tmp_path / "reports/comparison.md").read_text()
    assert sorted(fetched) == sorted(ids.values())  # one download per run

    # the seed-level numbers equal direct calls on the per-seed values MLflow holds, for every scope and metric
    back = read_back()
    for scope in DOMAINS + ["mean", "pooled"]:
        for metric in METRICS:
            key = f"test_{metric}/{scope}"
            c = comparison(saved, "gem", scope, metric)
            diffs = [back["gem"][key][s] - back["baseline"][key][s] for s in seeds]
            from dataclasses import asdict

            assert c["interval"] == asdict(U.paired_delta_interval(diffs, 0.9, 300, 7))
            assert c["interval"]["t_low"] < c["delta"] < c["interval"]["t_high"] and c["interval"]["confidence"] == 0.9
            assert c["improvement"] == asdict(U.probability_of_improvement(diffs))
            margin = compare.Settings().margin(metric)  # the default rope (points) as a fraction
            need = U.seeds_needed(diffs, margin=margin)
            assert c["seeds_needed"] == asdict(need)
            if margin is not None:  # TOST, the Bayesian probabilities and the verdict from the same diffs
                assert c["tost"] == asdict(U.tost_paired(diffs, margin))
                assert c["bayes"] == asdict(U.bayes_correlated_t(diffs, margin))
                assert c["verdict"]["verdict"] in ("better", "worse", "equivalent", "inconclusive")
            label = compare.labels.METRIC_LABELS[metric]
            assert c["seeds_needed_text"] == U.describe_seeds_needed(
                need, "the mean over domains" if scope == "mean" else scope, unit=f"pt {label}"
            )
            assert c["seeds_needed_text"].startswith(f"to confirm a {100 * c['delta']:+.2f} pt {label} ")
    # DeLong per seed and pooled, and the hierarchical bootstrap: direct calls on the same per-map scores
    arrays = {d: per_map_arrays(frames, "gem", "baseline", seeds, d) for d in DOMAINS}
    boot = U.hierarchical_bootstrap_auroc(
        {d: U.AurocScores(*arrays[d]) for d in DOMAINS}, n_resamples=300, confidence=0.9, seed=7, margin=0.001
    )
    for d in DOMAINS:
        c = comparison(saved, "gem", d, "auroc")
        pooled = U.delong_pooled(*arrays[d], seeds=seeds, confidence=0.9)
        assert c["delong"] == asdict(pooled)
        assert c["delong"]["per_seed"][1]["auc_a"] == pytest.approx(back["gem"][f"test_auroc/{d}"][43], rel=1e-12)
        assert c["bootstrap"] == asdict(boot.domains[d])
        assert c["bootstrap"]["low"] < c["bootstrap"]["high"] and c["per_map_notes"] == []
    mean = comparison(saved, "gem", "mean", "auroc")
    assert mean["bootstrap"] == asdict(boot.mean)
    pooled = [comparison(saved, "gem", d, "auroc")["delong"] for d in DOMAINS]
    se = np.sqrt(sum(p["se"] ** 2 for p in pooled)) / 4
    assert mean["delong"]["delta"] == pytest.approx(np.mean([p["delta"] for p in pooled]))
    assert mean["delong"]["se"] == pytest.approx(se) and mean["delong"]["seeds"] == seeds
    assert comparison(saved, "gem", "mean", "ap")["delong"] is None  # AUROC only
    assert saved["uncertainty"]["bootstrap_resamples"] == 300 and saved["uncertainty"]["per_map"]["gem"]["seeds"] == {
        d: seeds for d in DOMAINS
    }

    # the report: every piece for every method x domain x metric
    assert "90 % intervals" in md and "paired t interval" in md and "300 resamples, seed 7" in md
    for metric, label in (("auroc", "AUROC"), ("tpr_at_fpr_1", "TPR@FPR=1%"), ("tpr_at_fpr_5", "TPR@FPR=5%")):
        table = md.split(f"#### {label}: Δ with 90 % intervals", 1)[1].split("####", 1)[0]
        for scope in DOMAINS + ["mean"]:
            c = comparison(saved, "gem", scope, metric)
            iv = c["interval"]
            row = (
                rf"\| {re.escape(compare.labels.scope_label(scope))} \| 3 \| {pts(c['delta'])} \| "
                rf"\[{pts(iv['t_low'])}, {pts(iv['t_high'])}\] \| \[{pts(iv['boot_low'])}, {pts(iv['boot_high'])}\] \| "
                rf"[\d.e-]+ \| [\d.e-]+ \| [\d.e-]+ \| [-\d.]+ \| \S+ \| {c['improvement']['n_better']}/3"
            )
            assert re.search(row, table), (row, table)
            assert f"- {c['seeds_needed_text']}" in md
    dl = md.split("#### AUROC per map: DeLong and hierarchical bootstrap", 1)[1].split("##", 1)[0]
    for d in DOMAINS + ["mean"]:
        c = comparison(saved, "gem", d, "auroc")
        b = c["bootstrap"]
        assert re.search(
            rf"\| {re.escape(compare.labels.scope_label(d))} \| .*\| {pts(c['delong']['delta'])} ± "
            rf"{100 * c['delong']['se']:.2f} \(p=[\d.e-]+\) \| .* \| \[{pts(b['low'])}, "
            rf"{pts(b['high'])}\] \| {100 * b['p_improvement']:.0f} % \|",
            dl,
        ), d
    first = comparison(saved, "gem", "domain_A", "auroc")["delong"]["per_seed"][0]
    assert f"{100 * first['delta']:+.2f} ± {100 * first['se']:.2f} (p=" in dl and "seed 44: Δ ± SE (p)" in dl
    assert "## How many seeds" in md and "paired seeds" in md and "not computable" not in md

    # metrics/compare.json: the headline mean AUROC Δ gains its intervals, nothing else does
    metrics = no_nan((tmp_path / "metrics/compare.json").read_text())
    head = metrics["gem"]["mean"]["auroc"]
    c = comparison(saved, "gem", "mean", "auroc")
    assert head["delta_pts_t_low"] == pytest.approx(round(100 * c["interval"]["t_low"], 4))
    assert head["delta_pts_hboot_high"] == pytest.approx(round(100 * c["bootstrap"]["high"], 4))
    assert not [k for k in metrics["gem"]["domain_A"]["auroc"] if "low" in k or "high" in k]
    # the compare run logs them as metrics, the settings as params
    client = mlflow.MlflowClient()
    (crun,) = client.search_runs([client.get_experiment_by_name(f"{EXPERIMENT}-compare").experiment_id])
    m = crun.data.metrics
    assert m["delong_p_auroc/gem/domain_B"] == pytest.approx(
        comparison(saved, "gem", "domain_B", "auroc")["delong"]["p"]
    )
    assert m["hboot_low_auroc/gem/mean"] == pytest.approx(c["bootstrap"]["low"])
    assert m["delta_t_high_tpr_at_fpr_5/gem/domain_C"] == pytest.approx(
        comparison(saved, "gem", "domain_C", "tpr_at_fpr_5")["interval"]["t_high"]
    )
    assert crun.data.params["bootstrap_resamples"] == "300" and crun.data.params["confidence"] == "0.9"


def test_runs_without_scores_or_with_other_maps_are_said_and_the_rest_works(store, tmp_path):
    seeds = [42, 43, 44]
    for seed in seeds:
        log_run(store, "baseline", seed, scores=fake_scores("baseline", seed))
    log_run(store, "gem", 42, scores=fake_scores("gem", 42))
    log_run(store, "gem", 43)  # evaluated by an older version: no scores artifact
    other = fake_scores("gem", 44)
    log_run(store, "gem", 44, scores=other.drop(index=other.index[other["domain"] == "domain_B"][0]))  # a map less
    saved, md = run(tmp_path, settings_=settings(bootstrap_resamples=100))

    assert comparison(saved, "gem", "domain_A", "auroc")["seeds"] == seeds  # the seed-level tests keep every seed
    a = comparison(saved, "gem", "domain_A", "auroc")
    assert a["delong"]["seeds"] == [42, 44] and a["bootstrap"]["low"] is not None
    assert any("seed 43 left out of DeLong/bootstrap: gem has no per-map scores" in n for n in a["per_map_notes"])
    b = comparison(saved, "gem", "domain_B", "auroc")
    assert b["delong"] is None and b["bootstrap"] is None
    assert any(n.startswith("not computable: different test maps on domain_B: gem seed 44") for n in b["per_map_notes"])
    mean = comparison(saved, "gem", "mean", "auroc")
    assert mean["delong"]["delta"] is None and "not computable" in mean["delong"]["note"] and mean["bootstrap"] is None
    notes = " ".join(saved["notes"])
    assert "no per-map scores (`eval/scores.csv` artifact) for gem seed 43" in notes
    assert "**gem vs baseline, domain_B: DeLong/bootstrap not computable: different test maps" in notes
    assert "not computable: different test maps on domain_B" in md and "gem seed 43" in md
    assert re.search(r"\| Domain B \| (no per-map scores \| ){5}", md)  # its row says so, the others are filled
    assert "## How many seeds" in md  # the rest of the report is there


def test_one_seed_says_not_computable_and_writes_no_nan(store, tmp_path):
    for method in ("baseline", "gem"):
        log_run(store, method, 42, scores=fake_scores(method, 42))
    saved, md = run(tmp_path, settings_=settings(bootstrap_resamples=50))
    for path in ("reports/comparison.json", "metrics/compare.json"):
        no_nan((tmp_path / path).read_text())
    c = comparison(saved, "gem", "domain_C", "auroc")
    assert c["interval"]["t_low"] is None and c["interval"]["note"].startswith("not computable: 1 paired seed")
    assert c["seeds_needed"]["n_needed"] is None and "not computable" in c["seeds_needed_text"]
    assert c["bootstrap"]["low"] is None and "not computable" in c["bootstrap"]["note"]
    assert c["delong"]["se"] is not None  # one seed's DeLong test needs no second seed
    assert "| Domain C | 1 |" in md and "| not computable | not computable |" in md
    assert "seeds needed on domain_C (AUROC): not computable" in md


def test_maps_are_matched_by_path_or_by_position_on_the_same_data():
    from hdmap_ad.apps.compare.scores import DomainScores, align

    ref = DomainScores(np.array(["a/1", "a/2", "a/3"]), np.array([0, 1, 1]), np.array([0.1, 0.9, 0.8]))
    shuffled = DomainScores(np.array(["a/3", "a/1", "a/2"]), np.array([1, 0, 1]), np.array([0.7, 0.2, 0.6]))
    idx, how = align(ref, shuffled, same_data=False)
    assert list(shuffled.scores[idx]) == [0.2, 0.6, 0.7] and how == ""
    moved = DomainScores(np.array(["/mnt/b/1", "/mnt/b/2", "/mnt/b/3"]), ref.labels, ref.scores)
    idx, how = align(ref, moved, same_data=True)  # the same prepared data read from another folder
    assert list(idx) == [0, 1, 2] and "paired by position" in how
    assert align(ref, moved, same_data=False) == (None, "3 vs 3 maps, 3 map id(s) differ")
    relabelled = DomainScores(ref.paths, np.array([0, 0, 1]), ref.scores)
    assert align(ref, relabelled, same_data=True) == (None, "1 map(s) with another label")


def test_an_invalid_domain_leaves_its_seed_out_of_the_per_map_statistics_loudly(store, tmp_path):
    from dataclasses import asdict

    from hdmap_ad.pipeline import stats as U

    seeds, frames = [42, 43, 44], {}
    for method in ("baseline", "topk"):
        for seed in seeds:
            frame = fake_scores(method, seed)
            invalid = ("domain_C",) if (method, seed) == ("topk", 43) else ()
            if invalid:
                frame.loc[frame["domain"] == "domain_C", "score"] = np.nan
            frames[method, seed] = frame
            log_run(store, method, seed, scores=frame, invalid=invalid)
    saved, md = run(tmp_path, settings_=settings(bootstrap_resamples=100))

    c = comparison(saved, "topk", "domain_C", "auroc")
    assert c["delong"]["seeds"] == [42, 44] and c["seeds"] == [42, 44]
    assert any("seed 43 left out of DeLong/bootstrap: topk invalid (NaN/Inf scores)" in n for n in c["per_map_notes"])
    assert comparison(saved, "topk", "domain_A", "auroc")["delong"]["seeds"] == seeds
    # the mean over domains: on the seeds every domain has, like the seed-level mean
    mean = comparison(saved, "topk", "mean", "auroc")
    sub = {d: U.AurocScores(*per_map_arrays(frames, "topk", "baseline", [42, 44], d)) for d in DOMAINS}
    assert mean["bootstrap"] == asdict(
        U.hierarchical_bootstrap_auroc(sub, n_resamples=100, confidence=0.95, seed=0, margin=0.001).mean
    )
    assert any("seeds all domains share: 42, 44" in n for n in mean["per_map_notes"])
    assert mean["delong"]["delta"] is None and "different seeds" in mean["delong"]["note"]
    assert "**topk seed 43**" in md and "NaN/Inf scores in domain_C" in md
    no_nan((tmp_path / "reports/comparison.json").read_text())


def test_a_run_differing_in_one_setting_names_only_that_setting(store, tmp_path):
    """Both runs logged train.amp_resolved=off (training's record beside the config, which the workspace's
    params do not hold): only train.steps differs, and only it is named; the baseline seed whose only run
    is in the other group is 'in another comparison group', not 'no valid run'."""
    from hdmap_ad.core.config import load_params

    manifest = fake_prepared(tmp_path / "prepared")
    params_path = workspace_params(tmp_path)
    key = load_params(params_path).comparison_key(manifest)
    record = {"train.amp_resolved": "off"}
    for seed in (43, 44):
        log_run(store, "baseline", seed, key=key, manifest=manifest, params=record)
    for seed in (42, 43, 44):
        log_run(store, "gem", seed, key=key, manifest=manifest, params=record)
    other = log_run(
        store, "baseline", 42, key="ffff0000ffff0000", manifest=manifest, params={**record, "train.steps": "150"}
    )
    saved, md = run(tmp_path, settings_=compare.load_settings(params_path))
    (left,) = saved["left_out"]
    assert left["run_id"] == other and left["differs"] == [f"train.steps 150 ≠ {CONFIG['train.steps']}"]
    notes = comparison(saved, "gem", "domain_A", "auroc")["notes"]
    assert (
        f"baseline seed 42: its run is in another comparison group (train.steps 150 ≠ {CONFIG['train.steps']})" in notes
    )
    assert not any("no valid run" in n for n in notes)


def test_bad_decision_settings_stop_with_one_line_and_keep_the_reports(store, tmp_path, capsys):
    from hdmap_ad.apps import cli

    for seed in (42, 43):
        log_run(store, "baseline", seed)
        log_run(store, "gem", seed)
    params = workspace_params(tmp_path)
    assert cli.main(["compare", "--params", str(params), "--no-plots", "--no-log", "--profile", "all"]) == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    for bad, word in (
        ("compare.rope.auroc=0", "positive"),
        ("compare.rope.auroc=-0.5", "positive"),
        ("compare.rope.threshold=1", "runs do not log"),
        ("compare.rope={auroc: 0.1}", "no margin in compare.rope for tpr_at_fpr_1"),
        ("compare.confidence=1.5", "compare.confidence"),
        ("compare.confidence=0", "compare.confidence"),
    ):
        code = cli.main(["compare", "--params", str(params), "--no-plots", "--no-log", "--set", bad])
        err = capsys.readouterr().err.strip()
        assert code != 0 and len(err.splitlines()) == 1 and word in err, (bad, err)
        assert "Traceback" not in err
        assert snapshot(tmp_path) == before


def test_terminal_output_reads_at_80_columns_and_leads_with_the_verdicts(store, tmp_path):
    """Through the command a user runs, in an 80-column terminal: no line wider, the verdicts before the
    tables, and the comparisons at one seed collapsed into one line with the reason."""
    for seed in (42, 43, 44, 123, 456):
        log_run(store, "baseline", seed)
        log_run(store, "gem", seed)
    log_run(store, "focal", 42)
    params = workspace_params(tmp_path, "compare: {bootstrap_resamples: 200}")
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(REPO / "src"), "TERM": "dumb"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "hdmap_ad.apps.cli",
            "compare",
            "--params",
            str(params),
            "--no-plots",
            "--profile",
            "all",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    text = out.stdout
    assert text.index("Verdicts") < text.index("AUROC (%): mean ± std")
    assert f"gem (Method 1 (GEM): {METHODS['gem'].summary}" in text
    assert f"focal (Method 3 (Focal): {METHODS['focal'].summary}" in text
    # focal has one seed: its 15 comparisons say the same thing, once
    focal = text[text.index("focal (Method 3") :]
    assert focal.count("only 1 paired seed") == 1 and "all 15: 3 metric(s) × 5 scope(s)" in focal
    saved = json.loads((tmp_path / "reports/comparison.json").read_text())
    assert saved["verdicts"]["focal"]["verdict"] == "inconclusive"
    md = (tmp_path / "reports/comparison.md").read_text()
    assert md.index("## Verdicts") < md.index("## Notes") and "Method 3 (Focal) = `focal`: focal" in md


@pytest.mark.slow
def test_compare_on_the_design_docs_store_takes_under_30_s(store, tmp_path):
    """2 methods × 5 seeds × 4 domains × 2000 maps, 10 000 resamples (docs/design.md#stats-report), end to
    end through the CLI, verdicts included."""
    for method in ("baseline", "gem"):
        for seed in SEEDS:
            frame = fake_scores(method, seed, n_good=1000, n_fault=1000)
            log_run(store, method, seed, scores=frame, metrics=metrics_from_scores(method, seed, frame))
    params = workspace_params(tmp_path)
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "hdmap_ad.apps.cli", "compare", "--params", str(params), "--profile", "all"]
    import resource

    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    seconds, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "reports/comparison.json").read_text())["verdicts"]["gem"]["verdict"]
    print(f"\ncompare, 2 methods x 5 seeds x 2000 maps: {seconds:.1f} s wall, {cpu:.1f} s CPU")
    # CPU time: on a shared machine the wall time measures the other jobs too
    assert cpu < 30
