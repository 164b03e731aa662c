"""The compare stage against runs built directly in a temporary sqlite MLflow store (no training).

Every store is a copy of one migrated template database, so a test pays no schema migration.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ttest_rel

from hdmap_ad import compare
from hdmap_ad.stats import holm_adjust

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ["domain_A", "domain_B", "domain_C", "domain_D"]
METRICS = ["auroc", "ap", "f1_max", "tpr_at_fpr_1", "tpr_at_fpr_5", "precision", "recall", "f1", "accuracy", "threshold"]
SEEDS = [42, 43, 44, 123, 456]
EXPERIMENT = "hdmap-compare-test"
LEVEL = {"baseline": 0.90, "gem": 0.92, "focal": 0.89, "topk": 0.93}


def fake_metrics(method: str, seed: int, invalid: tuple[str, ...] = ()) -> dict[str, float]:
    """test/<scope>/<metric> as evaluation.py logs them: fractions, per domain + mean + pooled."""
    rng = np.random.default_rng([seed, sum(map(ord, method))])
    out, per = {}, {}
    for d in DOMAINS:
        if d in invalid:  # evaluation logs no metrics for a domain with NaN/Inf scores
            continue
        for k, m in enumerate(METRICS):
            v = LEVEL.get(method, 0.9) - 0.02 * k / len(METRICS) + rng.normal(0, 0.01)
            v = float(np.clip(v, 0, 1)) if m != "threshold" else float(rng.uniform(0.2, 0.5))
            out[f"test/{d}/{m}"] = v
            per.setdefault(m, []).append(v)
    for m, vs in per.items():
        if m != "threshold":
            out[f"test/mean/{m}"] = float(np.mean(vs))  # logged even when a domain is invalid (mean of the valid ones)
            out[f"test/pooled/{m}"] = float(np.clip(np.mean(vs) + rng.normal(0, 0.003), 0, 1))
    return out


def log_run(experiment_id: str, method: str, seed: int, *, status: str = "FINISHED", evaluated: bool = True,
            invalid: tuple[str, ...] = (), profile: str = "quick", metrics: dict | None = None) -> str:
    """One training+evaluation run, logged as training.py/evaluation.py do (fluent API)."""
    import mlflow

    tags = {"method": method, "seed": str(seed), "profile": profile, "git_commit": "abc1234def", "stage": "trained"}
    if status == "RUNNING":  # a process killed mid-run leaves its run RUNNING: never ended
        run = mlflow.MlflowClient().create_run(experiment_id, run_name=f"{method}-seed{seed}", tags=tags)
        mlflow.MlflowClient().log_batch(run.info.run_id, metrics=[
            mlflow.entities.Metric(k, v, int(time.time() * 1000), 0) for k, v in (metrics or fake_metrics(method, seed)).items()])
        return run.info.run_id
    run = mlflow.start_run(experiment_id=experiment_id, run_name=f"{method}-seed{seed}")
    mlflow.set_tags(tags)
    mlflow.log_metric("train/loss", 0.1, step=10)
    if evaluated:
        mlflow.log_metrics(metrics or fake_metrics(method, seed, invalid))
        mlflow.set_tags({"evaluated": "true", "invalid_domains": ",".join(invalid)})
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

    from hdmap_ad import tracking

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
    return compare.Settings(experiment=EXPERIMENT, **kw)


def run(tmp_path: Path, plots: bool = False, **kw) -> tuple[dict, str]:
    from rich.console import Console

    with open(tmp_path / "console.txt", "w") as f:
        compare.run_compare(settings(), console=Console(width=200, file=f),
                            plots_dir=(tmp_path / "reports/plots") if plots else None, **kw)
    saved = json.loads((tmp_path / "metrics/compare.json").read_text())
    return saved, (tmp_path / "reports/comparison.md").read_text()


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
                key = f"test/{scope}/{metric}"
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
    for title in ("## Baseline (`baseline`)", "## Method 1 (GEM) (`gem`)", "### AUROC", "### TPR@FPR=1%", "### TPR@FPR=5%",
                  "## Summary Table (All Methods)", "### AUROC (Mean±Std)", "### TPR@FPR=5% (Mean±Std)",
                  "## Statistical significance (vs Baseline)", "### AUROC: p-value", "### TPR@FPR=1%: details"):
        assert title in md
    assert "ddof=1" in md and "| **Mean±Std** |" in md
    cells = table_cells(md)
    assert not [c for c in cells if c in ("-", "–", "—", "", "n/a", "no data", "missing (no run)")]
    b42 = back["baseline"]["test/domain_C/auroc"][42]
    assert f"| 42 | " in md and f"{100 * b42:.2f}" in md
    assert re.search(r"\| Method 3 \(Focal\) \| [\d.]+ → [\d.]+ ", md)  # p-value table: t-test p → Holm p, mark

    # the compare run holds the outputs; a second compare does not count compare runs as training runs
    client = mlflow.MlflowClient()
    (crun,) = client.search_runs([store], "tags.kind = 'compare'")
    assert crun.info.run_name == "compare" and crun.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(crun.info.run_id)}
    assert {"compare.json", "comparison.md"} <= arts
    assert crun.data.metrics[f"p_holm/gem/mean/auroc"] == pytest.approx(comparison(saved, "gem", "mean", "auroc")["p_holm"])
    again, _ = run(tmp_path, log_run=False)
    assert again["n_runs_found"] == 15 and again["left_out"] == []
    # the terminal summary: one table per listed metric with Δ and p
    console = (tmp_path / "console.txt").read_text()
    assert "baseline   5 run(s), seeds 42, 43, 44, 123, 456" in console
    assert "Δ" in console and "p=" in console


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
    b, m = read_back()["baseline"]["test/domain_B/auroc"], {s: fake_metrics("gem", s)["test/domain_B/auroc"] for s in (42, 43, 456)}
    assert c["p_ttest"] == pytest.approx(ttest_rel([m[s] for s in c["seeds"]], [b[s] for s in c["seeds"]]).pvalue, rel=1e-9)
    assert any("gem seed(s) 44, 123 have no valid run" in n for n in c["notes"])
    # the report says which runs are missing and why, in the per-seed rows and the notes
    assert re.search(r"\| 44 \| missing \(unfinished, profile paper\)", md)
    assert re.search(r"\| 123 \| missing \(failed\)", md)
    assert "gem: paired on seeds 42, 43, 456" in md
    assert "(n=3)" in md  # gem's Mean±Std over fewer seeds than the baseline's
    assert f"`{killed}`" in md and "Left out" in md and "the latest" in md


def test_fewer_than_two_pairs_and_a_single_method(store, tmp_path):
    from hdmap_ad import cli

    for seed in (42, 43):
        log_run(store, "baseline", seed)
    log_run(store, "focal", 42)
    log_run(store, "focal", 44)
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("experiment: hdmap-dinomaly", f"experiment: {EXPERIMENT}"))
    assert cli.main(["compare", "--params", str(params), "--no-plots"]) == 0
    saved = json.loads((tmp_path / "metrics/compare.json").read_text())
    md = (tmp_path / "reports/comparison.md").read_text()
    c = comparison(saved, "focal", "domain_A", "auroc")
    assert c["n"] == 1 and c["seeds"] == [42] and c["p_ttest"] is None and c["p_holm"] is None
    assert "fewer than 2 paired seeds: no p-value" in c["notes"]
    assert "n/a (n=1)" in md and "fewer than 2 paired seeds → no p-value" in md
    assert c["delta"] is not None  # the difference itself is still reported

    # one method only: all outputs still written, and they say there is nothing to compare
    saved, md = run(tmp_path, methods=["baseline"], log_run=False)
    assert saved["methods"] == ["baseline"] and saved["comparisons"] == []
    assert "nothing to compare" in md and "### AUROC (Mean±Std)" in md
    assert any("not compared" in n for n in saved["notes"])  # focal's runs: not selected, said so


def test_invalid_domain_is_left_out_of_that_domain_and_the_mean(store, tmp_path):
    for seed in SEEDS:
        log_run(store, "baseline", seed)
        log_run(store, "topk", seed, invalid=("domain_C",) if seed == 43 else ())
    saved, md = run(tmp_path)

    assert saved["invalid"] == [{"method": "topk", "seed": 43, "run_id": saved["runs"]["topk"]["43"]["run_id"],
                                 "domains": ["domain_C"]}]
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
    from hdmap_ad.errors import HdmapError

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text() + "\n")
    s = compare.load_settings(params, ["compare.methods=[gem,baseline]", "compare.baseline=gem", "profile=paper"])
    assert s.methods == ("gem", "baseline") and s.baseline == "gem" and s.profile == "paper"
    assert s.metrics == ("auroc", "tpr_at_fpr_1", "tpr_at_fpr_5") and s.domains[0] == "domain_A"
    with pytest.raises(HdmapError, match="unknown metric"):
        compare.load_settings(params, ["compare.metrics=[auroc,speed]"])
    shutil.copy(template_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(HdmapError, match="not found"):
        compare.collect(compare.Settings(experiment="never-created"))
