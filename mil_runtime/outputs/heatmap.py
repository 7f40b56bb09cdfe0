"""Attention heatmap: tiles coloured by attention, blended over the slide thumbnail.

The image has the thumbnail's size, and a tile covers the thumbnail pixels its level-0 square maps
onto, so the overlay lines up with the tissue mask and the thumbnail pixel for pixel. Tiles are
coloured by the percentile rank of their attention within the slide, not by its raw value: raw
attention shrinks with the tile count, and min-max scaling lets one dominant tile paint every other
salient region in the lowest colour. Where tiles overlap, their values are averaged.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from mil_runtime.outputs.colormap import apply_colormap

ALPHA = 0.55  # opacity of the colour over tissue: enough to read both the colour and the morphology


def normalise(values: np.ndarray) -> np.ndarray:
    """Percentile rank in [0, 1]: lowest 0, highest 1, ties share their mean rank (all equal: 0.5)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size <= 1:
        return np.full_like(values, 0.5)
    return (rankdata(values) - 1.0) / (values.size - 1)  # (N,)


def tile_boxes(xy_level0: np.ndarray, size_level0: int, scale: tuple[float, float],
               shape: tuple[int, int]) -> np.ndarray:
    """(N, 4) int64 boxes (x0, y0, x1, y1) in thumbnail pixels, at least one pixel each."""
    xy = np.asarray(xy_level0, dtype=np.float64).reshape(-1, 2)
    height, width = shape
    x0 = np.clip(np.floor(xy[:, 0] / scale[0]), 0, width - 1)
    y0 = np.clip(np.floor(xy[:, 1] / scale[1]), 0, height - 1)
    x1 = np.clip(np.ceil((xy[:, 0] + size_level0) / scale[0]), x0 + 1, width)
    y1 = np.clip(np.ceil((xy[:, 1] + size_level0) / scale[1]), y0 + 1, height)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)


def value_map(values: np.ndarray, boxes: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean of the tiles' values (H, W) and a (H, W) bool of pixels any tile covers."""
    total = np.zeros(shape, dtype=np.float64)
    count = np.zeros(shape, dtype=np.int32)
    for value, (x0, y0, x1, y1) in zip(values, boxes):
        total[y0:y1, x0:x1] += value
        count[y0:y1, x0:x1] += 1
    covered = count > 0
    mean = np.divide(total, count, out=np.zeros(shape), where=covered)
    return mean, covered


def attention_heatmap(thumbnail: np.ndarray, scale: tuple[float, float], xy_level0: np.ndarray,
                      size_level0: int, attention: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """RGB uint8 (H, W, 3) of the thumbnail with each tile tinted by its normalised attention."""
    shape = thumbnail.shape[:2]
    boxes = tile_boxes(xy_level0, size_level0, scale, shape)
    mean, covered = value_map(normalise(attention), boxes, shape)
    colours = apply_colormap(mean).astype(np.float64)  # (H, W, 3)
    blended = thumbnail.astype(np.float64)
    blended[covered] = (1.0 - alpha) * blended[covered] + alpha * colours[covered]
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
