"""Per-instance embedding MLP."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def instance_mlp(in_dim: int, hidden_dims: Sequence[int], dropout: float = 0.0) -> tuple[nn.Module, int]:
    """Linear -> ReLU -> Dropout for each width in `hidden_dims`; returns (module, output dim).

    An empty `hidden_dims` gives the identity, so the model pools the input features themselves.
    """
    layers: list[nn.Module] = []
    dim = in_dim
    for width in hidden_dims:
        layers += [nn.Linear(dim, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        dim = width
    return (nn.Sequential(*layers) if layers else nn.Identity()), dim
