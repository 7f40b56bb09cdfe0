"""Helpers for the runtime tests: small exported ABMIL models and feature files.

Tests may import torch / mil_train / mil_export to make models; mil_runtime itself never does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mil_runtime.features_io import write_feature_file

FEATURE_DIM = 16
TILE_PX = 256


def export(model, path: Path, class_names=None) -> Path:
    """The project's exporter (torch.export with symbolic batch/bag axes, then ONNX + milkit metadata)."""
    from mil_export import export_onnx

    return export_onnx(model, path, class_names=class_names)


def abmil(n_classes: int, seed: int, in_dim: int = FEATURE_DIM):
    import torch

    from mil_train.models import create_model

    torch.manual_seed(seed)
    return create_model("ABMIL", in_dim=in_dim, n_classes=n_classes, att_dim=8, gated=True).eval()


def grid_coords_px(n: int, tile_px: int = TILE_PX, width: int = 5) -> np.ndarray:
    """(n, 2) level-0 (x, y) corners of a row-major grid `width` tiles wide."""
    index = np.arange(n)
    return np.stack([(index % width) * tile_px, (index // width) * tile_px], axis=1).astype(np.int64)


def make_feature_file(path: Path, features: np.ndarray, **attrs) -> Path:
    return write_feature_file(path, features, grid_coords_px(len(features)), TILE_PX, mpp=0.5, **attrs)
