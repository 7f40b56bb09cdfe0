"""Writing one slide's outputs as a set: all files appear together, or none do.

Every file is staged as a hidden temporary in the output folder and renamed only after all of them
were written (mil_runtime.atomic), so an error half-way (disk full, a bad value) leaves no partial
or orphan files behind.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
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


def output_paths(out_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """Where each output of slide `stem` goes in `out_dir`."""
    return {kind: Path(out_dir) / f"{stem}{suffix}" for kind, suffix in SUFFIXES.items()}


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
    """Write JSON, heatmap, tissue mask, GeoJSON, tiles CSV and (when `features` is given) the .h5.

    `features` holds the keyword arguments of features_io.write_feature_file except the path.
    `result` may be a callable, called after the other files are staged (so it can time them).
    Returns {kind: final path} of the files written.
    """
    paths = output_paths(out_dir, stem)
    kinds = [k for k in SUFFIXES if k != "features" or features is not None]
    with atomic_output_dir(out_dir) as staged:
        temp = {kind: staged.path(paths[kind].name) for kind in kinds}
        heatmap = attention_heatmap(thumbnail, scale, tiles.xy_level0, tiles.size_level0, tiles.attention)
        _save_png(temp["heatmap"], heatmap)
        _save_png(temp["tissue_mask"], np.where(mask, 255, 0).astype(np.uint8))
        collection = tiles_feature_collection(
            tiles.xy_level0, tiles.size_level0,
            {"attention": tiles.attention, "tissue_fraction": tiles.tissue_fraction},
        )
        with open(temp["geojson"], "w", encoding="utf-8") as handle:
            json.dump(collection, handle, allow_nan=False)
        with open(temp["tiles_csv"], "w", encoding="utf-8", newline="") as handle:
            write_tiles_csv(handle, tiles.xy_level0, tiles.size_level0, tiles.grid_yx,
                            tiles.tissue_fraction, tiles.attention)
        if features is not None:
            write_feature_file(temp["features"], **features)
        result = result() if callable(result) else result
        with open(temp["result"], "w", encoding="utf-8") as handle:
            json.dump(to_jsonable(result), handle, indent=2, allow_nan=False)
            handle.write("\n")
    return {kind: paths[kind] for kind in kinds}
