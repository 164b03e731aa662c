"""Metrics (docs/design.md#6-metrics) against scikit-learn and hand-computed cases."""

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from hdmap_ad.pipeline.metrics import (
    METRIC_NAMES,
    f1_max,
    image_metrics,
    pixel_auroc,
    roc_points_table,
    summarise,
    tpr_at_fpr,
    youden_threshold,
)


def random_case(seed: int, n_good: int = 120, n_fault: int = 40, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_good, int), np.ones(n_fault, int)]
    scores = rng.normal(size=labels.size) + 1.2 * labels
    if decimals is not None:  # force ties
        scores = np.round(scores, decimals)
    perm = rng.permutation(labels.size)
    return labels[perm], scores[perm]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_ap_equal_sklearn(seed):
    labels, scores = random_case(seed, decimals=1 if seed == 2 else None)
    m = image_metrics(labels, scores)
    assert m["valid"] is True
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-15)
    assert m["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-15)
    assert (m["n_good"], m["n_fault"], m["n_bad_scores"]) == (120, 40, 0)
    assert m["threshold_note"] == "chosen on the evaluated test set (Youden's J)"


def test_tpr_at_fpr_exact_no_interpolation_ten_normals():
    # 10 good maps: FPR 1% and 5% allow no false alarm at all. The top-scored map is good, so the only
    # operating point with FPR 0 has TPR 0. Linear interpolation towards (0.1, 0.4) would give 0.04 / 0.2.
    good = [0.95, 0.5] + [0.1] * 8
    fault = [0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.15, 0.12, 0.11]
    labels = np.r_[np.zeros(10, int), np.ones(10, int)]
    scores = np.r_[good, fault]
    assert tpr_at_fpr(labels, scores, 0.01) == 0.0
    assert tpr_at_fpr(labels, scores, 0.05) == 0.0
    assert tpr_at_fpr(labels, scores, 0.1) == pytest.approx(0.4)
    assert tpr_at_fpr(labels, scores, 0.15) == pytest.approx(0.4)
    assert tpr_at_fpr(labels, scores, 0.2) == pytest.approx(1.0)
    m = image_metrics(labels, scores)
    assert (m["tpr_at_fpr_1"], m["tpr_at_fpr_5"]) == (0.0, 0.0)


def test_tpr_at_fpr_boundary_counts_exactly_ten_false_alarms_in_1000():
    # 1000 good, 100 fault: 50 faults, then 10 good, then 30 faults, then 1 good, then 20 faults, rest good.
    good = np.r_[np.full(10, 9.5), 8.5, np.linspace(0, 1, 989)]
    fault = np.r_[np.full(50, 10.0), np.full(30, 9.0), np.full(20, 8.0)]
    labels = np.r_[np.zeros(good.size, int), np.ones(fault.size, int)]
    scores = np.r_[good, fault]
    assert tpr_at_fpr(labels, scores, 0.01) == pytest.approx(0.8)  # 10 false alarms = FPR 1% is allowed
    assert tpr_at_fpr(labels, scores, 0.0099) == pytest.approx(0.5)
    assert tpr_at_fpr(labels, scores, 0.05) == pytest.approx(1.0)


def test_tpr_at_fpr_tie_between_good_and_fault_is_one_operating_point():
    labels = np.array([0, 1, 0, 0, 1])
    scores = np.array([0.9, 0.9, 0.1, 0.2, 0.3])
    # operating points: (0, 0), (1/3, 1/2) at 0.9, (1/3, 1) at 0.3, ...
    assert tpr_at_fpr(labels, scores, 0.3) == 0.0  # cannot take the fault at 0.9 without the good one
    assert tpr_at_fpr(labels, scores, 1 / 3) == 1.0


@pytest.mark.parametrize("seed", [3, 4])
def test_tpr_at_fpr_matches_definition_on_random_data(seed):
    labels, scores = random_case(seed, n_good=300, n_fault=60, decimals=2)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    for x in (0.01, 0.05, 0.2):
        assert tpr_at_fpr(labels, scores, x) == tpr[fpr <= x].max()
    # brute force over thresholds: largest recall with at most floor(x * n_good) false alarms
    n_good = int((labels == 0).sum())
    for x in (0.01, 0.05):
        best = max(
            (
                np.mean(scores[labels == 1] >= t)
                for t in np.unique(scores)
                if np.sum(scores[labels == 0] >= t) <= np.floor(x * n_good)
            ),
            default=0.0,
        )
        assert tpr_at_fpr(labels, scores, x) == pytest.approx(best)


def test_youden_threshold_and_confusion_counts_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.8])
    # J: t=0.8 -> 1/3, t=0.7 -> 2/3, t=0.6 -> 1/3, t=0.4 -> 2/3 (tie: the higher threshold wins), t=0.2 -> 1/3
    m = image_metrics(labels, scores)
    assert m["threshold"] == 0.7  # in floating point 1 - 1/3 > 2/3: the tie must be judged exactly
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (3, 0, 1, 2)
    assert m["precision"] == 1.0
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(0.8)
    assert m["accuracy"] == pytest.approx(5 / 6)


def test_youden_predicts_fault_at_equality_and_maximises_j():
    labels, scores = random_case(5, decimals=1)
    thr = youden_threshold(labels, scores)
    assert thr in set(scores.tolist())

    def j(t):
        pred = scores >= t
        return pred[labels == 1].mean() - pred[labels == 0].mean()

    assert j(thr) == pytest.approx(max(j(t) for t in np.unique(scores)))
    m = image_metrics(labels, scores)
    pred = scores >= m["threshold"]
    assert m["tp"] == int(np.sum(pred & (labels == 1)))
    assert m["fp"] == int(np.sum(pred & (labels == 0)))
    assert m["tn"] + m["fp"] == m["n_good"] and m["tp"] + m["fn"] == m["n_fault"]


@pytest.mark.parametrize("seed", [6, 7])
def test_f1_max_equals_brute_force(seed):
    labels, scores = random_case(seed, decimals=1 if seed == 7 else None)
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & (labels == 1))
        fp = np.sum(pred & (labels == 0))
        fn = np.sum(~pred & (labels == 1))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    assert f1_max(labels, scores) == pytest.approx(best, abs=1e-12)
    assert image_metrics(labels, scores)["f1_max"] == pytest.approx(best, abs=1e-12)


def test_all_values_are_json_serialisable_python_types_in_range():
    labels, scores = random_case(8)
    m = image_metrics(labels, scores.astype(np.float32))
    json.dumps(m, allow_nan=False)
    for name in METRIC_NAMES:
        assert type(m[name]) is float, name
        if name != "threshold":
            assert 0.0 <= m[name] <= 1.0, name
    for name in ("tn", "fp", "fn", "tp", "n_good", "n_fault", "n_bad_scores"):
        assert type(m[name]) is int, name


def test_nan_and_inf_scores_are_never_a_number():
    labels, scores = random_case(9)
    scores[[0, 5]] = np.nan
    scores[7] = np.inf
    m = image_metrics(labels, scores)
    assert m["valid"] is False
    assert m["n_bad_scores"] == 3
    assert (m["n_good"], m["n_fault"]) == (120, 40)
    assert all(m[name] is None for name in METRIC_NAMES)
    assert all(m[name] is None for name in ("tn", "fp", "fn", "tp"))
    assert "NaN/Inf" in m["reason"]
    json.dumps(m, allow_nan=False)


def test_single_class_is_invalid_with_reason_not_an_error():
    m = image_metrics(np.zeros(5, int), np.arange(5.0))
    assert m["valid"] is False and m["n_bad_scores"] == 0
    assert "one class" in m["reason"]
    assert all(m[name] is None for name in METRIC_NAMES)


def test_bad_labels_and_length_mismatch_raise():
    with pytest.raises(ValueError):
        image_metrics(np.array([0, 1, 2]), np.arange(3.0))
    with pytest.raises(ValueError):
        image_metrics(np.array([0, 1]), np.arange(3.0))


def test_pixel_auroc_equals_sklearn_on_flattened_arrays():
    rng = np.random.default_rng(10)
    masks = np.zeros((4, 16, 16), np.uint8)
    masks[1, 3:7, 4:9] = 1
    masks[3, 10:14, 0:5] = 1
    maps = rng.normal(size=masks.shape).astype(np.float32) + 1.5 * masks
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_pixel_auroc_none_cases():
    maps = np.random.default_rng(11).normal(size=(2, 8, 8))
    assert pixel_auroc(np.zeros((2, 8, 8)), maps) is None
    masks = np.zeros((2, 8, 8))
    masks[0, :2] = 1
    maps[1, 3, 3] = np.nan
    assert pixel_auroc(masks, maps) is None
    with pytest.raises(ValueError):
        pixel_auroc(masks, maps[:, :4])


def test_summarise_mean_over_valid_domains_and_flags_invalid():
    a = image_metrics(*random_case(12))
    b = image_metrics(*random_case(13))
    a["pixel_auroc"], b["pixel_auroc"] = 0.9, 0.7
    ok = summarise({"domain_A": a, "domain_B": b}, pooled={"auroc": 0.5})
    assert set(ok) == {"domain_A", "domain_B", "mean", "pooled"}
    assert ok["mean"]["valid"] is True and ok["mean"]["n_domains"] == 2
    for name in ("auroc", "ap", "f1_max", "tpr_at_fpr_1", "tpr_at_fpr_5", "precision", "recall", "f1", "accuracy"):
        assert ok["mean"][name] == pytest.approx((a[name] + b[name]) / 2), name
    assert ok["mean"]["pixel_auroc"] == pytest.approx(0.8)
    assert ok["mean"]["threshold"] is None
    assert ok["pooled"] == {"auroc": 0.5}

    labels, scores = random_case(14)
    scores[0] = np.nan
    bad = image_metrics(labels, scores)
    res = summarise({"domain_A": a, "domain_B": b, "domain_C": bad}, pooled=bad)
    assert res["mean"]["valid"] is False
    assert res["mean"]["invalid_domains"] == ["domain_C"]
    assert res["mean"]["n_bad_scores"] == 1
    assert res["mean"]["auroc"] == pytest.approx((a["auroc"] + b["auroc"]) / 2)
    json.dumps(res, allow_nan=False)


def test_roc_points_table_is_on_the_curve_and_downsampled():
    labels, scores = random_case(15, n_good=900, n_fault=300)
    rows = roc_points_table(labels, scores)
    assert 2 < len(rows) <= 200
    assert (rows[0]["fpr"], rows[0]["tpr"], rows[0]["threshold"]) == (0.0, 0.0, None)
    assert (rows[-1]["fpr"], rows[-1]["tpr"]) == (1.0, 1.0)
    fpr, tpr, thr = roc_curve(labels, scores, drop_intermediate=False)
    lookup = {float(t): (f, r) for f, r, t in zip(fpr, tpr, thr)}
    for row in rows[1:]:
        assert lookup[row["threshold"]] == (row["fpr"], row["tpr"])
    assert all(r1["fpr"] <= r2["fpr"] and r1["tpr"] <= r2["tpr"] for r1, r2 in zip(rows, rows[1:]))
    small = roc_points_table([0, 1, 0, 1], [0.1, 0.4, 0.35, 0.8])
    assert small == [
        {"fpr": 0.0, "tpr": 0.0, "threshold": None},
        {"fpr": 0.0, "tpr": 0.5, "threshold": 0.8},
        {"fpr": 0.0, "tpr": 1.0, "threshold": 0.4},
        {"fpr": 1.0, "tpr": 1.0, "threshold": 0.1},
    ]
    assert roc_points_table([0, 0], [0.1, 0.2]) == []
