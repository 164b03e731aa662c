"""The synthetic HDMAP generator: layout, determinism, and the properties it must reproduce
(docs/design.md#data-synth)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from pydantic import ValidationError
from scipy import ndimage, stats

import shipped
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.pipeline.data import DEFAULT_DOMAINS, folder_phases, scan_root
from hdmap_ad.pipeline.synth import STYLES, SynthConfig, generate, make_domain

REAL_RAW_MAX = {"domain_A": 0.324670, "domain_B": 1.324418, "domain_C": 0.087341, "domain_D": 0.418999}
TINY = SynthConfig(n_train=8, n_test_good=6, n_test_fault=6)  # = the session fixture's config


@pytest.fixture(scope="module")
def sets():
    """A bigger in-memory set per domain (default train size, 40 + 40 test) for statistical properties."""
    cfg = SynthConfig(n_train=200, n_test_good=40, n_test_fault=40, seed=0)
    return {d: make_domain(cfg, d) for d in DEFAULT_DOMAINS}


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    return stats.mannwhitneyu(positives, negatives).statistic / (len(negatives) * len(positives))


# ------------------------------------------------------------------------------------------------ files


def test_layout_names_types_and_masks(synthetic_root):
    summary = json.loads((synthetic_root / "synth.json").read_text())
    for domain in DEFAULT_DOMAINS:
        for sub, n in (("train/good", 8), ("test/good", 6), ("test/fault", 6), ("ground_truth/fault", 6)):
            names = sorted(p.name for p in (synthetic_root / domain / sub).iterdir())
            assert names == [f"{i:06d}.tiff" for i in range(n)]
        for sub in ("train/good", "test/good", "test/fault"):
            a = tifffile.imread(synthetic_root / domain / sub / "000000.tiff")
            assert a.dtype == np.float32 and a.shape == (31, 95)
        truth = make_domain(TINY, domain)
        for i in range(6):
            mask = tifffile.imread(synthetic_root / domain / "ground_truth" / "fault" / f"{i:06d}.tiff")
            assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
            assert np.array_equal(mask > 0, truth.masks[i] == 1)
            assert np.array_equal(
                tifffile.imread(synthetic_root / domain / "test" / "fault" / f"{i:06d}.tiff"), truth.test_fault[i]
            )
        assert summary["domains"][domain]["train"] == 8


def test_same_seed_same_bytes_other_seed_other_maps(tmp_path, synthetic_root):
    cfg = SynthConfig(n_train=3, n_test_good=2, n_test_fault=2, domains=("domain_B", "domain_C"), seed=7)
    generate(tmp_path / "a", cfg, progress=False)
    generate(tmp_path / "b", cfg, progress=False)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    generate(tmp_path / "c", cfg.model_copy(update={"seed": 8}), progress=False)
    a = tifffile.imread(tmp_path / "a" / "domain_C" / "train" / "good" / "000000.tiff")
    c = tifffile.imread(tmp_path / "c" / "domain_C" / "train" / "good" / "000000.tiff")
    assert not np.allclose(a, c)
    # Per-domain streams: generating one domain alone gives the maps it has among all four.
    alone = SynthConfig(**{**TINY.model_dump(), "domains": ("domain_C",)})
    generate(tmp_path / "alone", alone, progress=False)
    full = files(synthetic_root)
    assert all(full[f"domain_C/{k}"] == v for k, v in files(tmp_path / "alone" / "domain_C").items())


def test_generate_is_atomic_and_validates(tmp_path):
    out = tmp_path / "synthetic"
    cfg = SynthConfig(n_train=2, n_test_good=2, n_test_fault=2, domains=("domain_A",))
    generate(out, cfg, progress=False)
    before = files(out)
    with pytest.raises(HdmapError):
        make_domain(cfg, "domain_X")
    for bad in ({"domains": ("domain_X",)}, {"domains": ("domain_A", "domain_A")}, {"n_test_fault": 0}, {"height": 2}):
        with pytest.raises(ValidationError):
            SynthConfig(**bad)
    assert files(out) == before
    generate(out, SynthConfig(n_train=2, n_test_good=2, n_test_fault=2, domains=("domain_D",)), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["domain_D", "synth.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]  # no temporary folders left


# ------------------------------------------------------------------------------ docs/design.md#data-synth properties


def test_raw_scales_and_minmax_by_train_max_without_clipping(synthetic_root, sets):
    summary = json.loads((synthetic_root / "synth.json").read_text())
    above_1 = 0
    for domain in DEFAULT_DOMAINS:
        assert summary["domains"][domain]["raw_train_max"] == pytest.approx(REAL_RAW_MAX[domain], rel=1e-9)
        train = np.stack([tifffile.imread(p) for p in sorted((synthetic_root / domain / "train" / "good").iterdir())])
        assert train.max() == np.float32(1.0)  # divided by the train set's global max
        assert train.min() > 0.02  # min 0 in the scaling: the data's own minimum is not subtracted
        m = sets[domain]
        assert m.train.max() == np.float32(1.0) and m.raw_train_max == pytest.approx(REAL_RAW_MAX[domain], rel=1e-9)
        test = np.concatenate([m.test_good, m.test_fault])
        above_1 += int((test.max(axis=(1, 2)) > 1).sum())
        # Test maps above 1 are warm or faulty: a cold normal map stays inside the train range.
        cold = [p == "cold" for p in folder_phases(len(m.test_good))]
        assert m.test_good[cold].max() < 1.0
    assert above_1 > 0
    assert sets["domain_A"].test_fault.max() > 1.2  # strong faults exceed the train range clearly


def test_fixed_periodic_structure_with_horizontal_orientation(sets):
    other_seed = SynthConfig(n_train=50, n_test_good=2, n_test_fault=2, seed=123)
    for domain, m in sets.items():
        train = m.train
        vertical = np.mean(np.diff(train, axis=1) ** 2)  # changes from row to row
        horizontal = np.mean(np.diff(train, axis=2) ** 2)  # changes along a row
        assert vertical > 3 * horizontal, domain
        profile = train.mean(axis=(0, 2))
        spectrum = np.abs(np.fft.rfft(profile - profile.mean()))
        assert np.argmax(spectrum) == round(31 / STYLES[domain].row_period), domain  # the domain's period
        # Fixed per domain: another seed has the same row profile.
        again = make_domain(other_seed, domain).train.mean(axis=(0, 2))
        assert np.corrcoef(profile, again)[0, 1] > 0.95, domain
    profiles = [sets[d].train.mean(axis=(0, 2)) for d in DEFAULT_DOMAINS]
    assert abs(np.corrcoef(profiles[0], profiles[2])[0, 1]) < 0.9  # domains differ


def test_per_image_jitter_noise_skew_and_mean(sets):
    for domain, m in sets.items():
        good = m.test_good[:20]  # one phase (cold): differences are jitter and noise, not temperature
        means = good.mean(axis=(1, 2))
        assert means.std() / means.mean() > 0.02, domain  # per-image amplitude jitter
        residual = good / good.mean(axis=0, keepdims=True)
        assert 0.05 < residual.std() < 0.4, domain  # pixel noise, not dominating
        assert not np.array_equal(good[0], good[1])
        assert stats.skew(m.train.ravel()) > 0.3, domain  # right-skewed
        assert 0.2 <= m.train.mean() <= 0.3, domain  # scaled mean as in docs/design.md#data-layout
        assert 0.06 <= m.train.std() <= 0.12, domain


def test_cold_first_warm_brighter(sets, synthetic_root):
    for domain, m in sets.items():
        phases = np.array(folder_phases(len(m.test_good)))
        ratio = m.test_good[phases == "warm"].mean() / m.test_good[phases == "cold"].mean()
        assert 1.3 < ratio < 1.5, domain
        assert 0 < m.stats["train_warm"] < len(m.train)  # train maps are a mix of both
    records = [r for r in scan_root(synthetic_root, ["domain_B"]) if r.split == "test" and r.label == 0]
    means = np.array([tifffile.imread(r.path).mean() for r in records])
    cold = np.array([r.phase == "cold" for r in records])
    assert means[~cold].mean() > 1.2 * means[cold].mean()  # the files scanned as warm are the bright ones


def test_faults_are_horizontal_bands_matching_their_masks(sets):
    broken = 0
    for domain, m in sets.items():
        phases = np.array(folder_phases(len(m.test_fault)))
        reference = {p: m.test_good[phases == p].mean(axis=0) for p in ("cold", "warm")}
        contrast = {"cold": [], "warm": []}
        for mask, fault, phase in zip(m.masks, m.test_fault, phases):
            rows = np.flatnonzero(mask.any(axis=1))
            assert 1 <= len(rows) <= 2 and np.all(np.diff(rows) == 1), domain
            assert all(np.array_equal(mask[r], mask[rows[0]]) for r in rows)  # the same columns in each row
            cols = np.flatnonzero(mask[rows[0]])
            assert 10 <= cols[-1] - cols[0] + 1 <= 80, domain
            broken += int(len(cols) < cols[-1] - cols[0] + 1)
            contrast[phase].append(fault[mask == 1].mean() / reference[phase][mask == 1].mean())
        warm, cold = np.mean(contrast["warm"]), np.mean(contrast["cold"])
        assert cold - 1 < 0.9 * (warm - 1), domain  # weaker when cold
        assert warm == pytest.approx(1 + STYLES[domain].fault, abs=0.15), domain
        if domain == "domain_C":
            assert 1.2 < warm < 1.4  # faint: ≈ 1.3 × surroundings
        else:
            assert warm > 1.4, domain
    assert broken > 0


def residual_scores(train: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """A simple detector: the brightest 10-pixel stretch of a row relative to the mean normal map."""
    reference = train.mean(axis=0)
    amplitude = np.median(maps / reference, axis=(1, 2), keepdims=True)
    ratio = maps / (amplitude * reference) - 1
    return ndimage.uniform_filter(ratio, size=(1, 1, 10), mode="nearest").max(axis=(1, 2))


def test_faults_detectable_but_not_trivial(sets):
    result = {}
    for domain, m in sets.items():
        good, fault = residual_scores(m.train, m.test_good), residual_scores(m.train, m.test_fault)
        result[domain] = auroc(good, fault)
    assert result["domain_A"] > 0.95 and result["domain_B"] > 0.95
    assert 0.6 < result["domain_C"] < 0.97  # faint faults: found, but not perfectly
    assert result["domain_C"] < result["domain_D"] < result["domain_A"]


@pytest.mark.parametrize(
    ("flags", "key"), [(["--height", "2"], "synth.height"), (["--n-test-fault", "1"], "synth.n_test_fault")]
)
def test_synth_flags_are_checked_as_the_params_are(tmp_path, capsys, flags, key):
    """`hdmap-ad synth`'s flags override the `synth` section and get its checks: one line naming the key,
    exit status 2, nothing written (the limits are SynthParams', the same as for params.yaml's values)."""
    from hdmap_ad.apps.cli import main

    out = tmp_path / "synthetic"
    assert main(["synth", "--params", str(shipped.params_file()), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and key in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_synth_flags_reach_the_generator(tmp_path):
    from hdmap_ad.apps.cli import main

    out = tmp_path / "synthetic"
    flags = ["--n-train", "2", "--n-test-good", "2", "--n-test-fault", "3", "--height", "8", "--width", "20"]
    assert main(["synth", "--params", str(shipped.params_file()), "--out", str(out), "--seed", "5", *flags]) == 0
    config = json.loads((out / "synth.json").read_text())["config"]
    assert config == {
        "n_train": 2,
        "n_test_good": 2,
        "n_test_fault": 3,
        "height": 8,
        "width": 20,
        "domains": list(DEFAULT_DOMAINS),
        "seed": 5,
    }
