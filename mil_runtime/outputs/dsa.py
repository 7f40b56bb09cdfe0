"""A slide's attention as a Digital Slide Archive (large_image) annotation: `<stem>.dsa.json`.

The document is one large_image annotation, what DSA's annotation API (`POST /annotation?itemId=`)
and HistomicsUI's "Upload annotation" take:

    {"name", "description",
     "attributes": {"provenance": {"milkit_version", "model": {name, sha256, milkit_version},
                                   "encoder": {name, sha256}, "slide": {path, name}, "run": {key}},
                    "prediction": {...}, "probabilities": {...}, "grid": {...}},
     "elements": [{"type": "griddata", "interpretation": "heatmap", "gridWidth", "origin", "dx", "dy",
                   "values", "radius", "scaleWithZoom", "colorRange", "rangeValues", "normalizeRange",
                   "label", "user"}]}

The grid is the tile grid in level-0 px of the slide (DSA draws annotations in base-layer pixels,
origin top-left). large_image places value i at (origin.x + dx * (i % gridWidth),
origin.y + dy * (i // gridWidth)) and draws a heatmap point there, so:
- dx = dy = the tiling stride (level-0 px), and `origin` is the centre of the grid's top-left cell
  (the bounding box of the tiles, not the slide's corner: the grid holds only the rows and columns
  that have tiles);
- values are row-major, `gridWidth` values a row; a tile's value is its attention exactly (the same
  float as its `attention` in `<stem>.json`);
- cells without a tile (no tissue) hold 0, which the colour range draws transparent. Attention is
  a weight >= 0 summing to 1, so 0 is "no weight"; a non-finite attention (never written by the
  runtime's models) is drawn as 0 too and counted in attributes.grid.non_finite_tiles, so the
  document never holds NaN or Infinity (JSON has neither).
- `radius` is the stride with `scaleWithZoom`, so a point covers about its tile at every zoom;
  `normalizeRange` maps the colour range onto 0 .. the map's maximum (viridis, like the PNG heatmap).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mil_runtime.errors import OutputError
from mil_runtime.outputs.jsonable import to_jsonable

if TYPE_CHECKING:  # writer.py imports this module; a runtime import back would be circular
    from mil_runtime.outputs.writer import TileTable

DSA_SUFFIX = ".dsa.json"
EMPTY_VALUE = 0.0  # cells of the grid that have no tile

# viridis (mil_runtime.outputs.colormap's anchors), 0 transparent, then increasingly opaque
_VIRIDIS = [(68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
            (31, 158, 137), (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37)]
COLOR_RANGE = ["rgba(0, 0, 0, 0)"] + [f"rgba({r}, {g}, {b}, {0.5 + 0.05 * i:.2f})"
                                      for i, (r, g, b) in enumerate(_VIRIDIS)]
RANGE_VALUES = [0.0] + [round(0.1 * (i + 1), 2) for i in range(len(_VIRIDIS))]


def _stride(offsets: np.ndarray, size_level0: int, recorded: Any) -> int:
    """The grid spacing: the recorded tiling stride when every tile lies on it, else the tiles' own
    lattice (gcd of their offsets), else (one tile) the tile size."""
    if isinstance(recorded, (int, np.integer)) and recorded > 0 and not (offsets % int(recorded)).any():
        return int(recorded)
    lattice = int(np.gcd.reduce(offsets.ravel())) if offsets.size else 0
    return lattice if lattice > 0 else int(size_level0)


def tile_grid(xy_level0: np.ndarray, size_level0: int, stride_level0: Any = None) -> dict[str, Any]:
    """Where each tile sits on the DSA grid: {"origin_level0" (x, y) of the top-left cell's tile corner,
    "stride", "rows", "cols", "index": (N,) int64 row-major cell of each tile}."""
    xy = np.asarray(xy_level0, dtype=np.int64).reshape(-1, 2)
    if len(xy) == 0:
        raise OutputError("no tiles to draw in the DSA annotation; the slide kept no tile")
    corner = xy.min(axis=0)
    offsets = xy - corner  # (N, 2) >= 0
    stride = _stride(offsets, size_level0, stride_level0)
    cells = offsets // stride  # (N, 2) (col, row)
    cols, rows = int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1
    index = cells[:, 1] * cols + cells[:, 0]
    if len(np.unique(index)) != len(index):
        raise OutputError("two tiles share one cell of the tile grid; the DSA annotation needs one tile a cell")
    return {"origin_level0": (int(corner[0]), int(corner[1])), "stride": stride, "rows": rows, "cols": cols,
            "index": index}


def dsa_annotation(tiles: TileTable, result: dict, *, attention_class: str | None = None,
                   run_key: str | None = None) -> dict:
    """The large_image annotation document of `tiles`' attention (see the module docstring).

    `result`: the slide's result document (mil_runtime.outputs.result; SlideResult.to_dict()).
    `attention_class`: draw that class's map (tiles.attention_by_class) instead of `attention`.
    `run_key`: the set's run key (the record's); default result["output_set"]["run_key"] when present.
    Returns a dict that json.dumps(..., allow_nan=False) writes.
    """
    if attention_class is None:
        weights, map_name = tiles.attention, "attention"
    else:
        if attention_class not in (tiles.attention_by_class or {}):
            raise OutputError(f"no attention map for class {attention_class!r}; the model's per-class maps are "
                              f"{sorted(tiles.attention_by_class or {})}")
        weights, map_name = tiles.attention_by_class[attention_class], f"attention_{attention_class}"
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    xy = np.asarray(tiles.xy_level0, dtype=np.int64).reshape(-1, 2)
    if len(weights) != len(xy):
        raise OutputError(f"{len(weights)} attention values for {len(xy)} tiles; cannot draw the DSA heatmap")
    tiling = result.get("tiling") or {}
    grid = tile_grid(xy, int(tiles.size_level0), tiling.get("stride_level0"))
    finite = np.isfinite(weights)
    values = np.full(grid["rows"] * grid["cols"], EMPTY_VALUE, dtype=np.float64)
    values[grid["index"][finite]] = weights[finite]
    stride, half = grid["stride"], tiles.size_level0 / 2
    x0, y0 = grid["origin_level0"]

    model = result.get("model") or {}
    encoder = result.get("encoder") or {}
    slide = (result.get("input") or {}).get("path")
    if run_key is None:
        run_key = (result.get("output_set") or {}).get("run_key")
    prediction = result.get("prediction") or {}
    slide_name = Path(slide).name if slide else "slide"
    description = f"milkit {map_name} of {model.get('name', 'a MIL model')} on {slide_name}"
    if prediction.get("class_name") is not None:
        probability = prediction.get("probability")
        shown = f" (p={probability:.3f})" if isinstance(probability, float) and math.isfinite(probability) else ""
        description += f"; prediction {prediction['class_name']}{shown}"
    elif isinstance(prediction.get("risk"), (int, float)):  # a survival model
        description += f"; risk {prediction['risk']:.3f}"
    elif isinstance(prediction.get("values"), dict):  # a regression model
        description += "; " + ", ".join(f"{name} {value:.3g}" for name, value in prediction["values"].items()
                                        if isinstance(value, (int, float)))
    element = {
        "type": "griddata",
        "interpretation": "heatmap",
        "gridWidth": grid["cols"],
        "origin": [x0 + half, y0 + half, 0],
        "dx": stride,
        "dy": stride,
        "values": values.tolist(),
        "radius": stride,
        "scaleWithZoom": True,
        "colorRange": list(COLOR_RANGE),
        "rangeValues": list(RANGE_VALUES),
        "normalizeRange": True,
        "label": {"value": map_name},
        "user": {"milkit": {"map": map_name, "empty_value": EMPTY_VALUE}},
    }
    attributes = {
        "provenance": {
            "milkit_version": result.get("milkit_version"),
            "model": {k: model.get(k) for k in ("name", "sha256", "milkit_version")},
            "encoder": {k: encoder.get(k) for k in ("name", "sha256")},
            "slide": {"path": slide, "name": slide_name if slide else None},
            "run": {"key": run_key},
        },
        "map": map_name,
        "prediction": prediction,
        "probabilities": result.get("probabilities") or {},
        "grid": {
            "frame": "level0",
            "tile_level0": int(tiles.size_level0),
            "stride_level0": stride,
            "origin_level0": [x0, y0],
            "rows": grid["rows"],
            "cols": grid["cols"],
            "n_tiles": int(len(xy)),
            "non_finite_tiles": int((~finite).sum()),
        },
    }
    return {
        "name": f"milkit {map_name} ({model.get('name') or 'model'})",
        "description": description,
        "attributes": to_jsonable(attributes),
        "elements": [element],
    }


__all__ = ["DSA_SUFFIX", "dsa_annotation", "tile_grid"]
