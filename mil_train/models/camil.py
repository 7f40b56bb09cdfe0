"""CAMIL: Context-Aware Multiple Instance Learning (Fourkioti, De Vries, Bakal, "CAMIL: Context-Aware
Multiple Instance Learning for Cancer Detection and Subtyping in Whole Slide Images", ICLR 2024,
arXiv:2305.05314), as torchmil 1.0.2's `torchmil.models.CAMIL` defines it.

Global context from one Nystrom transformer layer, local context from attention constrained to each
tile's graph neighbours (computed over the edge list, O(E) memory), a sigmoid gate fusing the two,
and an attention pool whose weights are scored on the global features but pool the fused ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mil_train.data.graphs import TORCHMIL_GRAPH_RULE
from mil_train.models.base import MILModel, MILOutput, masked_softmax
from mil_train.models.registry import register_model
from mil_train.nn.attention_pool import AttentionPool
from mil_train.nn.neighbour_attention import NeighbourAttention
from mil_train.nn.nystrom_attention import NystromTransformerLayer

# torchmil's CAMIL default n_landmarks=None reaches NystromAttention as `seq_len % None` and raises a
# TypeError on the first forward; None here means NystromTransformerLayer's own default.
DEFAULT_LANDMARKS = 256


@register_model
class CAMIL(MILModel):
    """fc1 -> Nystrom transformer layer (T) -> neighbour attention (L) -> M = sig(L) L + (1 - sig(L)) T
    -> attention pool (weights from T, pooling M) -> linear classifier.

    Args (torchmil's, with its defaults):
        in_dim: instance feature dimension D (fc1 maps it to nystrom_att_dim unless equal).
        n_classes: 1 for binary (sigmoid), >= 2 for softmax.
        nystrom_att_dim: width of the transformer layer, the neighbour attention and the pool input.
        pool_att_dim: hidden width of the attention pool.
        gated_pool: gated attention pool (tanh branch times a sigmoid gate).
        n_heads: heads of the Nystrom attention (must divide nystrom_att_dim).
        n_landmarks: Nystrom landmarks; None = 256 (torchmil's default None crashes, see above).
        pinv_iterations: Newton-Schulz steps of the Nystrom pseudo-inverse.
        dropout: dropout of the transformer layer's MLP (training only).
        use_mlp: feed-forward block in the transformer layer.

    Graph: edge_index / edge_weight of the grid8 rule, D^-1/2 A D^-1/2 with a self loop only on a
    one-instance bag (the graph torchmil's datasets build). Without edge_index the graph is built from coords by that rule;
    without either, no instance has neighbours (a warning says so) and the local branch is uniform.
    `attention` is the pool's weights. Linear in N: Nystrom's (bag, landmarks) factors and (edges,)
    scores, no (bag, bag) tensor.
    """

    name = "CAMIL"
    uses_graph = True
    default_graph_rule = TORCHMIL_GRAPH_RULE  # torchmil's dataset graph (mil_train.data.graphs)
    without_graph = "no instance has neighbours and its local branch is uniform"

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        nystrom_att_dim: int = 512,
        pool_att_dim: int = 128,
        gated_pool: bool = False,
        n_heads: int = 4,
        n_landmarks: int | None = None,
        pinv_iterations: int = 6,
        dropout: float = 0.0,
        use_mlp: bool = False,
    ) -> None:
        super().__init__(
            n_classes=n_classes,
            in_dim=in_dim,
            nystrom_att_dim=nystrom_att_dim,
            pool_att_dim=pool_att_dim,
            gated_pool=gated_pool,
            n_heads=n_heads,
            n_landmarks=n_landmarks,
            pinv_iterations=pinv_iterations,
            dropout=dropout,
            use_mlp=use_mlp,
        )
        dim = nystrom_att_dim
        self.fc1 = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.transformer = NystromTransformerLayer(
            in_dim=dim,
            att_dim=dim,
            n_heads=n_heads,
            n_landmarks=DEFAULT_LANDMARKS if n_landmarks is None else n_landmarks,
            pinv_iterations=pinv_iterations,
            dropout=dropout,
            use_mlp=use_mlp,
        )
        self.neighbour_attention = NeighbourAttention(in_dim=dim, att_dim=dim)
        self.pool = AttentionPool(dim, pool_att_dim, "tanh", gated_pool)
        self.classifier = nn.Linear(dim, n_classes)

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
        if edge_index is None:  # no neighbours: the local branch is uniform
            edge_index = torch.zeros(2, 0, dtype=torch.long, device=X.device)
        if mask is not None:
            X = X.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, in_dim)
        T = self.transformer(self.fc1(X), mask)  # (batch, bag, dim), 0 on padding
        L, _ = self.neighbour_attention(T, edge_index.to(X.device), edge_weight, mask)  # (batch, bag, dim)
        gate = torch.sigmoid(L)  # (batch, bag, dim)
        M = gate * L + (1.0 - gate) * T  # (batch, bag, dim), 0 on padding (L = T = 0 there)
        attention = masked_softmax(self.pool.raw_scores(T).squeeze(-1), mask)  # (batch, bag)
        pooled = torch.bmm(attention.unsqueeze(1), M).squeeze(1)  # (batch, dim)
        return MILOutput(logits=self.classifier(pooled), attention=attention)
