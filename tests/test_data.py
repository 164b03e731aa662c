"""Reading maps, scanning the layout, preparing (packing) and loading prepared data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from rich.console import Console

from hdmap_ad.core.errors import HdmapError
from hdmap_ad.pipeline.data import (
    DEFAULT_DOMAINS,
    PreparedData,
    folder_phases,
    prepare_dataset,
    read_map,
    scan_root,
    summary_table,
)

SPLIT_DIRS = ("train/good", "test/good", "test/fault")


def make_root(root: Path, domains=("domain_A", "domain_B"), n: int = 2, shape=(4, 6)) -> Path:
    """A small layout of float TIFFs whose values encode (domain, folder, file) so mix-ups show."""
    for d_i, d in enumerate(domains):
        for s_i, sub in enumerate(SPLIT_DIRS):
            folder = root / d / sub
            folder.mkdir(parents=True)
            for k in range(n):
                value = 100 * d_i + 10 * s_i + k + 0.25
                tifffile.imwrite(folder / f"{k:06d}.tiff", np.full(shape, value, np.float32))
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# ------------------------------------------------------------------------------------------------ read_map


def test_float_tiff_values_are_kept_exactly(tmp_path):
    a = np.array([[0.0, 1e-7, 0.5, 1.0], [1.0000001, 2.94, 7.5, 123.456]], dtype=np.float32)
    tifffile.imwrite(tmp_path / "m.tiff", a)
    tifffile.imwrite(tmp_path / "m.tif", a[..., None])  # H×W×1 is squeezed
    for name in ("m.tiff", "m.tif"):
        got = read_map(tmp_path / name)
        assert got.dtype == np.float32 and got.shape == (2, 4)
        assert np.array_equal(got, a)


def test_png_is_scaled_by_its_bit_depth(tmp_path):
    a16 = np.array([[0, 1, 32768, 65535]], dtype=np.uint16)
    a8 = np.array([[0, 1, 128, 255]], dtype=np.uint8)
    Image.fromarray(a16).save(tmp_path / "m16.png")
    Image.fromarray(a8).save(tmp_path / "m8.png")
    got16, got8 = read_map(tmp_path / "m16.png"), read_map(tmp_path / "m8.png")
    assert got16.dtype == got8.dtype == np.float32
    np.testing.assert_allclose(got16, a16 / 65535.0, rtol=1e-6, atol=0)
    np.testing.assert_allclose(got8, a8 / 255.0, rtol=1e-6, atol=0)
    assert got16[0, 3] == 1.0 and got8[0, 3] == 1.0 and got16[0, 1] > 0


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = np.ones((3, 4), np.float32)
    cases = {}
    p = tmp_path / "corrupt.tiff"
    p.write_bytes(b"II*\x00this is not a tiff at all" * 3)
    cases["corrupt"] = (p, "cannot read")
    p = tmp_path / "corrupt.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 5)
    cases["corrupt png"] = (p, "cannot read")
    nan = good.copy()
    nan[0, :2] = np.nan
    tifffile.imwrite(p := tmp_path / "nan.tiff", nan)
    cases["nan"] = (p, "2 NaN and 0 Inf")
    inf = good.copy()
    inf[1, 1], inf[2, 2] = np.inf, -np.inf
    tifffile.imwrite(p := tmp_path / "inf.tiff", inf)
    cases["inf"] = (p, "0 NaN and 2 Inf")
    tifffile.imwrite(p := tmp_path / "cube.tiff", np.ones((2, 3, 4), np.float32), photometric="minisblack")
    cases["3-D"] = (p, "(2, 3, 4)")
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(p := tmp_path / "rgb.png")
    cases["rgb png"] = (p, "(3, 4, 3)")
    (p := tmp_path / "empty.tiff").write_bytes(b"")
    cases["empty"] = (p, "empty file")
    tifffile.imwrite(p := tmp_path / "map.jpg", good)
    cases["suffix"] = (p, "unsupported file type")
    cases["missing"] = (tmp_path / "missing.tiff", "not found")
    return cases


def test_each_bad_input_is_an_error_naming_the_file(tmp_path):
    for what, (path, expected) in _bad_inputs(tmp_path).items():
        with pytest.raises(HdmapError) as info:
            read_map(path)
        message = str(info.value)
        assert message.startswith(f"{path}: "), what  # predict strips this prefix
        assert expected in message, (what, message)
        assert "\n" not in message, what


# ------------------------------------------------------------------------------------------------ scan_root


def test_scan_labels_masks_and_phases(synthetic_root):
    records = scan_root(synthetic_root, list(DEFAULT_DOMAINS))
    assert len(records) == 4 * (8 + 6 + 6)
    key = [(r.domain, r.split != "train", r.label, r.path.name) for r in records]
    assert key == sorted(key)  # domain, train before test, good before fault, file name
    for r in records:
        assert r.path.parent.name == ("fault" if r.label else "good")
        assert r.path.parent.parent.name == r.split
        assert (r.mask_path is not None) == (r.label == 1)
        if r.mask_path is not None:
            assert r.mask_path == synthetic_root / r.domain / "ground_truth" / "fault" / r.path.name
    a_test_good = [r for r in records if r.domain == "domain_A" and r.split == "test" and r.label == 0]
    assert [r.phase for r in a_test_good] == ["cold"] * 3 + ["warm"] * 3
    assert {r.phase for r in records if r.split == "train"} == {"n/a"}


def test_scan_selects_a_subset_of_domains(synthetic_root):
    records = scan_root(synthetic_root, ["domain_D", "domain_B"])
    assert sorted({r.domain for r in records}) == ["domain_B", "domain_D"]
    assert [r.domain for r in records] == sorted(r.domain for r in records)


def test_folder_phases_and_natural_order(tmp_path):
    assert folder_phases(4) == ["cold", "cold", "warm", "warm"]
    assert folder_phases(5) == ["cold", "cold", "warm", "warm", "warm"]
    root = make_root(tmp_path / "r", domains=("domain_A",), n=1)
    folder = root / "domain_A" / "test" / "good"
    for name in ("2.tiff", "10.tiff", "1.png"):
        Image.fromarray(np.zeros((4, 6), np.uint8)).save(folder / name) if name.endswith("png") else tifffile.imwrite(
            folder / name, np.zeros((4, 6), np.float32)
        )
    (folder / "notes.txt").write_text("ignored")
    names = [r.path.name for r in scan_root(root, ["domain_A"]) if r.split == "test" and r.label == 0]
    assert names == ["000000.tiff", "1.png", "2.tiff", "10.tiff"]


def test_layout_errors_name_the_folder(tmp_path):
    root = make_root(tmp_path / "root")
    with pytest.raises(HdmapError, match="data root not found") as info:
        scan_root(tmp_path / "nowhere", ["domain_A"])
    assert str(tmp_path / "nowhere") in str(info.value)

    for name in ("domain_C", "domain_X"):  # a known domain that is absent, and an unknown name
        with pytest.raises(HdmapError) as info:
            scan_root(root, ["domain_A", name])
        message = str(info.value)
        assert str(root / name) in message and "domain_A, domain_B" in message

    with pytest.raises(HdmapError, match="not a folder name"):
        scan_root(root, ["../root"])

    shutil.rmtree(root / "domain_B" / "test" / "fault")
    with pytest.raises(HdmapError, match="split folder not found") as info:
        scan_root(root, ["domain_A", "domain_B"])
    assert str(root / "domain_B" / "test" / "fault") in str(info.value)

    for f in (root / "domain_A" / "train" / "good").iterdir():
        f.unlink()
    (root / "domain_A" / "train" / "good" / "readme.txt").write_text("not a map")
    with pytest.raises(HdmapError, match="no maps") as info:
        scan_root(root, ["domain_A"])
    assert str(root / "domain_A" / "train" / "good") in str(info.value)


# ------------------------------------------------------------------------------------------------ prepare


def test_shape_mismatch_names_the_file_and_both_shapes(tmp_path):
    root = make_root(tmp_path / "root")
    odd = root / "domain_B" / "test" / "good" / "000001.tiff"
    tifffile.imwrite(odd, np.ones((5, 6), np.float32))
    with pytest.raises(HdmapError) as info:
        prepare_dataset(root, ["domain_A", "domain_B"], tmp_path / "out", progress=False)
    message = str(info.value)
    assert str(odd) in message and "(5, 6)" in message and "(4, 6)" in message
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


def test_prepared_arrays_match_read_map_of_each_file(prepared_dir, synthetic_root):
    data = PreparedData.load(prepared_dir)
    assert data.domains == list(DEFAULT_DOMAINS) and data.shape == (31, 95)
    m = data.manifest
    assert list(m.columns) == [
        "domain",
        "split",
        "label",
        "index",
        "path",
        "height",
        "width",
        "min",
        "max",
        "mean",
        "phase",
        "mask_path",
    ]
    assert len(m) == 4 * 20
    for domain in DEFAULT_DOMAINS:
        masks = data.masks(domain)
        assert masks is not None and masks.dtype == np.uint8
        for split in ("train", "test"):
            maps, labels = data.maps(domain, split), data.labels(domain, split)
            rows = m[(m.domain == domain) & (m.split == split)].sort_values("index")
            assert maps.dtype == np.float32 and maps.shape == (len(rows), 31, 95)
            assert labels.dtype == np.int64 and list(labels) == list(rows.label)
            assert data.paths(domain, split) == list(rows.path)
            for row in rows.itertuples():
                direct = read_map(Path(row.path))
                assert np.array_equal(maps[row.index], direct)
                assert (row.min, row.max) == (float(direct.min()), float(direct.max()))
                assert row.mean == pytest.approx(float(direct.mean(dtype=np.float64)), rel=1e-12)
                assert Path(row.path).parent.name == ("fault" if row.label else "good")
                if split == "test":
                    expected = np.zeros((31, 95), np.uint8)
                    if row.label:
                        expected = (tifffile.imread(row.mask_path) > 0).astype(np.uint8)
                        assert expected.any()
                    assert np.array_equal(masks[row.index], expected)
                else:
                    assert row.phase == "n/a" and row.mask_path == ""
    assert set(m[m.split == "test"].phase) == {"cold", "warm"}


def test_summary_json_and_table(prepared_dir):
    data = PreparedData.load(prepared_dir)
    summary = json.loads((prepared_dir / "summary.json").read_text())
    assert summary["shape"] == [31, 95]
    for domain, d in summary["domains"].items():
        test = data.maps(domain, "test")
        assert (d["train"], d["test_good"], d["test_fault"], d["masks"]) == (8, 6, 6, 6)
        assert d["max"]["train"] == 1.0 and d["max"]["test"] == float(test.max())
        assert d["n_test_above_1"] == int((test.max(axis=(1, 2)) > 1).sum())
    console = Console(record=True, width=200)
    console.print(summary_table(summary))
    text = console.export_text()
    assert all(domain in text for domain in DEFAULT_DOMAINS)


def test_prepare_subset_and_missing_masks(tmp_path):
    root = make_root(tmp_path / "root", domains=("domain_A", "domain_B", "domain_C"))
    gt = root / "domain_B" / "ground_truth" / "fault"
    gt.mkdir(parents=True)
    tifffile.imwrite(gt / "000000.tiff", np.full((4, 6), 255, np.uint8))  # one fault of two has a mask
    manifest = prepare_dataset(root, ["domain_C", "domain_B"], tmp_path / "out", progress=False)
    data = PreparedData.load(tmp_path / "out")
    assert data.domains == ["domain_B", "domain_C"] and sorted(set(manifest.domain)) == data.domains
    assert data.masks("domain_B") is None and data.masks("domain_C") is None
    assert data.maps("domain_C", "test")[3, 0, 0] == np.float32(200 + 20 + 1 + 0.25)  # test/fault/000001
    assert list(data.labels("domain_C", "train")) == [0, 0]
    with pytest.raises(HdmapError, match="domain_A"):
        data.maps("domain_A", "train")


def test_prepare_is_atomic(tmp_path, monkeypatch):
    root = make_root(tmp_path / "root")
    out = tmp_path / "prepared"
    prepare_dataset(root, ["domain_A", "domain_B"], out, progress=False)
    before = snapshot(out)
    assert "manifest.csv" in before and "domain_A/train.npy" in before

    bad = root / "domain_A" / "test" / "good" / "000001.tiff"
    saved = bad.read_bytes()
    bad.write_bytes(b"broken")
    with pytest.raises(HdmapError, match="000001.tiff"):
        prepare_dataset(root, ["domain_A", "domain_B"], out, progress=False)
    assert snapshot(out) == before and leftovers(out) == []
    bad.write_bytes(saved)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", disk_full)  # fails after the arrays are written
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(root, ["domain_A"], out, progress=False)
    assert snapshot(out) == before and leftovers(out) == []
    monkeypatch.undo()

    prepare_dataset(root, ["domain_B"], out, progress=False)  # a successful run replaces everything
    assert PreparedData.load(out).domains == ["domain_B"] and not (out / "domain_A").exists()
    assert leftovers(out) == []


def test_load_errors_point_to_dvc_repro(tmp_path, prepared_dir):
    with pytest.raises(HdmapError, match="dvc repro prepare") as info:
        PreparedData.load(tmp_path / "nothing")
    assert str(tmp_path / "nothing") in str(info.value)
    partial = tmp_path / "partial"
    shutil.copytree(prepared_dir, partial)
    (partial / "domain_C" / "test_labels.npy").unlink()
    with pytest.raises(HdmapError, match=r"incomplete \(no domain_C/test_labels.npy\).*dvc repro prepare"):
        PreparedData.load(partial)


def test_data_digest_is_content_not_location(synthetic_root, tmp_path):
    """The same maps prepared from two places give one digest (runs on two machines compare); a changed
    pixel that keeps a map's minimum, maximum and mean gives another."""
    import shutil

    import tifffile

    from hdmap_ad.pipeline.data import DEFAULT_DOMAINS, PreparedData, prepare_dataset

    elsewhere = tmp_path / "elsewhere" / "hdmap"
    shutil.copytree(synthetic_root, elsewhere)
    prepare_dataset(synthetic_root, DEFAULT_DOMAINS, tmp_path / "a", progress=False)
    prepare_dataset(elsewhere, DEFAULT_DOMAINS, tmp_path / "b", progress=False)
    digest = PreparedData.load(tmp_path / "a").data_digest()
    assert PreparedData.load(tmp_path / "b").data_digest() == digest
    target = sorted((elsewhere / "domain_A/train/good").iterdir())[0]
    arr = tifffile.imread(target)
    arr[[3, 4]] = arr[[4, 3]]  # swap two rows: same min, max and mean
    tifffile.imwrite(target, arr)
    prepare_dataset(elsewhere, DEFAULT_DOMAINS, tmp_path / "c", progress=False)
    assert PreparedData.load(tmp_path / "c").data_digest() != digest
