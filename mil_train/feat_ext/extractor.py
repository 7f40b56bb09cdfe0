"""`FeatureExtractor`: a backbone with the normalisation its exported encoder runs inside the graph."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureExtractor(nn.Module):
    """(n, 3, input_px, input_px) float images in [0, 1] -> (n, output_dim) features.

    The same arithmetic as mil_export.encoders.TileEncoder after its uint8 -> [0, 1] step (whose resize
    is an identity at input_px), so the exported encoder computes what training computed.
    `spec` is the registered name and JSON config the extractor was built from (None: unregistered).
    """

    def __init__(self, backbone: nn.Module, output_dim: int, input_px: int,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.backbone = backbone
        self.output_dim, self.input_px = int(output_dim), int(input_px)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.spec: dict[str, Any] | None = None

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return (3, self.input_px, self.input_px)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(self.mean.dtype) - self.mean) / self.std  # (n, 3, px, px)
        return self.backbone(x).flatten(1)  # (n, output_dim)

    def to_tile_encoder(self):
        """The exportable encoder (uint8 NHWC tiles in) sharing this extractor's weights."""
        from mil_export.encoders import TileEncoder

        return TileEncoder(self.backbone, self.output_dim, self.input_px,
                           tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist()))
