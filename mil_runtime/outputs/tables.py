"""The tiles CSV: one row a tile, level-0 geometry, grid position, tissue fraction and attention.

Models with one attention map per class add a column `attention_<class name>` per class, after
`attention` (which stays the model's `attention`, the predicted class's map); models with an instance
classifier then add `prob_<class name>` per class (the instance's probability of that class).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from typing import IO

import numpy as np

COLUMNS = ("x", "y", "width", "height", "row", "col", "tissue_fraction", "attention")


def class_columns(class_names) -> list[str]:
    """The per-class attention columns, `attention_<class name>`, in class order."""
    return [f"attention_{name}" for name in class_names]


def write_tiles_csv(handle: IO[str], xy_level0: np.ndarray, size_level0: int, grid_yx: np.ndarray,
                    tissue_fraction: np.ndarray, attention: np.ndarray,
                    attention_by_class: Mapping[str, np.ndarray] | None = None,
                    instance_probabilities: Mapping[str, np.ndarray] | None = None) -> None:
    """Write the header and one row a tile to an open text file.

    attention_by_class: {class name: (N,)} for models with per-class maps, else None.
    instance_probabilities: {class name: (N,)} for models with an instance classifier, else None.
    """
    by_class = attention_by_class or {}
    probabilities = instance_probabilities or {}
    per_class = np.asarray([np.asarray(w, dtype=np.float64) for w in (*by_class.values(), *probabilities.values())])
    per_class = per_class.reshape(len(by_class) + len(probabilities), len(attention))  # (extra columns, N)
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow([*COLUMNS, *class_columns(by_class), *(f"prob_{name}" for name in probabilities)])
    for i, ((x, y), (row, col), tissue, weight) in enumerate(zip(
        np.asarray(xy_level0).tolist(), np.asarray(grid_yx).tolist(),
        np.asarray(tissue_fraction, dtype=np.float64).tolist(), np.asarray(attention, dtype=np.float64).tolist(),
    )):
        extra = [f"{value:.8g}" for value in per_class[:, i].tolist()]
        writer.writerow([x, y, size_level0, size_level0, row, col, f"{tissue:.4f}", f"{weight:.8g}", *extra])
