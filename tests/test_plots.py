"""Every plot function writes one valid PNG atomically."""

import numpy as np
import pytest

from hdmap_ad.pipeline import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, out, folder):
    assert path == out
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5000  # a real figure, not an empty canvas
    assert sorted(p.name for p in folder.iterdir()) == [out.name]  # no temporary file left behind


def small_curves():
    return {
        "domain_A": (np.array([0, 0, 1, 1, 0]), np.array([0.1, 0.4, 0.35, 0.8, 0.2])),
        "domain_B": (np.array([0, 1, 0, 1]), np.array([0.3, 0.9, 0.2, 0.5])),
        "domain_C": (np.array([0, 0, 0]), np.array([0.3, 0.2, 0.1])),
    }  # one class: drawn as a note


def test_plot_roc(tmp_path):
    out = tmp_path / "sub" / "roc.png"
    assert_png(plots.plot_roc(small_curves(), out), out, out.parent)


def test_plot_score_distributions_with_thresholds_and_empty_class(tmp_path):
    dists = {
        "domain_A": (np.array([0.1, 0.2, 0.4]), np.array([0.35, 0.8])),
        "domain_B": (np.array([0.3, 0.2]), np.array([], dtype=float)),
        "domain_C": (np.array([0.5, 0.5]), np.array([0.5])),
    }  # constant scores
    out = tmp_path / "dist.png"
    path = plots.plot_score_distributions(dists, out, {"domain_A": 0.35, "domain_B": 0.3})
    assert_png(path, out, tmp_path)


def test_plot_examples_various_shapes(tmp_path):
    rng = np.random.default_rng(0)
    items = [
        ("domain_A a.tiff (good)", rng.random((31, 95)), rng.random((16, 16)), 0.12, 0),
        ("domain_B b.tiff (fault)", rng.random((3, 31, 95)), rng.random((1, 16, 16)), 0.93, 1),
    ]
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
    values = {
        "baseline": {42: 0.97, 43: 0.96, 44: 0.98},
        "gem": {42: 0.98, 43: float("nan"), 44: 0.985, 123: 0.99},
        "focal": {42: 0.95},
    }
    out = tmp_path / "seeds.png"
    assert_png(plots.plot_seed_comparison(values, "auroc", "mean", out), out, tmp_path)


def test_roc_points_table_reexported():
    rows = plots.roc_points_table([0, 1, 0, 1], [0.1, 0.4, 0.35, 0.8])
    assert rows[0]["fpr"] == 0.0 and rows[-1]["tpr"] == 1.0


def test_examples_keep_the_map_aspect_and_share_colour_scales(tmp_path):
    rng = np.random.default_rng(2)
    mask = np.zeros((31, 95), np.uint8)
    mask[10:14, 20:40] = 1
    region = (3.0, 6.0, 25.0, 83.0)  # (top, left, height, width): the centre crop the model saw
    items = [
        plots.Example(
            "domain_A a.tiff (good)",
            rng.random((31, 95)),
            0.2 * rng.random((64, 64)),
            0.1,
            0,
            np.zeros((31, 95), np.uint8),
            region,
        ),
        plots.Example(
            "domain_A b.tiff (fault)", 3 + rng.random((31, 95)), 5 * rng.random((64, 64)), 0.9, 1, mask, region
        ),
    ]
    fig = plots.examples_figure(items, "Example maps, per domain: the highest-scoring good map")
    panels = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
    inputs, amaps = panels[0::2], panels[1::2]
    assert len(inputs) == len(amaps) == 2
    for ax in panels:
        assert ax.get_aspect() == 1.0  # one data unit = one map pixel on both axes: the 31×95 map stays wide
        assert ax.get_xlim() == (-0.5, 94.5) and ax.get_ylim() == (30.5, -0.5)
    assert inputs[0].images[0].get_extent() == [-0.5, 94.5, 30.5, -0.5]
    assert amaps[0].images[0].get_extent() == [5.5, 88.5, 27.5, 2.5]
    # one colour scale per column, spanning every map in it: the fault's hot map is not rescaled away
    in_clims = {ax.images[0].get_clim() for ax in inputs}
    a_clims = {ax.images[0].get_clim() for ax in amaps}
    assert len(in_clims) == 1 and len(a_clims) == 1
    lo, hi = a_clims.pop()
    assert lo == pytest.approx(min(float(e.anomaly_map.min()) for e in items))
    assert hi == pytest.approx(max(float(e.anomaly_map.max()) for e in items))
    assert len(inputs[0].collections) == 0 and len(inputs[1].collections) == 1 == len(
        amaps[1].collections
    )  # mask outline
    assert "highest-scoring good map" in fig.get_suptitle() and "ground-truth" in fig.get_suptitle()
    out = tmp_path / "examples.png"
    assert_png(plots.plot_examples(items, out), out, tmp_path)


def test_roc_grid_table_has_one_column_per_domain_through_every_roc_vertex():
    from sklearn.metrics import roc_curve

    curves = small_curves()
    table = plots.roc_grid_table(curves)
    assert list(table.columns) == ["fpr", "domain_A", "domain_B", "domain_C"]
    assert table["domain_C"].isna().all()  # one class: no curve, but the column DVC asks for exists
    assert table["fpr"].is_monotonic_increasing
    for domain in ("domain_A", "domain_B"):
        assert table[domain].is_monotonic_increasing
        fpr, tpr, _ = roc_curve(*curves[domain])
        for f, t in zip(fpr, tpr):  # the rows at each ROC vertex's FPR span its TPR: DVC's line keeps the steps
            at = table.loc[table["fpr"] == f, domain]
            assert at.min() <= t <= at.max(), (domain, f, t)
        assert len(table) < 2 * len(
            np.unique(np.concatenate([roc_curve(*curves[d])[0] for d in ("domain_A", "domain_B")]))
        )
