"""torchmil's graph convolution (torchmil 1.0.2 `nn/gnns/gcn_conv.py`) over an edge list.

torchmil's GCNConv is not PyG's: it aggregates with the adjacency as given (no degree normalisation
inside the layer, no learned weight before the aggregation), optionally adds each node's own features
once more (an unnormalised self loop), and only then applies the linear map:

    y = x' -> fc -> [l2 normalise] -> [LayerNorm] -> activation -> dropout,   x' = A x [+ x]

with A the graph's weighted adjacency. torchmil computes `A x` as `bmm(adj, x)` on a sparse COO
(batch, bag, bag) tensor; here A is an edge list over the flattened (batch * bag) node space:
A[edge_index[0], edge_index[1]] = edge_weight, so node i sums w_ij x_j over its edges (i, j) (the
convention of `mil_train.interop.torchmil.torchmil_adjacency`; for the symmetric named graph rules
this is also PyG's source-to-target flow).

The sum A x is `mil_train.nn.neighbour_table.aggregate`: a gather over a table of neighbour slots,
built once per graph and shared by every layer (no scatter-add over features).
"""

from __future__ import annotations

import torch
from torch import nn

from mil_train.nn.neighbour_table import NeighbourTable, aggregate



class GCNConv(nn.Module):
    """torchmil's GCNConv with its constructor arguments and defaults.

    Args:
        in_dim: input feature dimension.
        out_dim: output dimension; ignored (= in_dim) unless learn_weights, as in torchmil.
        add_self_loops: add x to A x (an unnormalised self loop of weight 1, on top of any self loops
            the edge list already holds).
        learn_weights: apply Linear(in_dim, out_dim, bias) after the aggregation; else the identity.
        layer_norm: LayerNorm(out_dim) after the linear map (and the l2 normalisation).
        normalize: l2-normalise each node's output (torch.nn.functional.normalize, eps 1e-12).
        dropout: dropout rate of the output.
        activation: module applied after the norm; None = identity (torchmil's default nn.Identity()).
        bias: the linear map's bias.

    forward(x (batch, bag, in_dim), edge_index (2, E), edge_weight (E,) | None) -> (batch, bag, out_dim);
    edge_index may instead be a `NeighbourTable` (`neighbour_table(edge_index, edge_weight, batch * bag)`)
    so that several layers over one graph sort its edges once.
    Parameter names match torchmil's after its LazyLinear wrapper is dropped: `fc.weight`, `fc.bias`,
    `layer_norm.weight`, `layer_norm.bias`.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        add_self_loops: bool = False,
        learn_weights: bool = False,
        layer_norm: bool = False,
        normalize: bool = False,
        dropout: float = 0.0,
        activation: nn.Module | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if out_dim is None or not learn_weights:
            out_dim = in_dim
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.add_self_loops = bool(add_self_loops)
        self.normalize = bool(normalize)
        self.fc = nn.Linear(in_dim, out_dim, bias=bias) if learn_weights else nn.Identity()
        self.layer_norm = nn.LayerNorm(out_dim) if layer_norm else nn.Identity()
        self.activation = activation if activation is not None else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        edge_index: torch.Tensor | NeighbourTable | None,
        edge_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = aggregate(x, edge_index, edge_weight)  # (batch, bag, in_dim)
        if self.add_self_loops:
            y = y + x  # (batch, bag, in_dim)
        y = self.fc(y)  # (batch, bag, out_dim)
        if self.normalize:
            y = nn.functional.normalize(y, p=2.0, dim=-1)  # (batch, bag, out_dim)
        y = self.layer_norm(y)
        y = self.activation(y)
        return self.dropout(y)  # (batch, bag, out_dim)
