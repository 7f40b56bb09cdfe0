"""Masked max pooling: each feature is its largest value over the real instances (torchmil 1.0.2's
`MaxPool`)."""

from __future__ import annotations

import torch
from torch import nn


class MaxPool(nn.Module):
    """z_d = max over real rows i of x_id; `attention` is each row's share of the D features it wins.

    The share (number of features d whose maximum row i holds) / D sums to 1 over the bag and is 0 on
    padding: it is what a max pool attributes to each instance, and what the exported model's
    `attention` output carries. Ties go to the first row (argmax's rule, in torch and in ONNX).
    Padded rows are set to -inf before the max, so padding never wins, whatever it holds; a bag with
    no real row pools to 0 (torchmil: -inf) and has no attention.
    Exportable: a select, ReduceMax, ArgMax and a comparison with the row index (batch, bag, dim),
    the size of the bag itself.
    """

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """X (batch, bag, dim), mask (batch, bag) bool -> (pooled (batch, dim), attention (batch, bag))."""
        if mask is None:
            mask = torch.ones(X.shape[:2], dtype=torch.bool, device=X.device)  # (batch, bag)
        real = mask.unsqueeze(-1)  # (batch, bag, 1)
        X = torch.where(real, X, torch.full_like(X, float("-inf")))  # (batch, bag, dim)
        pooled = X.amax(dim=1)  # (batch, dim)
        empty = ~mask.any(dim=1, keepdim=True)  # (batch, 1)
        pooled = torch.where(empty, torch.zeros_like(pooled), pooled)  # (batch, dim)
        winner = X.argmax(dim=1)  # (batch, dim) first row holding each feature's maximum
        rows = torch.arange(X.shape[1], device=X.device)  # (bag,)
        wins = (winner.unsqueeze(1) == rows[None, :, None]) & real  # (batch, bag, dim)
        attention = wins.to(X.dtype).mean(dim=-1)  # (batch, bag), rows sum to 1
        return pooled, attention
