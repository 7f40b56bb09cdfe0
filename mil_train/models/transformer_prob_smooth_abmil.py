"""TransformerProbSmoothABMIL: a transformer encoder over the bag, then probabilistic smooth attention
pooling (Castro-Macias, Morales-Alvarez, Wu, Molina, Katsaggelos, Pattern Recognition 2025, arXiv 2507.14932).

The encoder adds global (long-range) interactions; the pool's KL prior adds the local (graph) ones.
Everything after the encoder is `ProbSmoothHead` (see prob_smooth_abmil.py).
"""

from __future__ import annotations

import torch
from torch import nn

from mil_train.models.prob_smooth_abmil import ProbSmoothHead
from mil_train.models.registry import register_model
from mil_train.nn import ProbSmoothAttentionPool, TransformerEncoder
from mil_train.nn.transformer import max_bag_for_attention

DEFAULT_HEADS = 8


@register_model
class TransformerProbSmoothABMIL(ProbSmoothHead):
    """Transformer encoder (full self-attention, width kept at in_dim) -> probabilistic pool -> linear.

    Args:
        in_dim: instance feature dimension D (also the encoder's output width, as in torchmil).
        n_classes: 1 for binary (sigmoid), >= 2 for softmax.
        pool_att_dim: the pool's MLP has width 2 * pool_att_dim (torchmil default 128).
        covar_mode: "diag" or "zero", as in ProbSmoothABMIL.
        n_samples_train / n_samples_test: as in ProbSmoothABMIL (1000 / 5000).
        transf_att_dim, transf_n_layers, transf_n_heads, transf_use_mlp, transf_add_self, transf_dropout:
            the encoder's width, depth, heads, feed-forward block, input skip and dropout
            (torchmil defaults 512, 1, 8, True, True, 0.0).

    max_bag_size: the encoder is full self-attention, O(N^2) time (no (heads, N, N) tensor allocated);
    the class value is the largest N whose (heads, N, N) float32 attention would fit 4 GiB with the
    default 8 heads, and an instance states its own heads'.
    """

    name = "TransformerProbSmoothABMIL"
    max_bag_size = max_bag_for_attention(DEFAULT_HEADS)

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        pool_att_dim: int = 128,
        covar_mode: str = "diag",
        n_samples_train: int = 1000,
        n_samples_test: int = 5000,
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
            covar_mode=covar_mode,
            n_samples_train=n_samples_train,
            n_samples_test=n_samples_test,
            transf_att_dim=transf_att_dim,
            transf_n_layers=transf_n_layers,
            transf_n_heads=transf_n_heads,
            transf_use_mlp=transf_use_mlp,
            transf_add_self=transf_add_self,
            transf_dropout=transf_dropout,
        )
        self._check_samples(n_samples_train, n_samples_test)
        self.max_bag_size = max_bag_for_attention(transf_n_heads)
        self.encoder = TransformerEncoder(
            in_dim,
            att_dim=transf_att_dim,
            n_heads=transf_n_heads,
            n_layers=transf_n_layers,
            use_mlp=transf_use_mlp,
            add_self=transf_add_self,
            dropout=transf_dropout,
        )
        self.pool = ProbSmoothAttentionPool(in_dim, pool_att_dim, covar_mode)
        self.classifier = nn.Linear(in_dim, n_classes)

    def encode(self, X: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.encoder(X, mask)  # (batch, bag, in_dim), 0 on padding
