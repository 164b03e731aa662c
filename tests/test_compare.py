"""The compare stage against runs built directly in a temporary sqlite MLflow store (no training).

Every store is a copy of one migrated template database, so a test pays no schema migration. The fake
runs carry what training.py and evaluation.py log: tags (method, seed, profile, comparison_key,
data_digest), a few flattened config params and metrics named test_<metric>/<scope>.
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

from hdmap_ad.apps import compare
from hdmap_ad.core.config import Params, flatten
from hdmap_ad.pipeline.stats import holm_adjust
import shipped

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ["domain_A", "domain_B", "domain_C", "domain_D"]
METRICS = ["auroc", "ap", "f1_max", "tpr_at_fpr_1", "tpr_at_fpr_5"]  # what runs log to MLflow (headline metrics)
SEEDS = [42, 43, 44, 123, 456]
EXPERIMENT = "hdmap-compare-test"
LEVEL = {"baseline": 0.90, "gem": 0.92, "focal": 0.89, "topk": 0.93}
KEY = "a1b2c3d4e5f60718"           # the comparison group of most fake runs
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


def log_run(experiment_id: str, method: str, seed: int, *, status: str = "FINISHED", evaluated: bool = True,
            invalid: tuple[str, ...] = (), profile: str = "quick", metrics: dict | None = None,
            key: str | None = KEY, manifest: str = MANIFEST, params: dict | None = None) -> str:
    """One training+evaluation run, logged as training.py/evaluation.py do (fluent API). `key` None: a
    run of an older version (no comparison_key tag)."""
    import mlflow

    tags = {"method": method, "seed": str(seed), "profile": profile, "git_commit": "abc1234def", "stage": "trained",
            "data_digest": manifest}
    if key is not None:
        tags["comparison_key"] = key
    name = f"{method}-seed{seed}-{(key or 'old')[:6]}"
    if status == "RUNNING":  # a process killed mid-run leaves its run RUNNING: never ended
        run = mlflow.MlflowClient().create_run(experiment_id, run_name=name, tags=tags)
        mlflow.MlflowClient().log_batch(run.info.run_id, metrics=[
            mlflow.entities.Metric(k, v, int(time.time() * 1000), 0) for k, v in (metrics or fake_metrics(method, seed)).items()])
        return run.info.run_id
    run = mlflow.start_run(experiment_id=experiment_id, run_name=name)
    mlflow.set_tags(tags)
    mlflow.log_params({**CONFIG, "method": method, "seed": str(seed), **(params or {})})
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
    return compare.Settings(experiment=EXPERIMENT, **kw)


def run(tmp_path: Path, plots: bool = False, settings_: compare.Settings | None = None, **kw) -> tuple[dict, str]:
    """compare.run_compare; returns the details (reports/comparison.json) and the Markdown report."""
    from rich.console import Console

    with open(tmp_path / "console.txt", "w") as f:
        compare.run_compare(settings_ or settings(), console=Console(width=200, file=f),
                            plots_dir=(tmp_path / "reports/plots") if plots else None, **kw)
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
    path.write_text("\n".join([f"mlflow: {{experiment: {EXPERIMENT}}}", "data: {prepared: prepared}", "profile: quick",
                               "profiles: {quick: {}}", *extra]) + "\n")
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
    for title in ("## Baseline (`baseline`)", "## Method 1 (GEM) (`gem`)", "### AUROC", "### TPR@FPR=1%", "### TPR@FPR=5%",
                  "## Summary Table (All Methods)", "### AUROC (Mean±Std)", "### TPR@FPR=5% (Mean±Std)",
                  "## Statistical significance (vs Baseline)", "### AUROC: p-value", "### TPR@FPR=1%: details"):
        assert title in md
    assert "ddof=1" in md and "| **Mean±Std** |" in md
    cells = table_cells(md)
    assert not [c for c in cells if c in ("-", "–", "—", "", "n/a", "no data", "missing (no run)")]
    b42 = back["baseline"]["test_auroc/domain_C"][42]
    assert f"| 42 | " in md and f"{100 * b42:.2f}" in md
    assert re.search(r"\| Method 3 \(Focal\) \| [\d.]+ → [\d.]+ ", md)  # p-value table: t-test p → Holm p, mark

    # the compare run holds the outputs; a second compare does not count compare runs as training runs
    client = mlflow.MlflowClient()
    assert client.search_runs([store], "tags.kind = 'compare'") == []  # the training experiment: training runs only
    compare_exp = client.get_experiment_by_name(f"{EXPERIMENT}-compare")
    (crun,) = client.search_runs([compare_exp.experiment_id], "tags.kind = 'compare'")
    assert crun.info.run_name == "compare" and crun.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(crun.info.run_id)}
    assert {"compare.json", "comparison.md", "comparison.json"} <= arts
    assert crun.data.tags["comparison_key"] == KEY
    assert crun.data.metrics["p_holm_auroc/gem/mean"] == pytest.approx(comparison(saved, "gem", "mean", "auroc")["p_holm"])
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
    b, m = read_back()["baseline"]["test_auroc/domain_B"], {s: fake_metrics("gem", s)["test_auroc/domain_B"] for s in (42, 43, 456)}
    assert c["p_ttest"] == pytest.approx(ttest_rel([m[s] for s in c["seeds"]], [b[s] for s in c["seeds"]]).pvalue, rel=1e-9)
    assert any("gem seed(s) 44, 123 have no valid run" in n for n in c["notes"])
    # the report says which runs are missing and why, in the per-seed rows and the notes
    assert re.search(r"\| 44 \| missing \(unfinished, profile paper\)", md)
    assert re.search(r"\| 123 \| missing \(failed\)", md)
    assert "gem: paired on seeds 42, 43, 456" in md
    assert "(n=3)" in md  # gem's Mean±Std over fewer seeds than the baseline's
    assert f"`{killed}`" in md and "Left out" in md and "the latest" in md


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
    from hdmap_ad.core.errors import HdmapError

    params = tmp_path / "params.yaml"
    params.write_text(shipped.text("params.yaml") + "\n")
    s = compare.load_settings(params, ["compare.methods=[gem,baseline]", "compare.baseline=gem", "profile=paper"])
    assert s.methods == ("gem", "baseline") and s.baseline == "gem" and s.profile == "paper"
    assert s.metrics == ("auroc", "tpr_at_fpr_1", "tpr_at_fpr_5") and s.domains[0] == "domain_A"
    with pytest.raises(HdmapError, match="unknown metric"):
        compare.load_settings(params, ["compare.metrics=[auroc,speed]"])
    # runs log only the headline metrics to MLflow: comparing another one could only give "no data"
    with pytest.raises(HdmapError, match=r"unknown metric\(s\) \['precision'\] \(known: auroc, ap, f1_max"):
        compare.load_settings(params, ["compare.metrics=[precision]"])
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
    line = ("not paired: no common seed — run `dvc exp run -S method=baseline -S seed=44` "
            "(or `hdmap-ad grid --methods baseline,focal --seeds 42,44`)")
    assert line in console and line in md and any(line in n for n in saved["notes"])
    b, f = fake_metrics("baseline", 42)["test_auroc/domain_A"], fake_metrics("focal", 44)["test_auroc/domain_A"]
    assert f"unpaired Δ {100 * (f - b):+.2f} (no p)" in console
    assert "(n=0)" not in console
    c = comparison(saved, "focal", "domain_A", "auroc")
    assert c["pairing"] == "unpaired" and c["n"] == 0 and c["p_ttest"] is None and c["p_holm"] is None
    assert c["unpaired_delta"] == pytest.approx(f - b)
    (hint,) = saved["unpaired"]
    assert hint["method"] == "focal" and hint["method_seeds"] == [44] and hint["baseline_seeds"] == [42]
    assert f"unpaired {100 * (f - b):+.2f}" in md and "n/a (not paired: no common seed)" in md
    metrics = json.loads((tmp_path / "metrics/compare.json").read_text())
    assert metrics["focal"]["domain_A"]["auroc"]["delta_pts_unpaired"] == pytest.approx(round(100 * (f - b), 4))
    assert "delta_pts" not in metrics["focal"]["domain_A"]["auroc"] and "p_holm" not in metrics["focal"]["domain_A"]["auroc"]


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
    short = log_run(store, "gem", 42, key="ffff0000ffff0000", manifest="1a2b" + "0" * 28, params={"train.steps": "20"},
                    metrics=fake_metrics("gem", 999))
    newest_base = log_run(store, "baseline", 45, key="eeee0000eeee0000", manifest=manifest, params={"model.encoder": "large"})
    old = log_run(store, "gem", 46, key=None)
    saved, md = run(tmp_path, settings_=compare.load_settings(params_path))

    assert saved["reference"]["comparison_key"] == key and saved["reference"]["fallback"] is None
    assert {m: sorted(r) for m, r in saved["runs"].items()} == {"baseline": ["42", "43", "44"], "gem": ["42", "43", "44"]}
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
    from hdmap_ad.pipeline import tracking
    from hdmap_ad.core.errors import HdmapError

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
    assert set(metrics) == {"baseline", "gem"} and set(metrics["gem"]) == set(DOMAINS) | {"mean"}
    gem = metrics["gem"]["mean"]["tpr_at_fpr_1"]
    assert set(gem) == {"n", "n_paired", "mean_pct", "delta_pts", "p_holm"} and gem["n"] == 3
    back = read_back()
    expect = np.mean(list(back["gem"]["test_tpr_at_fpr_1/mean"].values())) - np.mean(list(back["baseline"]["test_tpr_at_fpr_1/mean"].values()))
    assert gem["delta_pts"] == pytest.approx(100 * expect, abs=1e-4)
    # the rest is in reports/comparison.json
    details = json.loads((tmp_path / "reports/comparison.json").read_text())
    assert details["tracking_uri"].startswith("sqlite:///") and details["generated"]
    assert {r["run_id"] for by in details["runs"].values() for r in by.values()} == set(ids)
    assert {p.name for p in (tmp_path / "reports/plots").iterdir()} == {"data"} | {
        f"{m}_{s}.png" for m in ("auroc", "tpr_at_fpr_1", "tpr_at_fpr_5") for s in DOMAINS + ["mean"]}
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
    from dataclasses import dataclass, replace

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
    class WithInterval(compare.Comparison):
        interval: tuple[float, float] | None = None

    extended = WithInterval(**{f: getattr(c, f) for f in ("method", "scope", "metric", "holm_family", "paired",
                                                          "unpaired", "notes")}, interval=(0.1, 0.2))
    assert extended.to_json() == {**c.to_json(), "interval": (0.1, 0.2)}
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
