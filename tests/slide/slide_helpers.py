"""Helpers of the slide tests: a numpy mock encoder and MIL model, and the shared-data skip helper.

A uniquely named module (not `conftest`), so that importing it works whatever other conftest files
pytest loaded first.

The mocks have the interfaces of mil_runtime.encoder.TileEncoderRunner and mil_runtime.model.MILRunner
without ONNX files, so these tests check slide handling alone. The mock encoder's features are each
tile's mean RGB and its darkness, which gives tests an independent handle on what a tile contains.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from mil_runtime.contract import ModelMetadata, Tiling
from mil_runtime.model import Prediction

_ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
_spec = importlib.util.spec_from_file_location("_milkit_tests_root_conftest", _ROOT_CONFTEST)
_root = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root)
shared_file = _root.shared_file  # skips the test when ../shared/data lacks the file


class MeanColourEncoder:
    """Features of a tile: mean R, G, B in [0, 1] and darkness 1 - mean brightness: (B, 4)."""

    name = "mean-colour"
    output_dim = 4
    sha256 = "0" * 64
    path = Path("mean-colour.onnx")
    device = "cpu"

    def __init__(self) -> None:
        self.calls = 0
        self.shapes: list[tuple[int, ...]] = []

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        assert tiles.dtype == np.uint8 and tiles.ndim == 4 and tiles.shape[-1] == 3
        self.calls += 1
        self.shapes.append(tiles.shape)
        mean = tiles.reshape(len(tiles), -1, 3).mean(axis=1) / 255.0  # (B, 3)
        return np.concatenate([mean, 1.0 - mean.mean(axis=1, keepdims=True)], axis=1).astype(np.float32)


class DarknessModel:
    """A binary 'MIL model': attention = softmax of darkness, probability = attention-weighted darkness."""

    device = "cpu"
    sha256 = "1" * 64
    path = Path("darkness.onnx")

    def __init__(self, tile_px: int = 224, mpp: float = 0.5, overlap: float = 0.0) -> None:
        self.metadata = ModelMetadata(
            kind="mil", model_name="Darkness", feature_dim=4, inputs=["features", "mask"], n_classes=1,
            class_names=["negative", "positive"], activation="sigmoid",
            tiling=Tiling(tile_px=tile_px, mpp=mpp, overlap=overlap),
        )
        self.seen_coords: np.ndarray | None = None

    def predict(self, features: np.ndarray, coords: np.ndarray | None = None, *, source: str = "") -> Prediction:
        self.seen_coords = coords
        darkness = features[:, 3].astype(np.float64)  # (N,)
        weights = np.exp(20.0 * (darkness - darkness.max()))
        attention = weights / weights.sum()  # (N,)
        positive = float(np.clip((attention * darkness).sum(), 0.0, 1.0))
        return Prediction(
            logits=np.array([positive], dtype=np.float32), probabilities=np.array([positive], dtype=np.float32),
            class_probabilities=np.array([1 - positive, positive], dtype=np.float32),
            class_names=["negative", "positive"], predicted_index=int(positive >= 0.5),
            attention=attention.astype(np.float32),
        )
