"""`SmallCNN`: a few 3x3 convolutions and a global average pool, sized for small images (8x8 digits up)."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """(n, 3, H, W) -> (n, out_dim): conv-ReLU blocks (a 2x2 max pool after each but the last), global
    average pool, then a linear map to out_dim. Two blocks keep an 8x8 digit at 4x4 before the pool."""

    def __init__(self, widths: tuple[int, ...] = (16, 32), out_dim: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU()]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_ch, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)  # (n, widths[-1])
        return torch.relu(self.head(x))  # (n, out_dim)
