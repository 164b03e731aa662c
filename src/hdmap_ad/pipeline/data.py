"""HDMAP files on disk: read one map, scan a dataset folder, pack it into arrays, load the packed data.

`prepare_dataset` turns `<root>/<domain>/{train/good,test/good,test/fault}/*.tiff` into one folder of
NumPy arrays plus a manifest; training and evaluation read only that folder (`PreparedData`), and
prediction reads single files with the same `read_map`, so every path sees identical float32 values.

(Over 450 lines: reading, the folder layout, packing and loading are the one definition of the prepared
format, which is written and read only here.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich import box
from rich.table import Table

from hdmap_ad.core.config import HDMAP_DOMAINS
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.files import atomic_dir

DEFAULT_DOMAINS = HDMAP_DOMAINS
MAP_SUFFIXES = (".tif", ".tiff", ".png")
SPLITS = (("train", "good", 0), ("test", "good", 0), ("test", "fault", 1))  # folder -> label
MANIFEST_COLUMNS = [
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


# ---------------------------------------------------------------------------------------------- reading


def _read_raw(path: Path) -> np.ndarray:
    """The stored array; unsigned 8/16-bit data is scaled to [0, 1] (PNG or TIFF alike)."""
    return _read_stored(path)[0]


def _read_stored(path: Path) -> tuple[np.ndarray, str]:
    """The stored array as float32-ready data, and its storage type ("uint8", "uint16", "float32"...)."""
    suffix = path.suffix.lower()
    if suffix not in MAP_SUFFIXES:
        raise HdmapError(f"{path}: unsupported file type {path.suffix or '(none)'!r} (expected .tif, .tiff or .png)")
    if not path.exists():
        raise HdmapError(f"{path}: file not found")
    if not path.is_file():
        raise HdmapError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise HdmapError(f"{path}: empty file")
    try:
        arr = _read_png(path) if suffix == ".png" else _read_tiff(path)
    except HdmapError:
        raise
    except Exception as err:  # tifffile/Pillow raise many types for damaged files
        what = " ".join(str(err).split()) or type(err).__name__
        raise HdmapError(f"{path}: cannot read as {suffix[1:].upper()} ({what})") from None
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255), "uint8"
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / np.float32(65535), "uint16"
    if arr.dtype.kind == "f":
        return arr, str(arr.dtype)
    raise HdmapError(f"{path}: unsupported data type {arr.dtype} (expected float, 8-bit or 16-bit)")


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    log = logging.getLogger("tifffile")
    quiet = logging.Filter("nothing")  # our error names the file; tifffile's own warnings would only repeat it
    log.addFilter(quiet)
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series or not tif.pages:  # tifffile yields an empty array for a damaged first page
                raise ValueError("no image found in the file")
            return np.asarray(tif.asarray())
    finally:
        log.removeFilter(quiet)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        # Pillow may open 16-bit grayscale as "I" (int32) on older versions; the header's bit depth decides.
        if im.mode in ("L", "I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im)
            if im.mode == "I":
                arr = arr.astype(np.uint16 if _png_bit_depth(path) == 16 else np.uint8)
            return arr
        shape = (im.height, im.width, len(im.getbands()))
        raise HdmapError(f"{path}: expected a single-channel grayscale PNG, got mode {im.mode} with shape {shape}")


def _png_bit_depth(path: Path) -> int:
    with open(path, "rb") as f:
        header = f.read(26)
    return header[24] if len(header) >= 26 else 0


def read_map(path: Path) -> np.ndarray:
    """One HDMAP as a float32 H×W array: float TIFF values exactly as stored (no clipping), 16-bit
    PNG / 65535, 8-bit PNG / 255. Any problem is an HdmapError that starts with the file name."""
    return read_map_stored(path)[0]


def read_map_stored(path: Path) -> tuple[np.ndarray, str]:
    """`read_map`, and the storage type of the file (integer maps are rescaled, float maps are not,
    so one dataset must not mix them)."""
    path = Path(path)
    arr, stored = _read_stored(path)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise HdmapError(f"{path}: expected a 2-D map (H×W or H×W×1), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise HdmapError(f"{path}: map has no pixels (shape {tuple(arr.shape)})")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        n_nan = int(np.isnan(arr).sum())
        raise HdmapError(f"{path}: contains {n_nan} NaN and {int(bad.sum()) - n_nan} Inf values (of {arr.size} pixels)")
    return arr, stored


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A fault mask as uint8 {0, 1} (any non-zero pixel is fault), which must match the map's shape."""
    path = Path(path)
    arr = _read_raw(path)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.shape != tuple(shape):
        raise HdmapError(f"{path}: mask shape {tuple(arr.shape)} differs from its map's shape {tuple(shape)}")
    return (arr > 0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class MapRecord:
    path: Path
    domain: str
    split: str  # "train" | "test"
    label: int  # 0 good, 1 fault
    mask_path: Path | None
    phase: str  # "cold" | "warm" for test maps, "n/a" for train maps


def folder_phases(n: int) -> list[str]:
    """Recording phase of the n maps of one test folder in file order: the first half cold, the rest warm."""
    return ["cold"] * (n // 2) + ["warm"] * (n - n // 2)


def _natural_key(name: str) -> list[Any]:
    # "2.tiff" before "10.tiff" when names are not zero-padded; zero-padded names sort as usual.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _list_maps(folder: Path) -> list[Path]:
    files = [
        p for p in folder.iterdir() if p.suffix.lower() in MAP_SUFFIXES and not p.name.startswith(".") and p.is_file()
    ]
    for p in files:
        try:  # the manifest (and DVC, MLflow) store paths as UTF-8: a name that is not cannot be recorded
            p.name.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(p).decode("utf-8", "backslashreplace")
            raise HdmapError(f"{shown}: file name is not valid UTF-8; rename the file") from None
    return sorted(files, key=lambda p: _natural_key(p.name))


def _find_mask(domain_dir: Path, stem: str) -> Path | None:
    folder = domain_dir / "ground_truth" / "fault"
    for suffix in (".tiff", ".tif", ".png"):
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _check_domains(root: Path, domains: Sequence[str]) -> list[str]:
    if isinstance(domains, str):
        domains = [domains]
    if not domains:
        raise HdmapError(f"{root}: no domains selected")
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    seen = set()
    for d in domains:
        if not d or d in (".", "..") or "/" in d or "\\" in d or d != d.strip():
            raise HdmapError(
                f"domain {d!r}: not a folder name (domains present in {root}: {', '.join(present) or 'none'})"
            )
        if d in seen:
            raise HdmapError(f"domain {d!r}: listed twice")
        seen.add(d)
        if not (root / d).is_dir():
            raise HdmapError(
                f"{root / d}: domain folder not found (domains present in {root}: {', '.join(present) or 'none'})"
            )
    return sorted(domains)


def scan_root(root: Path, domains: Sequence[str]) -> list[MapRecord]:
    """Every map of the selected domains, sorted by domain name, split (train, then test), label, file name."""
    root = Path(root)
    if not root.exists():
        raise HdmapError(f"{root}: data root not found")
    if not root.is_dir():
        raise HdmapError(f"{root}: data root is not a folder")
    records = []
    for domain in _check_domains(root, domains):
        domain_dir = root / domain
        for split, kind, label in SPLITS:
            folder = domain_dir / split / kind
            if not folder.is_dir():
                raise HdmapError(
                    f"{folder}: split folder not found (each domain needs train/good, test/good and test/fault)"
                )
            files = _list_maps(folder)
            if not files:
                raise HdmapError(f"{folder}: no maps (*.tif, *.tiff, *.png) in this folder")
            phases = folder_phases(len(files)) if split == "test" else ["n/a"] * len(files)
            for f, phase in zip(files, phases):
                mask = _find_mask(domain_dir, f.stem) if label == 1 else None
                records.append(MapRecord(f, domain, split, label, mask, phase))
    return records


# ---------------------------------------------------------------------------------------------- prepare


def _stats(values: np.ndarray) -> dict[str, float]:
    return {"min": float(values.min()), "max": float(values.max()), "mean": float(values.mean(dtype=np.float64))}


def _read_all(records: list[MapRecord], progress: bool) -> tuple[list[np.ndarray], dict[Path, np.ndarray]]:
    """Every map (validated, one common shape) and every fault mask that exists."""
    maps, masks, stored_as = [], {}, {}
    with _progress(len(records), "reading maps", progress) as bar:
        for rec in records:
            m, stored = read_map_stored(rec.path)
            stored_as.setdefault(_storage_kind(stored), []).append(rec.path)
            if maps and m.shape != maps[0].shape:
                raise HdmapError(
                    f"{rec.path}: shape {m.shape} differs from {maps[0].shape} of {records[0].path} "
                    "(all maps must have one shape)"
                )
            if rec.mask_path is not None:
                masks[rec.path] = read_mask(rec.mask_path, m.shape)
            maps.append(m)
            bar.update(1)
    if len(stored_as) > 1:
        # 16-bit maps are divided by 65535 and float maps are taken as stored: mixed, they would not
        # share one scale, and the model would learn the storage type instead of the signal.
        odd_kind = min(stored_as, key=lambda k: len(stored_as[k]))
        counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(stored_as.items()))
        raise HdmapError(
            f"{stored_as[odd_kind][0]}: stored as {odd_kind}, but the dataset mixes storage types "
            f"({counts}); integer maps are rescaled to [0, 1] and float maps are not, so they would "
            "not share one scale: convert the maps to one type"
        )
    return maps, masks


def _storage_kind(dtype_name: str) -> str:
    return "float" if dtype_name.startswith("float") else dtype_name


def _pack_domain(
    folder: Path, items: list[tuple[MapRecord, np.ndarray]], masks: dict[Path, np.ndarray], rows: list[dict]
) -> dict[str, Any]:
    """Write one domain's arrays into `folder`, append its manifest rows, return its summary entry."""
    folder.mkdir()
    parts = {split: [(r, m) for r, m in items if r.split == split] for split in ("train", "test")}
    stats = {}
    for split, part in parts.items():
        packed = np.stack([m for _, m in part])
        np.save(folder / f"{split}.npy", packed)
        stats[split] = _stats(packed)
        for i, (r, m) in enumerate(part):
            rows.append(
                {
                    "domain": r.domain,
                    "split": split,
                    "label": r.label,
                    "index": i,
                    "path": r.path.as_posix(),
                    "height": m.shape[0],
                    "width": m.shape[1],
                    **_stats(m),
                    "phase": r.phase,
                    "mask_path": r.mask_path.as_posix() if r.mask_path is not None else "",
                }
            )
    test = parts["test"]
    labels = np.array([r.label for r, _ in test], dtype=np.int64)
    np.save(folder / "test_labels.npy", labels)
    n_faults = int(labels.sum())
    n_masks = sum(r.path in masks for r, _ in test)
    if n_masks == n_faults:  # masks only when every fault has one; good maps get empty masks
        np.save(folder / "test_masks.npy", np.stack([masks.get(r.path, np.zeros(m.shape, np.uint8)) for r, m in test]))
    return {
        "train": len(parts["train"]),
        "test_good": len(test) - n_faults,
        "test_fault": n_faults,
        "masks": n_masks,
        "n_test_above_1": sum(float(m.max()) > 1.0 for _, m in test),
        **{key: {split: stats[split][key] for split in parts} for key in ("min", "max", "mean")},
    }


def prepare_dataset(root: Path, domains: Sequence[str], out_dir: Path, progress: bool = True) -> pd.DataFrame:
    """Read and validate every map, pack each domain's splits into .npy arrays with a manifest and a
    summary in `out_dir` (replaced atomically: on any error it is left as it was), return the manifest."""
    records = scan_root(Path(root), domains)
    maps, masks = _read_all(records, progress)
    rows: list[dict] = []
    summary: dict[str, Any] = {"root": Path(root).as_posix(), "shape": list(maps[0].shape), "domains": {}}
    with atomic_dir(Path(out_dir)) as tmp:
        for domain in sorted({r.domain for r in records}):
            items = [(r, m) for r, m in zip(records, maps) if r.domain == domain]
            summary["domains"][domain] = _pack_domain(tmp / domain, items, masks, rows)
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        manifest.to_csv(tmp / "manifest.csv", index=False)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return manifest


@contextlib.contextmanager
def _progress(total: int, description: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield _NoProgress()
        return
    from hdmap_ad.core.runtime import progress_iter  # imports torch; only needed when showing progress

    with progress_iter(total, description) as bar:
        yield bar


class _NoProgress:
    def update(self, advance: int = 1, info: str = "") -> None:
        pass


def summary_table(summary: dict) -> Table:
    """Per-domain counts and value ranges of a prepared dataset (its summary.json), for the terminal."""
    h, w = summary["shape"]
    table = Table(
        title=f"prepared HDMAP: {h}×{w} maps",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        collapse_padding=True,
        pad_edge=False,
        show_edge=False,
    )
    for name in (
        "domain",
        "train",
        "test\ngood",
        "test\nfault",
        "masks",
        "train\nmin–max",
        "train\nmean",
        "test\nmin–max",
        "test\nmean",
        "test\n> 1",
    ):
        table.add_column(name, justify="left" if name == "domain" else "right")
    for domain, d in summary["domains"].items():
        masks = (
            "yes" if d["masks"] == d["test_fault"] else ("no" if d["masks"] == 0 else f"{d['masks']}/{d['test_fault']}")
        )
        stats = [
            f"{d[key][split]:.2f}" if key == "mean" else f"{d['min'][split]:.2f}–{d['max'][split]:.2f}"
            for split in ("train", "test")
            for key in ("range", "mean")
        ]
        table.add_row(
            domain, str(d["train"]), str(d["test_good"]), str(d["test_fault"]), masks, *stats, str(d["n_test_above_1"])
        )
    return table


# ---------------------------------------------------------------------------------------------- loading


class PreparedData:
    """The output of `prepare_dataset`: packed arrays per domain and split, and the manifest."""

    def __init__(self, out_dir: Path, manifest: pd.DataFrame, summary: dict) -> None:
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.summary = summary
        self.domains: list[str] = list(summary["domains"])
        self.shape: tuple[int, int] = tuple(summary["shape"])

    @classmethod
    def load(cls, out_dir: Path) -> PreparedData:
        out_dir = Path(out_dir)
        hint = "run `dvc repro prepare` first"
        if not out_dir.is_dir():
            raise HdmapError(f"{out_dir}: prepared data not found; {hint}")
        for name in ("manifest.csv", "summary.json"):
            if not (out_dir / name).is_file():
                raise HdmapError(f"{out_dir}: prepared data incomplete (no {name}); {hint}")
        try:
            summary = json.loads((out_dir / "summary.json").read_text())
            domains, _ = list(summary["domains"]), tuple(summary["shape"])
            manifest = pd.read_csv(
                out_dir / "manifest.csv",
                keep_default_na=False,
                dtype={"path": str, "mask_path": str, "phase": str, "domain": str, "split": str},
            )
        except (ValueError, KeyError, TypeError) as err:
            raise HdmapError(f"{out_dir}: prepared data unreadable ({err}); {hint}") from None
        for d in domains:
            for name in ("train.npy", "test.npy", "test_labels.npy"):
                if not (out_dir / d / name).is_file():
                    raise HdmapError(f"{out_dir}: prepared data incomplete (no {d}/{name}); {hint}")
        return cls(out_dir, manifest, summary)

    def _check(self, domain: str, split: str | None = None) -> None:
        if domain not in self.domains:
            raise HdmapError(
                f"{self.out_dir}: no domain {domain!r} in the prepared data (has {', '.join(self.domains)})"
            )
        if split is not None and split not in ("train", "test"):
            raise HdmapError(f"split {split!r}: expected 'train' or 'test'")

    def maps(self, domain: str, split: str) -> np.ndarray:
        """float32 N×H×W in manifest `index` order; a fresh in-memory array on every call."""
        self._check(domain, split)
        return np.load(self.out_dir / domain / f"{split}.npy")

    def labels(self, domain: str, split: str) -> np.ndarray:
        """int64 labels (0 good, 1 fault); all zeros for train."""
        self._check(domain, split)
        if split == "train":
            return np.zeros(int(self.summary["domains"][domain]["train"]), dtype=np.int64)
        return np.load(self.out_dir / domain / "test_labels.npy")

    def masks(self, domain: str) -> np.ndarray | None:
        """uint8 {0, 1} N×H×W test masks (zeros for good maps), or None when the data has no masks."""
        self._check(domain)
        f = self.out_dir / domain / "test_masks.npy"
        return np.load(f) if f.is_file() else None

    def paths(self, domain: str, split: str) -> list[str]:
        """Source file of each packed row as given to `prepare_dataset` (relative to its working
        folder when the data root was relative)."""
        self._check(domain, split)
        rows = self.manifest[(self.manifest["domain"] == domain) & (self.manifest["split"] == split)]
        return rows.sort_values("index")["path"].astype(str).tolist()

    def data_digest(self) -> str:
        """Fingerprint of the prepared data's content: every packed array (maps, labels, masks) of every
        domain. Where the data came from (its absolute path) does not enter, so the same maps give the
        same digest on every machine, and any changed pixel gives another."""
        h = hashlib.md5()
        for f in sorted(self.out_dir.rglob("*.npy")):
            h.update(f.relative_to(self.out_dir).as_posix().encode() + b"\0")
            h.update(f.read_bytes())
        return h.hexdigest()
