"""The tiles CSV: one row a tile, level-0 geometry, grid position, tissue fraction and attention."""

from __future__ import annotations

import csv
from typing import IO

import numpy as np

COLUMNS = ("x", "y", "width", "height", "row", "col", "tissue_fraction", "attention")


def write_tiles_csv(handle: IO[str], xy_level0: np.ndarray, size_level0: int, grid_yx: np.ndarray,
                    tissue_fraction: np.ndarray, attention: np.ndarray) -> None:
    """Write the header and one row a tile to an open text file."""
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(COLUMNS)
    for (x, y), (row, col), tissue, weight in zip(
        np.asarray(xy_level0).tolist(), np.asarray(grid_yx).tolist(),
        np.asarray(tissue_fraction, dtype=np.float64).tolist(), np.asarray(attention, dtype=np.float64).tolist(),
    ):
        writer.writerow([x, y, size_level0, size_level0, row, col, f"{tissue:.4f}", f"{weight:.8g}"])
