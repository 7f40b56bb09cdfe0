"""Attention pooling (Ilse et al. 2018): scores each instance, pools the bag by the softmax weights."""

from __future__ import annotations

import torch
from torch import nn

from mil_train.nn.masking import masked_softmax

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


class AttentionPool(nn.Module):
    """score_i = w^T (act(V h_i) [* sigmoid(U h_i)]), weights = masked softmax over the bag.

    gated=True is the gated attention of Ilse et al.; gated=False the plain one. A bag must hold at
    least one real instance (an all-padding row has no defined weights and gives NaN).
    """

    def __init__(self, in_dim: int, att_dim: int = 128, act: str = "tanh", gated: bool = False) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"att_act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        self.V = nn.Sequential(nn.Linear(in_dim, att_dim), ACTIVATIONS[act]())
        self.U = nn.Sequential(nn.Linear(in_dim, att_dim), nn.Sigmoid()) if gated else None
        self.w = nn.Linear(att_dim, 1, bias=False)

    def raw_scores(self, H: torch.Tensor) -> torch.Tensor:
        """w^T (act(V h_i) [* sigmoid(U h_i)]) before the softmax: (batch, bag, dim) -> (batch, bag, outputs of w)."""
        gate = self.V(H)  # (batch, bag, att_dim)
        if self.U is not None:
            gate = gate * self.U(H)  # (batch, bag, att_dim)
        return self.w(gate)  # (batch, bag, outputs)

    def forward(self, H: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.raw_scores(H).squeeze(-1)  # (batch, bag)
        weights = masked_softmax(scores, mask)  # (batch, bag)
        if mask is not None:
            # 0 * NaN/Inf is NaN: clear padded rows so whatever the padding holds cannot reach the pool.
            H = H.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, dim)
        pooled = torch.bmm(weights.unsqueeze(1), H).squeeze(1)  # (batch, dim)
        return pooled, weights
