"""ABMIL: attention-based deep MIL (Ilse, Tomczak, Welling, ICML 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mil_train.models.base import MILModel, MILOutput
from mil_train.models.registry import register_model
from mil_train.nn import AttentionPool, instance_mlp


@register_model
class ABMIL(MILModel):
    """Instance MLP (optional) -> attention pooling (plain or gated) -> linear classifier.

    Args:
        in_dim: instance feature dimension D.
        n_classes: 1 for binary (sigmoid), >= 2 for softmax.
        att_dim: hidden width of the attention network (torchmil default 128).
        att_act: activation of the attention network: "tanh" (default), "relu" or "gelu".
        gated: gated attention (Ilse et al. eq. 9) instead of plain (eq. 8).
        embed_dims: widths of the instance-embedding MLP; () pools the raw features.
        dropout: dropout after each embedding layer (training only).
    """

    name = "ABMIL"

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        att_dim: int = 128,
        att_act: str = "tanh",
        gated: bool = False,
        embed_dims: Sequence[int] = (),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            n_classes=n_classes,
            in_dim=in_dim,
            att_dim=att_dim,
            att_act=att_act,
            gated=gated,
            embed_dims=list(embed_dims),
            dropout=dropout,
        )
        self.embed, dim = instance_mlp(in_dim, embed_dims, dropout)
        self.pool = AttentionPool(dim, att_dim, att_act, gated)
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
        H = self.embed(X)  # (batch, bag, dim)
        # classifier(pool(H)), computed as a pool of classifier(H): the bag is read once each way
        logits, attention = self.pool.pool_linear(H, mask, self.classifier)  # (batch, n_classes), (batch, bag)
        return MILOutput(logits=logits, attention=attention)
