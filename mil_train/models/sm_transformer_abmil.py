"""SmTransformerABMIL: a transformer encoder with Sm after each self-attention, then Sm attention pooling
(Castro-Macias et al., "Sm: enhanced localization in Multiple Instance Learning for medical imaging
classification", NeurIPS 2024, arXiv 2410.03276); torchmil 1.0.2's `torchmil.models.SmTransformerABMIL`."""

from __future__ import annotations

import torch
from torch import nn

from mil_train.models.base import MILOutput
from mil_train.models.registry import register_model
from mil_train.models.sm_abmil import SmGraphModel
from mil_train.nn.sm_attention_pool import SmAttentionPool
from mil_train.nn.sm_transformer import SmTransformerEncoder
from mil_train.nn.transformer import max_bag_for_attention

DEFAULT_HEADS = 4


@register_model
class SmTransformerABMIL(SmGraphModel):
    """Sm transformer encoder (in_dim -> in_dim) -> Sm attention pooling -> linear classifier.

    Args:
        in_dim: instance feature dimension D.
        n_classes: 1 for binary (sigmoid), >= 2 for softmax.
        pool_att_dim, pool_act, pool_sm_mode, pool_sm_alpha, pool_sm_steps, pool_sm_where,
        pool_spectral_norm: the Sm attention pool (`mil_train.nn.sm_attention_pool`).
        transf_att_dim, transf_n_layers, transf_n_heads, transf_use_mlp, transf_add_self,
        transf_dropout, transf_sm_alpha, transf_sm_mode, transf_sm_steps: the encoder
        (`mil_train.nn.sm_transformer`).

    `attention` is the pool's softmax weights. Full self-attention, O(N^2) time (no (heads, N, N)
    tensor: eager SDPA, exported com.microsoft MultiHeadAttention), so bags are checked up to
    `max_bag_size`, the size whose 4 x N x N float32 attention fits 4 GiB: 16,384.
    """

    name = "SmTransformerABMIL"
    max_bag_size = max_bag_for_attention(DEFAULT_HEADS)

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        pool_att_dim: int = 128,
        pool_act: str = "tanh",
        pool_sm_mode: str = "approx",
        pool_sm_alpha: float | str = "trainable",
        pool_sm_steps: int = 10,
        pool_sm_where: str = "early",
        pool_spectral_norm: bool = False,
        transf_att_dim: int = 512,
        transf_n_layers: int = 1,
        transf_n_heads: int = DEFAULT_HEADS,
        transf_use_mlp: bool = True,
        transf_add_self: bool = True,
        transf_dropout: float = 0.0,
        transf_sm_alpha: float | str = "trainable",
        transf_sm_mode: str = "approx",
        transf_sm_steps: int = 10,
    ) -> None:
        super().__init__(
            n_classes=n_classes,
            in_dim=in_dim,
            pool_att_dim=pool_att_dim,
            pool_act=pool_act,
            pool_sm_mode=pool_sm_mode,
            pool_sm_alpha=pool_sm_alpha,
            pool_sm_steps=pool_sm_steps,
            pool_sm_where=pool_sm_where,
            pool_spectral_norm=pool_spectral_norm,
            transf_att_dim=transf_att_dim,
            transf_n_layers=transf_n_layers,
            transf_n_heads=transf_n_heads,
            transf_use_mlp=transf_use_mlp,
            transf_add_self=transf_add_self,
            transf_dropout=transf_dropout,
            transf_sm_alpha=transf_sm_alpha,
            transf_sm_mode=transf_sm_mode,
            transf_sm_steps=transf_sm_steps,
        )
        self.encoder = SmTransformerEncoder(
            in_dim=in_dim,
            out_dim=in_dim,
            att_dim=transf_att_dim,
            n_heads=transf_n_heads,
            n_layers=transf_n_layers,
            use_mlp=transf_use_mlp,
            add_self=transf_add_self,
            dropout=transf_dropout,
            sm_alpha=transf_sm_alpha,
            sm_mode=transf_sm_mode,
            sm_steps=transf_sm_steps,
        )
        self.pool = SmAttentionPool(
            in_dim, pool_att_dim, pool_act, pool_sm_mode, pool_sm_alpha, pool_sm_steps, pool_sm_where, pool_spectral_norm
        )
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
        edge_index, edge_weight = self.resolve_graph(edge_index, edge_weight, coords, mask)
        H = self.encoder(X, mask, edge_index, edge_weight)  # (batch, bag, in_dim), 0 on padding
        pooled, attention = self.pool(H, mask, edge_index, edge_weight)  # (batch, in_dim), (batch, bag)
        return MILOutput(logits=self.classifier(pooled), attention=attention)  # (batch, n_classes)
