"""PatchGCN: graph convolutions over the slide's tile graph, then attention pooling (Chen, Lu, Lipkova,
Wang, Williamson, Mahmood, "Whole Slide Images are 2D Point Clouds: Context-Aware Survival Prediction
using Patch-based Graph Convolutional Networks", MICCAI 2021, arXiv:2107.13048; as torchmil 1.0.2's
`models/patch_gcn.py` builds it)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mil_train.data.graphs import TORCHMIL_GRAPH_RULE
from mil_train.models.base import MILModel, MILOutput
from mil_train.models.registry import register_model
from mil_train.nn import AttentionPool
from mil_train.nn.deep_gcn import DeepGCNLayer
from mil_train.nn.gcn_conv import GCNConv
from mil_train.nn.neighbour_table import NeighbourTable, neighbour_table



@register_model
class PatchGCN(MILModel):
    """n_gcn_layers x DeepGCN (GCNConv -> LayerNorm -> ReLU, "plain") -> MLP over the concatenation of
    the input and every layer's output -> attention pooling -> linear classifier.

    Args:
        in_dim: instance feature dimension D.
        n_classes: 1 for binary (sigmoid), >= 2 for softmax.
        n_gcn_layers: graph convolution layers (torchmil default 4).
        mlp_depth: Linear-ReLU-Dropout layers after the convolutions (>= 1; torchmil's own model fails
            at 0, its pool expecting hidden_dim features).
        hidden_dim: width of every convolution and of the MLP; None = in_dim (torchmil's default).
        att_dim: hidden width of the attention-pooling network.
        dropout: dropout of the DeepGCN layers and the MLP (training only).

    Graph: `edge_index` / `edge_weight` over the flattened (batch * bag) nodes, by default
    `graph_rule` = grid8 with D^-1/2 A D^-1/2 weights (a self loop only on a one-instance bag),
    torchmil's dataset graph.
    Each GCNConv adds the node's own features once more (torchmil's add_self_loops=True). Without
    edge_index the graph is built from `coords` by that rule; with neither, the bag has no edges.

    `attention` is the pooling weights. Linear in N: the edges are sorted once into per-node neighbour
    slots (`mil_train.nn.gcn_conv.NeighbourTable`, O(N * max degree)), and the first MLP layer is
    applied block by block, so the (N, D + n_gcn_layers * hidden) concatenation that torchmil builds
    never exists.
    """

    name = "PatchGCN"
    uses_graph = True
    default_graph_rule = TORCHMIL_GRAPH_RULE  # torchmil's dataset graph (mil_train.data.graphs)
    without_graph = "its graph has no edges and the convolutions see each tile alone"

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        n_gcn_layers: int = 4,
        mlp_depth: int = 1,
        hidden_dim: int | None = None,
        att_dim: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            n_classes=n_classes,
            in_dim=in_dim,
            n_gcn_layers=n_gcn_layers,
            mlp_depth=mlp_depth,
            hidden_dim=hidden_dim,
            att_dim=att_dim,
            dropout=dropout,
        )
        if int(n_gcn_layers) < 0:
            raise ValueError(f"n_gcn_layers must be >= 0, got {n_gcn_layers}")
        if int(mlp_depth) < 1:
            raise ValueError(
                f"mlp_depth must be >= 1, got {mlp_depth} (torchmil's PatchGCN fails at 0: its pool reads "
                "hidden_dim features, not the concatenation)"
            )
        hidden = in_dim if hidden_dim is None else int(hidden_dim)
        self.hidden = hidden
        self.gcn_layers = nn.ModuleList(
            DeepGCNLayer(
                GCNConv(in_dim if i == 0 else hidden, hidden, add_self_loops=True, learn_weights=True),
                nn.LayerNorm(hidden, elementwise_affine=True),
                nn.ReLU(),
                block="plain",
                dropout=dropout,
            )
            for i in range(int(n_gcn_layers))
        )
        concat_dim = in_dim + hidden * int(n_gcn_layers)
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(concat_dim if i == 0 else hidden, hidden), nn.ReLU(), nn.Dropout(dropout))
            for i in range(int(mlp_depth))
        )
        self.pool = AttentionPool(hidden, att_dim)
        self.classifier = nn.Linear(hidden, n_classes)

    def encode(self, X: torch.Tensor, mask: torch.Tensor | None, table: NeighbourTable | None) -> torch.Tensor:
        """Per-instance features the pool reads, (batch, bag, hidden); `table` is the graph (None: no edges).

        Padded rows are cleared before every convolution, so nothing from padding (1e30 included)
        reaches a real node even through an edge that touches padding. The first MLP layer is
        sum_k Linear_k(block_k) over the blocks [X, H_1, ..., H_L] of torchmil's concatenation.
        """
        keep = None if mask is None else mask.unsqueeze(-1)  # (batch, bag, 1)
        H = X if keep is None else torch.where(keep, X, 0.0)  # (batch, bag, in_dim)
        first = self.mlp[0][0]
        width = H.shape[-1]
        Z = nn.functional.linear(H, first.weight[:, :width], first.bias)  # (batch, bag, hidden)
        offset = width
        for layer in self.gcn_layers:
            H = layer(H, table)  # (batch, bag, hidden)
            if keep is not None:
                H = torch.where(keep, H, 0.0)  # (batch, bag, hidden)
            Z = Z + nn.functional.linear(H, first.weight[:, offset:offset + self.hidden])  # (batch, bag, hidden)
            offset += self.hidden
        Z = self.mlp[0][2](self.mlp[0][1](Z))  # ReLU, Dropout
        for layer in self.mlp[1:]:
            Z = layer(Z)  # (batch, bag, hidden)
        return Z

    def forward(
        self,
        X: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        edge_index: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> MILOutput:
        edge_index, edge_weight = self.resolve_graph(edge_index, edge_weight, coords, mask)
        table = None
        if edge_index is not None:  # the edges sorted into neighbour slots once, for every layer
            table = neighbour_table(edge_index, edge_weight, X.shape[0] * X.shape[1], X.dtype)
        H = self.encode(X, mask, table)  # (batch, bag, hidden)
        pooled, attention = self.pool(H, mask)  # (batch, hidden), (batch, bag)
        logits = self.classifier(pooled)  # (batch, n_classes)
        return MILOutput(logits=logits, attention=attention)
