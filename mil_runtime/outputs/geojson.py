"""Tiles as a GeoJSON FeatureCollection that QuPath imports (File > Import objects from file).

QuPath reads each Feature's `geometry` in level-0 pixel coordinates (origin top-left, [x, y]), its
object type from `properties.objectType` ("tile" gives tile objects) and numeric measurements from
`properties.measurements` as a {name: number} map (QuPath >= 0.4; older versions read a list). JSON
has no NaN, so non-finite measurements are left out of a tile rather than written as invalid JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def tile_polygon(x: int, y: int, size: int) -> dict:
    """A closed square ring, counter-clockwise in image coordinates (y down), first point repeated."""
    ring = [[x, y], [x, y + size], [x + size, y + size], [x + size, y], [x, y]]
    return {"type": "Polygon", "coordinates": [ring]}


def tiles_feature_collection(xy_level0: np.ndarray, size_level0: int,
                             measurements: Mapping[str, np.ndarray], name: str = "milkit tile") -> dict:
    """FeatureCollection of one Polygon Feature a tile, `measurements[k][i]` attached to tile i."""
    xy = np.asarray(xy_level0, dtype=np.int64).reshape(-1, 2)
    columns = {key: np.asarray(values, dtype=np.float64).reshape(-1) for key, values in measurements.items()}
    features = []
    for i, (x, y) in enumerate(xy.tolist()):
        values = {key: float(column[i]) for key, column in columns.items() if math.isfinite(column[i])}
        features.append({
            "type": "Feature",
            "geometry": tile_polygon(x, y, int(size_level0)),
            "properties": {"objectType": "tile", "name": name, "measurements": values},
        })
    return {"type": "FeatureCollection", "features": features}
