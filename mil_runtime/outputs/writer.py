"""Writing one slide's outputs as a set: all files appear together, or none do.

Every file is staged as a hidden temporary in the output folder and renamed only after all of them
were written (mil_runtime.atomic), so an error half-way (disk full, a bad value) leaves no partial
or orphan files behind.

Models with one attention map per class (`Prediction.attention_by_class`) add a heatmap per class,
`<stem>.heatmap.<class>.png` (the class name made safe for file names, `class_file_labels`), and
`attention_<class>` columns / measurements (the class name as it is) to the CSV and the GeoJSON;
`<stem>.heatmap.png` and `attention` stay the model's `attention`, the predicted class's map.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mil_runtime.atomic import atomic_output_dir
from mil_runtime.features_io import write_feature_file
from mil_runtime.outputs.geojson import tiles_feature_collection
from mil_runtime.outputs.heatmap import attention_heatmap
from mil_runtime.outputs.tables import write_tiles_csv

SUFFIXES = {
    "result": ".json",
    "heatmap": ".heatmap.png",
    "tissue_mask": ".tissue.png",
    "geojson": ".tiles.geojson",
    "tiles_csv": ".tiles.csv",
    "features": ".features.h5",
}


CLASS_HEATMAP_KIND = "heatmap."  # + class name: the kind of a per-class heatmap in output_paths
MAX_LABEL_CHARS = 64  # a class's part of a file name; long names are cut (file names stop at 255 bytes)


def class_file_labels(class_names: Sequence[str]) -> dict[str, str]:
    """{class name: its label in file names}: characters other than A-Z a-z 0-9 . _ - become "_".

    Labels are unique even on case-insensitive filesystems: one that would clash with an earlier
    class's ("a/b" after "a_b", "Tumor" after "tumor") gets "_<class index>" appended.
    """
    labels: dict[str, str] = {}
    taken: set[str] = set()
    for index, name in enumerate(class_names):
        label = re.sub(r"[^A-Za-z0-9._-]", "_", str(name))[:MAX_LABEL_CHARS] or f"class_{index}"
        while label.casefold() in taken:
            label = f"{label}_{index}"
        taken.add(label.casefold())
        labels[name] = label
    return labels


def output_paths(out_dir: str | os.PathLike, stem: str, class_names: Sequence[str] = ()) -> dict[str, Path]:
    """Where each output of slide `stem` goes in `out_dir`.

    `class_names`: the classes of a model with per-class attention; each adds the kind
    "heatmap.<class name>" at `<stem>.heatmap.<label>.png` (label from `class_file_labels`).
    """
    paths = {kind: Path(out_dir) / f"{stem}{suffix}" for kind, suffix in SUFFIXES.items()}
    for name, label in class_file_labels(class_names).items():
        paths[CLASS_HEATMAP_KIND + name] = Path(out_dir) / f"{stem}.heatmap.{label}.png"
    return paths


def to_jsonable(value: Any) -> Any:
    """numpy scalars/arrays and Paths to plain JSON values; non-finite floats to None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class TileTable:
    """What the tile outputs need: geometry, grid position, tissue fraction, attention (all (N,) aligned)."""

    xy_level0: np.ndarray  # (N, 2) int64 (x, y) top-left, level-0 px
    size_level0: int
    grid_yx: np.ndarray  # (N, 2) int64 (row, col)
    tissue_fraction: np.ndarray  # (N,)
    attention: np.ndarray  # (N,)
    attention_by_class: Mapping[str, np.ndarray] | None = None  # {class name: (N,)}, multi-branch models

    @property
    def class_names(self) -> list[str]:
        """Classes with their own attention map ([] for single-map models)."""
        return list(self.attention_by_class or {})

    def measurements(self) -> dict[str, np.ndarray]:
        """Per-tile numbers of the GeoJSON: attention, tissue fraction, attention_<class> per class."""
        values = {"attention": self.attention, "tissue_fraction": self.tissue_fraction}
        for name, weights in (self.attention_by_class or {}).items():
            values[f"attention_{name}"] = weights
        return values


def _save_png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path, format="PNG")


def write_slide_outputs(
    out_dir: str | os.PathLike,
    stem: str,
    result: dict | Callable[[], dict],
    tiles: TileTable,
    thumbnail: np.ndarray,
    mask: np.ndarray,
    scale: tuple[float, float],
    features: dict | None = None,
) -> dict[str, Path]:
    """Write JSON, heatmap(s), tissue mask, GeoJSON, tiles CSV and (when `features` is given) the .h5.

    With `tiles.attention_by_class`, one more heatmap per class (see the module docstring).
    `features` holds the keyword arguments of features_io.write_feature_file except the path.
    `result` may be a callable, called after the other files are staged (so it can time them).
    Returns {kind: final path} of the files written.
    """
    paths = output_paths(out_dir, stem, tiles.class_names)
    kinds = [k for k in paths if k != "features" or features is not None]
    with atomic_output_dir(out_dir) as staged:
        temp = {kind: staged.path(paths[kind].name) for kind in kinds}

        def save_heatmap(kind: str, attention: np.ndarray) -> None:
            pixels = attention_heatmap(thumbnail, scale, tiles.xy_level0, tiles.size_level0, attention)
            _save_png(temp[kind], pixels)

        save_heatmap("heatmap", tiles.attention)
        for name, weights in (tiles.attention_by_class or {}).items():
            save_heatmap(CLASS_HEATMAP_KIND + name, weights)
        _save_png(temp["tissue_mask"], np.where(mask, 255, 0).astype(np.uint8))
        collection = tiles_feature_collection(tiles.xy_level0, tiles.size_level0, tiles.measurements())
        with open(temp["geojson"], "w", encoding="utf-8") as handle:
            json.dump(collection, handle, allow_nan=False)
        with open(temp["tiles_csv"], "w", encoding="utf-8", newline="") as handle:
            write_tiles_csv(handle, tiles.xy_level0, tiles.size_level0, tiles.grid_yx,
                            tiles.tissue_fraction, tiles.attention, tiles.attention_by_class)
        if features is not None:
            write_feature_file(temp["features"], **features)
        result = result() if callable(result) else result
        with open(temp["result"], "w", encoding="utf-8") as handle:
            json.dump(to_jsonable(result), handle, indent=2, allow_nan=False)
            handle.write("\n")
    return {kind: paths[kind] for kind in kinds}
