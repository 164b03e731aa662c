"""Every plot function writes one valid PNG atomically."""

import numpy as np
import pytest

from hdmap_ad import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, out, folder):
    assert path == out
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5000  # a real figure, not an empty canvas
    assert sorted(p.name for p in folder.iterdir()) == [out.name]  # no temporary file left behind


def small_curves():
    return {"domain_A": (np.array([0, 0, 1, 1, 0]), np.array([0.1, 0.4, 0.35, 0.8, 0.2])),
            "domain_B": (np.array([0, 1, 0, 1]), np.array([0.3, 0.9, 0.2, 0.5])),
            "domain_C": (np.array([0, 0, 0]), np.array([0.3, 0.2, 0.1]))}  # one class: drawn as a note


def test_plot_roc(tmp_path):
    out = tmp_path / "sub" / "roc.png"
    assert_png(plots.plot_roc(small_curves(), out), out, out.parent)


def test_plot_score_distributions_with_thresholds_and_empty_class(tmp_path):
    dists = {"domain_A": (np.array([0.1, 0.2, 0.4]), np.array([0.35, 0.8])),
             "domain_B": (np.array([0.3, 0.2]), np.array([], dtype=float)),
             "domain_C": (np.array([0.5, 0.5]), np.array([0.5]))}  # constant scores
    out = tmp_path / "dist.png"
    path = plots.plot_score_distributions(dists, out, {"domain_A": 0.35, "domain_B": 0.3})
    assert_png(path, out, tmp_path)


def test_plot_examples_various_shapes(tmp_path):
    rng = np.random.default_rng(0)
    items = [("domain_A a.tiff (good)", rng.random((31, 95)), rng.random((16, 16)), 0.12, 0),
             ("domain_B b.tiff (fault)", rng.random((3, 31, 95)), rng.random((1, 16, 16)), 0.93, 1)]
    out = tmp_path / "examples.png"
    assert_png(plots.plot_examples(items, out), out, tmp_path)
    with pytest.raises(ValueError):
        plots.plot_examples([], tmp_path / "none.png")


def test_plot_map_pair_replaces_existing_file(tmp_path):
    out = tmp_path / "pair.png"
    out.write_bytes(b"old")
    rng = np.random.default_rng(1)
    path = plots.plot_map_pair(rng.random((31, 95)), rng.random((8, 8)), "x.tiff  score 0.5  ANOMALY", out)
    assert_png(path, out, tmp_path)


def test_plot_seed_comparison_with_missing_seed_and_nan(tmp_path):
    values = {"baseline": {42: 0.97, 43: 0.96, 44: 0.98},
              "gem": {42: 0.98, 43: float("nan"), 44: 0.985, 123: 0.99},
              "focal": {42: 0.95}}
    out = tmp_path / "seeds.png"
    assert_png(plots.plot_seed_comparison(values, "auroc", "mean", out), out, tmp_path)


def test_roc_points_table_reexported():
    rows = plots.roc_points_table([0, 1, 0, 1], [0.1, 0.4, 0.35, 0.8])
    assert rows[0]["fpr"] == 0.0 and rows[-1]["tpr"] == 1.0
