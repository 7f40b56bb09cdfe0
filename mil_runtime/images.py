"""`predict_images`: a MIL model and its encoder on one bag of instance images, no slide involved."""

from __future__ import annotations

import numpy as np

from mil_runtime.encoder import TileEncoderRunner, check_encoder_matches
from mil_runtime.errors import InvalidInputError
from mil_runtime.model import MILRunner, Prediction


def predict_images(model: MILRunner, encoder: TileEncoderRunner, images: np.ndarray,
                   coords: np.ndarray | None = None, *, batch_size: int = 256) -> Prediction:
    """Predict one bag of images, uint8 (N, H, W, 3) RGB as tiles are: the encoder's features of each
    image (`batch_size` at a time), then the model. The encoder must be the model's own (name, width,
    sha256: a ContractMismatchError otherwise). `coords` (N, 2) for graph and spatial models."""
    check_encoder_matches(model.metadata, encoder)
    if not isinstance(images, np.ndarray) or images.ndim != 4 or len(images) == 0:
        shape = getattr(images, "shape", None)
        raise InvalidInputError(f"images must be a non-empty uint8 array (N, H, W, 3), got shape {shape}")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    features = np.concatenate([encoder.encode(images[start:start + batch_size])
                               for start in range(0, len(images), batch_size)])  # (N, D)
    return model.predict(features, coords, source="images")
