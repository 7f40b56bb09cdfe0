"""Tiles as a GeoJSON FeatureCollection that QuPath imports (File > Import objects from file).

QuPath reads each Feature's `geometry` in its image frame (pixels, origin top-left, [x, y]), its object
type from `properties.objectType` ("tile" gives tile objects, which QuPath's measurement maps colour)
and numeric measurements from `properties.measurements` as a {name: number} map (QuPath >= 0.4).
QuPath's image frame is OpenSlide's level 0 cropped to `openslide.bounds-x/y` (MIRAX, some NDPI), so
the default frame subtracts the bounds offset; `frame="level0"` keeps OpenSlide's coordinates.

Every tile has a UUID `id`, stable for the same model, slide and tile (uuid5), and measurements:
attention, attention_rank (1 = the most attended tile), attention_percentile (0-1, the heatmap's
colour scale), tissue_fraction, attention_<class> for per-class maps and prob_<class> for instance
classifiers. One annotation Feature around all tiles carries the slide-level prediction, its
classification and its class probabilities. JSON has no NaN, so non-finite measurements are left out
of a feature rather than written as invalid JSON.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping

import numpy as np
from scipy.stats import rankdata

from mil_runtime.outputs.heatmap import normalise

TILE_NAME = "milkit tile"


def tile_polygon(x: int, y: int, size: int) -> dict:
    """A closed square ring, counter-clockwise in image coordinates (y down), first point repeated."""
    return box_polygon(x, y, x + size, y + size)


def box_polygon(x0: int, y0: int, x1: int, y1: int) -> dict:
    ring = [[x0, y0], [x0, y1], [x1, y1], [x1, y0], [x0, y0]]
    return {"type": "Polygon", "coordinates": [ring]}


def attention_ranks(attention: np.ndarray) -> np.ndarray:
    """1 for the most attended tile, N for the least; ties share the best rank among them."""
    return rankdata(-np.asarray(attention, dtype=np.float64), method="min").astype(np.int64)  # (N,)


def tile_measurements(attention: np.ndarray, extra: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{name: (N,)} in QuPath's column order: attention, its rank and percentile, then `extra`."""
    return {"attention": np.asarray(attention, dtype=np.float64), "attention_rank": attention_ranks(attention),
            "attention_percentile": normalise(attention), **extra}


def _finite(values: Mapping[str, float]) -> dict[str, float]:
    return {key: value for key, value in values.items() if math.isfinite(value)}


def prediction_feature(xy: np.ndarray, size: int, prediction: Mapping, name: str) -> dict:
    """One annotation around the tiles' extent holding the slide-level prediction and probabilities."""
    x0, y0 = xy.min(axis=0).tolist() if len(xy) else (0, 0)
    x1, y1 = (xy.max(axis=0) + size).tolist() if len(xy) else (size, size)
    probabilities = {f"prob_{k}": float(v) for k, v in (prediction.get("probabilities") or {}).items()}
    probabilities.update({k: float(v) for k, v in (prediction.get("measurements") or {}).items()})  # risk, value_<t>
    return {
        "type": "Feature",
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"milkit:{name}:prediction")),
        "geometry": box_polygon(int(x0), int(y0), int(x1), int(y1)),
        "properties": {
            "objectType": "annotation",
            "name": f"milkit prediction: {prediction.get('class_name')}",
            "classification": {"name": str(prediction.get("class_name"))},
            "isLocked": True,
            "measurements": _finite(probabilities),
            "metadata": {key: str(value) for key, value in (prediction.get("metadata") or {}).items()},
        },
    }


def tiles_feature_collection(xy_level0: np.ndarray, size_level0: int, measurements: Mapping[str, np.ndarray],
                             *, offset: tuple[int, int] = (0, 0), identity: str = "",
                             prediction: Mapping | None = None, name: str = TILE_NAME) -> dict:
    """FeatureCollection of one Polygon Feature a tile, `measurements[k][i]` attached to tile i.

    offset: subtracted from level-0 px (the slide's bounds, for QuPath's frame).
    identity: what makes tile ids unique to this result (model sha256 and slide), hashed into uuid5.
    prediction: {"class_name", "probabilities": {class: p}, "metadata": {...}} adds the annotation
    (regression / survival: "measurements" {risk or value_<target>: value}, unprefixed).
    """
    xy = np.asarray(xy_level0, dtype=np.int64).reshape(-1, 2) - np.asarray(offset, dtype=np.int64)  # (N, 2)
    columns = {key: np.asarray(values, dtype=np.float64).reshape(-1) for key, values in measurements.items()}
    integer = {key for key, values in measurements.items() if np.asarray(values).dtype.kind in "iu"}
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"milkit:{identity}")
    features = []
    for i, (x, y) in enumerate(xy.tolist()):
        values = {key: int(column[i]) if key in integer else float(column[i])
                  for key, column in columns.items() if math.isfinite(column[i])}
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(namespace, f"{x},{y}")),
            "geometry": tile_polygon(x, y, int(size_level0)),
            "properties": {"objectType": "tile", "name": name, "measurements": values},
        })
    if prediction is not None:
        features.append(prediction_feature(xy, int(size_level0), prediction, identity))
    return {"type": "FeatureCollection", "features": features}
