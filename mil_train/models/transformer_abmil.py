"""TransformerABMIL: a transformer encoder over the bag, then attention pooling (torchmil 1.0.2's
TransformerABMIL, introduced with Castro-Macias et al., "Sm: enhanced localization in multiple instance
learning for medical imaging classification", NeurIPS 2024, arXiv:2410.03276)."""

from __future__ import annotations

import torch
from torch import nn

from mil_train.models.base import MILModel, MILOutput
from mil_train.models.registry import register_model
from mil_train.nn import AttentionPool, TransformerEncoder
from mil_train.nn.transformer import max_bag_for_attention

DEFAULT_HEADS = 8


@register_model
class TransformerABMIL(MILModel):
    """Transformer encoder (in_dim -> in_dim) -> attention pooling (plain or gated) -> linear classifier.

    Args:
        in_dim: instance feature dimension D.
        n_classes: 1 for binary (sigmoid), >= 2 for softmax.
        pool_att_dim: hidden width of the attention-pooling network.
        pool_act: activation of the pooling network: "tanh", "relu" or "gelu".
        pool_gated: gated attention pooling.
        transf_att_dim: attention width of the encoder (divisible by transf_n_heads).
        transf_n_layers: encoder layers.
        transf_n_heads: encoder attention heads.
        transf_use_mlp: feed-forward block in each encoder layer.
        transf_add_self: add the features to every encoder layer's output.
        transf_dropout: encoder dropout (training only).

    `attention` is the pooling weights. Full self-attention, O(N^2) time (no (heads, N, N) tensor is
    allocated: eager SDPA, exported com.microsoft MultiHeadAttention), so bags are checked up to
    `max_bag_size`, DESIGN section 7's size whose 8 x N x N float32 attention fits 4 GiB: 11,585.
    """

    name = "TransformerABMIL"
    max_bag_size = max_bag_for_attention(DEFAULT_HEADS)

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        pool_att_dim: int = 128,
        pool_act: str = "tanh",
        pool_gated: bool = False,
        transf_att_dim: int = 512,
        transf_n_layers: int = 1,
        transf_n_heads: int = DEFAULT_HEADS,
        transf_use_mlp: bool = True,
        transf_add_self: bool = True,
        transf_dropout: float = 0.0,
    ) -> None:
        super().__init__(
            n_classes=n_classes,
            in_dim=in_dim,
            pool_att_dim=pool_att_dim,
            pool_act=pool_act,
            pool_gated=pool_gated,
            transf_att_dim=transf_att_dim,
            transf_n_layers=transf_n_layers,
            transf_n_heads=transf_n_heads,
            transf_use_mlp=transf_use_mlp,
            transf_add_self=transf_add_self,
            transf_dropout=transf_dropout,
        )
        self.encoder = TransformerEncoder(
            in_dim=in_dim,
            out_dim=in_dim,
            att_dim=transf_att_dim,
            n_heads=transf_n_heads,
            n_layers=transf_n_layers,
            use_mlp=transf_use_mlp,
            add_self=transf_add_self,
            dropout=transf_dropout,
        )
        self.pool = AttentionPool(in_dim, pool_att_dim, pool_act, pool_gated)
        self.classifier = nn.Linear(in_dim, n_classes)

    def forward(
        self,
        X: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        edge_index: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> MILOutput:
        H = self.encoder(X, mask)  # (batch, bag, in_dim), 0 on padding
        pooled, attention = self.pool(H, mask)  # (batch, in_dim), (batch, bag)
        logits = self.classifier(pooled)  # (batch, n_classes)
        return MILOutput(logits=logits, attention=attention)
