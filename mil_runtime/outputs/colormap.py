"""A perceptually uniform colour map as a 256-entry lookup table, without matplotlib.

The anchors are viridis sampled at ten even steps; linear interpolation between them is visually
indistinguishable from the full map at heatmap scale.
"""

from __future__ import annotations

import numpy as np

_VIRIDIS_ANCHORS = np.array([
    [68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
    [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37],
], dtype=np.float64)  # (10, 3)


def viridis_lut(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 RGB colours from dark purple (0) to yellow (1)."""
    stops = np.linspace(0.0, 1.0, len(_VIRIDIS_ANCHORS))
    positions = np.linspace(0.0, 1.0, n)
    channels = [np.interp(positions, stops, _VIRIDIS_ANCHORS[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=1)).astype(np.uint8)  # (n, 3)


def apply_colormap(values: np.ndarray, lut: np.ndarray | None = None) -> np.ndarray:
    """Colours (..., 3) uint8 for values in [0, 1] (clipped)."""
    lut = viridis_lut() if lut is None else lut
    index = np.rint(np.clip(values, 0.0, 1.0) * (len(lut) - 1)).astype(np.int64)
    return lut[index]
