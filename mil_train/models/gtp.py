"""GTP: Graph-Transformer for whole-slide image classification (Zheng, Gindra, Green, Burks, Betke,
Beane, Kolachalama, "A graph-transformer for whole slide image classification", IEEE TMI 2022,
arXiv:2205.09671), as torchmil 1.0.2's `torchmil.models.GTP`.

A GCN layer over the tile graph, dense min-cut pooling to `n_clusters` cluster nodes, a transformer
over [class token; clusters], and a linear classifier on the class token. Linear in N: the only
tensors with a bag axis are (batch, bag, dim), (batch, bag, n_clusters) and the GCN's per-edge slices;
the transformer sees n_clusters + 1 tokens whatever the bag size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mil_train.data.graphs import TORCHMIL_GRAPH_RULE
from mil_train.models.base import MILModel, MILOutput
from mil_train.models.registry import register_model
from mil_train.nn.gcn_conv import GCNConv
from mil_train.nn.mincut_pool import cluster_assignments, mincut_losses, pool_features, propagate
from mil_train.nn.transformer import PreNormLayer



class ClusterSelfAttention(nn.Module):
    """Multi-head self-attention over a few tokens that also returns its weights.

    torchmil's relprop `MultiheadSelfAttention` as GTP uses it: Q, K, V from one bias-free Linear
    (in_dim -> 3 att_dim, laid out [Q; K; V], heads contiguous inside each), scale head_dim^-0.5,
    no mask (every token is real), dropout on the weights in training, no output projection
    (out_dim = att_dim). The (batch, heads, tokens, tokens) weights are materialised on purpose:
    tokens = n_clusters + 1 is fixed and small, and the weights give the model's `attention`.
    """

    def __init__(self, in_dim: int, att_dim: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if att_dim % n_heads != 0:
            raise ValueError(f"att_dim ({att_dim}) must be divisible by n_heads ({n_heads})")
        self.att_dim, self.n_heads, self.head_dim = att_dim, n_heads, att_dim // n_heads
        self.qkv = nn.Linear(in_dim, 3 * att_dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """X (batch, tokens, in_dim) -> (Y (batch, tokens, att_dim), weights (batch, heads, tokens, tokens))."""
        batch, tokens = X.shape[0], X.shape[1]
        qkv = self.qkv(X).reshape(batch, tokens, 3, self.n_heads, self.head_dim)  # (batch, tokens, 3, heads, head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (batch, heads, tokens, head_dim)
        scores = torch.matmul(query, key.transpose(-1, -2)) * self.head_dim**-0.5  # (batch, heads, tokens, tokens)
        weights = torch.softmax(scores, dim=-1)  # (batch, heads, tokens, tokens)
        Y = torch.matmul(self.dropout(weights), value)  # (batch, heads, tokens, head_dim)
        return Y.transpose(1, 2).reshape(batch, tokens, self.att_dim), weights  # (batch, tokens, att_dim)


class ClusterTransformerLayer(PreNormLayer):
    """torchmil's relprop `TransformerLayer`: pre-norm attention with a (projected) skip, ReLU MLP.

        Z = skip_proj(X) + Attention(LayerNorm(X))      skip_proj: Linear(in_dim, att_dim) or identity
        Z = Z + MLP(LayerNorm(Z))                       when use_mlp; att_dim -> 4 att_dim -> att_dim, ReLU
        Y = out_proj(Z)                                 Linear(att_dim, out_dim) or identity

    `mil_train.nn.transformer.PreNormLayer` (same parameter names, so `convert_torchmil_state_dict`
    maps torchmil's keys) with a ReLU MLP and an attention that returns its weights (the fused one of
    `TransformerEncoderLayer` hides them).
    """

    def __init__(self, in_dim: int, out_dim: int, att_dim: int, n_heads: int, use_mlp: bool, dropout: float) -> None:
        attention = ClusterSelfAttention(in_dim, att_dim, n_heads, dropout)
        super().__init__(in_dim, out_dim, att_dim, attention, use_mlp, dropout, activation=nn.ReLU)

    def forward(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """X (batch, tokens, in_dim) -> (Y (batch, tokens, out_dim), weights (batch, heads, tokens, tokens))."""
        attended, weights = self.attention(self.attention_norm(X))  # (batch, tokens, att_dim)
        return self.finish(X, attended), weights  # (batch, tokens, out_dim)


class ClusterTransformer(nn.Module):
    """torchmil's relprop `TransformerEncoder`: n_layers of `ClusterTransformerLayer`, then LayerNorm.

    The first layer maps in_dim -> att_dim (or out_dim when it is the only one), the last att_dim ->
    out_dim; no input skip (torchmil's relprop encoder has no add_self). Returns the output and each
    layer's attention weights.
    """

    def __init__(self, in_dim: int, out_dim: int, att_dim: int, n_heads: int, n_layers: int, use_mlp: bool,
                 dropout: float) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.layers = nn.ModuleList(
            ClusterTransformerLayer(
                in_dim=in_dim if i == 0 else att_dim,
                out_dim=out_dim if i == n_layers - 1 else att_dim,
                att_dim=att_dim,
                n_heads=n_heads,
                use_mlp=use_mlp,
                dropout=dropout,
            )
            for i in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(out_dim)

    def forward(self, X: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        weights = []
        for layer in self.layers:
            X, layer_weights = layer(X)  # (batch, tokens, att_dim or out_dim), (batch, heads, tokens, tokens)
            weights.append(layer_weights)
        return self.final_norm(X), weights


def attention_rollout(weights: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): prod over layers (last first) of (mean_heads(W) + I) / 2.

    weights: per layer (batch, heads, tokens, tokens). Returns (batch, tokens, tokens); row 0 is how
    much the class token's output draws on each input token through attention and the skips.
    """
    rollout = None
    for layer_weights in weights:
        mixed = layer_weights.mean(dim=1)  # (batch, tokens, tokens)
        identity = torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)  # (tokens, tokens)
        mixed = 0.5 * mixed + 0.5 * identity  # (batch, tokens, tokens), rows sum to 1
        rollout = mixed if rollout is None else torch.matmul(mixed, rollout)  # (batch, tokens, tokens)
    return rollout


def instance_attention(S: torch.Tensor, cluster_relevance: torch.Tensor) -> torch.Tensor:
    """GTP's per-instance attention: S r normalised over the bag (0 on padding, where S is 0).

    S: (batch, bag, K) assignments; cluster_relevance r: (batch, K), positive. Returns (batch, bag).
    """
    scores = torch.matmul(S, cluster_relevance.unsqueeze(-1)).squeeze(-1)  # (batch, bag)
    return scores / scores.sum(dim=-1, keepdim=True)  # (batch, bag)


@register_model
class GTP(MILModel):
    """GCN -> min-cut pooling to n_clusters -> transformer over [class token; clusters] -> classifier.

    Args:
        in_dim: instance feature dimension D (GCN, cluster and transformer width, as in torchmil).
        n_classes: 1 for binary (sigmoid), >= 2 for softmax.
        att_dim: attention width of the transformer (divisible by n_heads).
        n_clusters: number of min-cut clusters K.
        n_layers: transformer layers.
        n_heads: transformer heads.
        use_mlp: feed-forward block in each transformer layer.
        dropout: transformer dropout (training only).

    Graph: `edge_index` / `edge_weight` over the flattened (batch * bag) nodes, torchmil's dataset graph
    (`graph_rule`: grid8, D^-1/2 A D^-1/2, a self loop only on a one-instance bag); without them the graph is built
    from `coords` by that rule; without either the GCN sees no edges (a warning says so).

    `attention`: the class token's attention rollout over the cluster tokens, pushed back to the
    instances through the soft assignments S and normalised over the bag (see docs/models/GTP.md).
    compute_loss terms: "cls", "mincut", "ortho" (each weighs 1, as torchmil's sum).
    """

    name = "GTP"
    uses_graph = True
    default_graph_rule = TORCHMIL_GRAPH_RULE  # torchmil's dataset graph (mil_train.data.graphs)
    without_graph = "its GCN sees no neighbours and the min-cut loss is 0"

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        att_dim: int = 512,
        n_clusters: int = 100,
        n_layers: int = 1,
        n_heads: int = 8,
        use_mlp: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            n_classes=n_classes,
            in_dim=in_dim,
            att_dim=att_dim,
            n_clusters=n_clusters,
            n_layers=n_layers,
            n_heads=n_heads,
            use_mlp=use_mlp,
            dropout=dropout,
        )
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        self.gcn_conv = GCNConv(in_dim, in_dim, add_self_loops=True, learn_weights=True, activation=nn.ReLU())
        self.cluster_proj = nn.Linear(in_dim, n_clusters)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, in_dim))
        self.transformer = ClusterTransformer(in_dim, in_dim, att_dim, n_heads, n_layers, use_mlp, dropout)
        self.classifier = nn.Linear(in_dim, n_classes)

    def _run(self, X, mask, edge_index, edge_weight):
        """(MILOutput, S (batch, bag, K)) for a graph already resolved."""
        if mask is not None:
            X = X.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, D)
        H = self.gcn_conv(X, edge_index, edge_weight)  # (batch, bag, D)
        S = cluster_assignments(self.cluster_proj(H), mask)  # (batch, bag, K), 0 on padding
        # H is finite on padding (X was zeroed there) and S is 0 there, so S^T H needs no second mask
        # (a (batch, bag, D) Where: ~9 % of the exported graph's time at 10,000 tiles).
        clusters = pool_features(H, S)  # (batch, K, D)
        cls = self.cls_token.expand(X.shape[0], -1, -1)  # (batch, 1, D)
        Z, weights = self.transformer(torch.cat([cls, clusters], dim=1))  # (batch, K + 1, D)
        logits = self.classifier(Z[:, 0])  # (batch, n_classes)
        relevance = attention_rollout(weights)[:, 0, 1:]  # (batch, K)
        return MILOutput(logits=logits, attention=instance_attention(S, relevance)), S

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
        return self._run(X, mask, edge_index, edge_weight)[0]

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits, {"cls", "mincut", "ortho"}): the two pooling losses are batch means, as torchmil's."""
        X, mask = batch["X"], batch.get("mask", None)
        edge_index, edge_weight = self.resolve_graph(
            batch.get("edge_index", None), batch.get("edge_weight", None), batch.get("coords", None), mask
        )
        out, S = self._run(X, mask, edge_index, edge_weight)
        mincut, ortho = mincut_losses(S, *propagate(S, edge_index, edge_weight))  # (batch,), (batch,)
        return out.logits, {
            "cls": self.classification_loss(out.logits, batch["Y"]),
            "mincut": mincut.mean(),
            "ortho": ortho.mean(),
        }
