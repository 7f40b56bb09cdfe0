"""Readers for bag files: CLAM/TRIDENT feature .h5, classic MIL CSVs, single arrays in .npy / .h5.

Coordinates in every bag are (y, x) grid units: level-0 pixels // tile stride (DESIGN.md section 2).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import h5py
import numpy as np
from tensordict import TensorDict

from mil_train.data.bag import make_bag

ARRAY_SUFFIXES = (".npy", ".h5")


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (or is not a file); check the path")
    return path


def _single_dataset(h5: h5py.File, preferred: str, path: Path) -> np.ndarray:
    """The dataset named `preferred`, else the file's only dataset."""
    if preferred in h5 and isinstance(h5[preferred], h5py.Dataset):
        return h5[preferred][()]
    datasets = [key for key in h5 if isinstance(h5[key], h5py.Dataset)]
    if len(datasets) != 1:
        raise ValueError(f"{path}: expected a dataset named {preferred!r} or exactly one dataset, found {datasets}")
    return h5[datasets[0]][()]


def load_array(path: str | os.PathLike, key: str = "features") -> np.ndarray:
    """One array from a .npy file (pickles refused) or an .h5 file (dataset `key`, else the only one)."""
    path = _existing(path)
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:  # object arrays need pickle: refused on purpose
            raise ValueError(f"{path}: cannot read without unpickling ({exc}); save plain numeric arrays") from None
    if path.suffix == ".h5":
        with h5py.File(path, "r") as h5:
            return _single_dataset(h5, key, path)
    raise ValueError(f"{path}: unsupported suffix {path.suffix!r}; use one of {ARRAY_SUFFIXES}")


# -- CLAM / TRIDENT ------------------------------------------------------------------------------


def _min_gap(coords_px: np.ndarray) -> int | None:
    """Smallest positive gap between distinct x or y positions: the stride of a regular tile grid."""
    gaps = [int(np.diff(values).min()) for values in map(np.unique, coords_px.T) if values.size > 1]
    return min(gaps) if gaps else None


def _attr_stride(attrs: h5py.AttributeManager) -> int | None:
    """Level-0 stride from the attributes milkit/TRIDENT (`patch_size_level0`) or CLAM
    (`patch_size` read at a level with `downsample`) write; None when they do not say."""
    if attrs.get("stride_level0") is not None:  # milkit's own files, overlapping tiles included
        return int(np.asarray(attrs["stride_level0"]).reshape(-1)[0])
    if attrs.get("patch_size_level0") is not None:
        return int(np.asarray(attrs["patch_size_level0"]).reshape(-1)[0])
    if attrs.get("patch_size") is None:
        return None
    patch_size = float(np.asarray(attrs["patch_size"]).reshape(-1)[0])
    if attrs.get("downsample") is not None:
        downsample = float(np.asarray(attrs["downsample"], dtype=np.float64).reshape(-1)[0])
        return int(round(patch_size * downsample))
    if int(np.asarray(attrs.get("patch_level", 0)).reshape(-1)[0]) == 0:
        return int(patch_size)
    return None


def level0_stride(coords_px: np.ndarray, attrs: h5py.AttributeManager | dict) -> int:
    """Tile stride in level-0 pixels: `patch_size_level0`; else `patch_size * downsample` (CLAM; a
    level-0 read needs no downsample); else the smallest positive coordinate gap. When the attributes'
    stride would put two tiles in one cell (overlapping tiles), the coordinate gap is used."""
    stride = _attr_stride(attrs)
    gap = _min_gap(coords_px)
    if stride is None or (gap is not None and gap < stride):
        stride = gap
    return max(int(stride or 1), 1)


def read_clam_h5(path: str | os.PathLike, label=None) -> TensorDict:
    """A bag from a CLAM/TRIDENT feature file: `features` (N, D) and `coords` (N, 2) level-0 (x, y).

    coords become (y, x) grid units: level-0 pixels // `level0_stride`. `label` (default NaN: unknown)
    becomes Y. A leading batch axis of one, (1, N, D), is dropped as some extractors write it. A file
    with `images` instead of `features` holds a bag of images for a model with a feature extractor:
    uint8 (N, 3, H, W), or (N, H, W, 3) as tiles are (moved to channels first).
    """
    path = _existing(path)
    with h5py.File(path, "r") as h5:
        if "features" not in h5 and "images" in h5:
            features = _images(h5["images"][()], path)  # (N, 3, H, W) uint8
        elif "features" not in h5:
            raise ValueError(f"{path}: no `features` (or `images`) dataset (found {sorted(h5)}); expected a "
                             "CLAM/TRIDENT file")
        else:
            features = h5["features"][()]
            features = features[0] if features.ndim == 3 and features.shape[0] == 1 else features  # (N, D)
        coords = None
        if "coords" in h5:
            coords_px = h5["coords"][()]
            coords_px = coords_px[0] if coords_px.ndim == 3 and coords_px.shape[0] == 1 else coords_px
            if coords_px.shape != (features.shape[0], 2):
                raise ValueError(f"{path}: coords {coords_px.shape} do not match features {features.shape}")
            coords_px = coords_px.astype(np.int64)
            stride = level0_stride(coords_px, h5["coords"].attrs)
            coords = coords_px[:, ::-1] // stride  # (N, 2) (y, x) grid units
    Y = np.float32(np.nan) if label is None else label
    coords = None if coords is None else np.ascontiguousarray(coords)
    X = features if features.ndim == 4 else np.asarray(features, dtype=np.float32)
    return make_bag(X, Y, coords=coords)


def _images(images: np.ndarray, path: Path) -> np.ndarray:
    """An `images` dataset as uint8 (N, 3, H, W); ValueError for anything else."""
    if images.dtype != np.uint8 or images.ndim != 4 or 3 not in (images.shape[1], images.shape[3]):
        raise ValueError(f"{path}: `images` must be uint8 RGB (N, 3, H, W) or (N, H, W, 3), got {images.dtype} "
                         f"{images.shape}")
    if images.shape[1] != 3:
        images = images.transpose(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)
    return np.ascontiguousarray(images)


# -- classic MIL CSV -----------------------------------------------------------------------------


def _cell_name(column: int) -> str:
    return ("label", "bag id")[column] if column < 2 else f"feature (column {column + 1})"


def _column_name(row: np.ndarray) -> str:
    return _cell_name(int(np.flatnonzero(~np.isfinite(row))[0]))


def _first_bad_cell(path: Path) -> str:
    """Where a MIL CSV that np.loadtxt refused goes wrong: line, column and what is there."""
    width = None
    with open(path, newline="") as handle:
        for number, line in enumerate(handle, start=1):
            cells = line.rstrip("\r\n").split(",")
            if not line.strip():
                continue
            if width is not None and len(cells) != width:
                return f"{path} line {number}: {len(cells)} cells, the lines before have {width}; fix the line"
            width = len(cells)
            for column, cell in enumerate(cells):
                try:
                    float(cell)
                except ValueError:
                    what = "empty" if not cell.strip() else f"not a number ({cell.strip()[:20]!r})"
                    return f"{path} line {number}: the {_cell_name(column)} cell is {what}; fill it in or drop the line"
    return f"{path}: not a numeric MIL CSV (label, bag id, features; no header)"


def read_mil_csv(path: str | os.PathLike) -> list[TensorDict]:
    """Bags from a classic MIL CSV (no header; column 0 instance label, column 1 bag id, rest features).

    Bags come in order of first appearance; Y is float 0/1 = whether any instance is positive (label -1
    read as 0); y_inst holds the instance labels as 0/1.
    """
    path = _existing(path)
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError:
        raise ValueError(_first_bad_cell(path)) from None
    if table.shape[1] < 3:
        raise ValueError(f"{path}: {table.shape[1]} columns; expected label, bag id, then features")
    peak = float(np.max(np.abs(table))) if table.size else 0.0  # one reduction: NaN, Inf or too large
    float32_max = float(np.finfo(np.float32).max)
    too_big = np.abs(table[:, 2:]) > float32_max if peak > float32_max else None  # (N, D) located only then
    if np.isfinite(peak) and too_big is not None and too_big.any():
        row = int(np.flatnonzero(too_big.any(axis=1))[0])
        raise ValueError(
            f"{path} line {row + 1} (bag {table[row, 1]:g}): a feature beyond float32's range (+-3.4e38); "
            "rescale the features"
        )
    if not np.isfinite(peak):  # the bad line is located only when the reduction tripped
        row = int(np.flatnonzero(~np.isfinite(table).all(axis=1))[0])
        what = "NaN" if np.isnan(table[row]).any() else "Inf"
        n_bad = int((~np.isfinite(table).all(axis=1)).sum())
        raise ValueError(
            f"{path} line {row + 1} (bag {table[row, 1]:g}): {what} in a {_column_name(table[row])} "
            f"({n_bad} line(s) in all); fix or drop those lines"
        )
    labels = (table[:, 0] > 0).astype(np.int64)  # -1/0 -> 0, 1 -> 1
    bag_ids = table[:, 1]
    _, first = np.unique(bag_ids, return_index=True)
    bags = []
    for bag_id in bag_ids[np.sort(first)]:  # order of first appearance
        rows = bag_ids == bag_id
        y_inst = labels[rows]
        features = table[rows, 2:].astype(np.float32)
        bags.append(make_bag(features, np.float32(y_inst.max()), y_inst=y_inst))
    return bags


# -- label tables (slide_id plus label columns) --------------------------------------------------

SURVIVAL_COLUMNS = ("time", "event")


def read_label_table(path: str | os.PathLike, columns: tuple[str, ...] | list[str], id_column: str = "slide_id",
                     survival: bool = False) -> dict[str, np.ndarray]:
    """{slide stem: float32 (len(columns),) label} from a CSV with a header: `id_column` plus `columns`.

    survival=True: the two columns are time and event (e.g. `SURVIVAL_COLUMNS`), time >= 0 and event
    1 (observed) or 0 (censored), so the label is (time, event). Otherwise (regression) they are the
    targets, any finite numbers. A row with an empty or non-numeric cell is refused with its line
    number; slide ids are reduced to their stem (`a.svs` and `a` both match `a.h5`).
    """
    path = _existing(path)
    columns = list(columns)
    if survival and len(columns) != 2:
        raise ValueError(f"survival labels are two columns, time and event; got {columns}")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in (id_column, *columns) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(missing)} (found {reader.fieldnames}); name the columns "
                             f"{id_column},{','.join(columns)}")
        table: dict[str, np.ndarray] = {}
        for number, row in enumerate(reader, start=2):  # line 1 is the header
            slide = (row.get(id_column) or "").strip()
            if not slide:
                raise ValueError(f"{path} line {number}: the {id_column} cell is empty; fill it in or drop the row")
            table[Path(slide).stem] = _label_row(path, number, row, columns, survival)
    return table


def _label_row(path: Path, number: int, row: dict, columns: list[str], survival: bool) -> np.ndarray:
    values = []
    for column in columns:
        cell = (row.get(column) or "").strip()
        try:
            value = float(cell)
        except ValueError:
            what = "empty" if not cell else f"not a number ({cell[:20]!r})"
            raise ValueError(f"{path} line {number}: the {column} cell is {what}; fill it in or drop the row") from None
        if not np.isfinite(value):
            raise ValueError(f"{path} line {number}: the {column} cell is {cell}; give a finite number")
        values.append(value)
    if survival:
        if len(values) != 2:
            raise ValueError(f"survival labels are two columns, time and event; got {columns}")
        time, event = values
        if time < 0 or event not in (0.0, 1.0):
            raise ValueError(f"{path} line {number}: survival needs time >= 0 and event 0 (censored) or 1 (observed), "
                             f"got time {time:g}, event {event:g}")
    return np.asarray(values, dtype=np.float32)
