"""DeepGCN layer as torchmil 1.0.2 composes it (`nn/gnns/deepgcn.py`, after PyG's DeepGCNLayer and
Li et al., "DeepGCNs: Can GCNs go as deep as CNNs?", ICCV 2019 / "DeeperGCN", arXiv:2006.07739).

One graph convolution with a normalisation, an activation, dropout and a skip connection, chosen by
`block`:

    "res+"   y = conv(dropout(act(norm(x)))) + x            (pre-activation residual)
    "res"    y = dropout(act(norm(conv(x))) + x)
    "dense"  y = dropout(cat([x, act(norm(conv(x)))], -1))
    "plain"  y = dropout(act(norm(conv(x))))                 (no skip; PatchGCN's choice)

The graph is an edge list over the flattened (batch * bag) nodes (or the `NeighbourTable` built from
it, see `mil_train.nn.gcn_conv`), passed through to the convolution unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

BLOCKS = ("res+", "res", "dense", "plain")


class DeepGCNLayer(nn.Module):
    """torchmil's DeepGCNLayer with its arguments and defaults.

    Args:
        conv: a graph convolution called as conv(x, edge_index, edge_weight) (e.g. GCNConv); None = the
            identity, which ignores the graph (torchmil's GNNIdentity).
        norm: normalisation module (e.g. LayerNorm); None = identity.
        act: activation module; None = identity.
        block: "res+", "res", "dense" or "plain" (see the module docstring). torchmil treats any other
            string as "plain"; here it is an error.
        dropout: dropout rate.

    forward(x (batch, bag, dim), edge_index (2, E), edge_weight (E,) | None) -> (batch, bag, out):
    out = the conv's width, or dim + that width for "dense". Parameter names follow torchmil's
    (`conv.`, `norm.`).
    """

    def __init__(
        self,
        conv: nn.Module | None = None,
        norm: nn.Module | None = None,
        act: nn.Module | None = None,
        block: str = "plain",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
        self.conv = conv
        self.norm = norm if norm is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.block = block

    def _convolve(self, x: torch.Tensor, edge_index: torch.Tensor | None, edge_weight: torch.Tensor | None):
        return x if self.conv is None else self.conv(x, edge_index, edge_weight)

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor | None, edge_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.block == "res+":
            y = self.dropout(self.act(self.norm(x)))  # (batch, bag, dim)
            return self._convolve(y, edge_index, edge_weight) + x  # (batch, bag, dim)
        y = self.act(self.norm(self._convolve(x, edge_index, edge_weight)))  # (batch, bag, out)
        if self.block == "res":
            y = y + x  # (batch, bag, dim)
        elif self.block == "dense":
            y = torch.cat([x, y], dim=-1)  # (batch, bag, dim + out)
        return self.dropout(y)
