"""Masked mean pooling: the bag is the average of its real instances (torchmil 1.0.2's `MeanPool`)."""

from __future__ import annotations

import torch
from torch import nn


class MeanPool(nn.Module):
    """z = (1 / n) sum of the n real rows; `attention` is 1 / n on each of them, 0 on padding.

    Padded rows are cleared with a select (torch.where), not multiplied by the mask, so padding that
    holds NaN, Inf or 1e30 never reaches a real bag (0 * Inf is NaN). A bag with no real row pools
    to 0. torchmil returns 0 for every bag of a batch as soon as one bag is empty; here only that bag.
    Exportable: a select, a sum and a division (no data-dependent shapes).
    """

    def forward(self, X: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """X (batch, bag, dim), mask (batch, bag) bool -> (pooled (batch, dim), attention (batch, bag))."""
        if mask is None:
            mask = torch.ones(X.shape[:2], dtype=torch.bool, device=X.device)  # (batch, bag)
        weights = mask.to(X.dtype)  # (batch, bag)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1.0)  # (batch, bag), rows sum to 1
        X = torch.where(mask.unsqueeze(-1), X, torch.zeros_like(X))  # (batch, bag, dim)
        pooled = torch.bmm(weights.unsqueeze(1), X).squeeze(1)  # (batch, dim)
        return pooled, weights
