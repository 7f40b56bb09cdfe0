"""Helpers for the runtime tests: small exported ABMIL models and feature files.

Models are exported once per session with `mil_export.export_onnx` when it exists, else with the
documented two-step path (torch.export.export with dynamic batch/bag axes, then torch.onnx.export of
that program) plus milkit metadata, so these tests do not wait for the exporter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mil_runtime.features_io import write_feature_file

FEATURE_DIM = 16
TILE_PX = 256


def _export_by_hand(model, path: Path, class_names):
    """torch.export -> ONNX with symbolic batch/bag axes, then milkit metadata_props."""
    import onnx
    import torch
    from torch.export import Dim

    from mil_runtime._version import __version__
    from mil_runtime.contract import ModelMetadata

    class Wrapper(torch.nn.Module):
        def __init__(self, mil):
            super().__init__()
            self.mil = mil

        def forward(self, features, mask):
            out = self.mil(features, mask)
            return out.logits, self.mil.probabilities(out.logits), out.attention

    wrapper = Wrapper(model).eval()
    example = (torch.randn(2, 7, FEATURE_DIM), torch.ones(2, 7, dtype=torch.bool))
    batch, bag = Dim("batch"), Dim("bag")
    program = torch.export.export(wrapper, example, dynamic_shapes=({0: batch, 1: bag}, {0: batch, 1: bag}))
    torch.onnx.export(
        program,
        example,
        str(path),
        dynamo=True,
        input_names=["features", "mask"],
        output_names=["logits", "probabilities", "attention"],
    )
    meta = ModelMetadata(
        kind="mil",
        model_name=model.name,
        model_config=model.config,
        feature_dim=FEATURE_DIM,
        inputs=["features", "mask"],
        n_classes=model.n_classes,
        class_names=class_names,
        activation="sigmoid" if model.n_classes == 1 else "softmax",
        version=__version__,
    )
    proto = onnx.load(str(path))  # loads any external weights torch wrote beside the file
    for key, value in meta.to_props().items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))  # one self-contained file: the weights go inline
    Path(str(path) + ".data").unlink(missing_ok=True)


def export(model, path: Path, class_names=None) -> Path:
    try:
        from mil_export import export_onnx
    except ImportError:
        _export_by_hand(model, path, class_names)
    else:
        export_onnx(model, path, class_names=class_names)
    return path


def abmil(n_classes: int, seed: int):
    import torch

    from mil_train.models import create_model

    torch.manual_seed(seed)
    return create_model("ABMIL", in_dim=FEATURE_DIM, n_classes=n_classes, att_dim=8, gated=True).eval()


def grid_coords_px(n: int, tile_px: int = TILE_PX, width: int = 5) -> np.ndarray:
    """(n, 2) level-0 (x, y) corners of a row-major grid `width` tiles wide."""
    index = np.arange(n)
    return np.stack([(index % width) * tile_px, (index // width) * tile_px], axis=1).astype(np.int64)


def make_feature_file(path: Path, features: np.ndarray, **attrs) -> Path:
    return write_feature_file(path, features, grid_coords_px(len(features)), TILE_PX, mpp=0.5, **attrs)
