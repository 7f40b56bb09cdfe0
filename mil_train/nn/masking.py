"""Masked reductions over the bag axis, shared by the pools and the models."""

from __future__ import annotations

import torch


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the bag axis that is exactly 0 on padding.

    scores: (batch, bag); mask: (batch, bag) bool, True = real instance.
    """
    if mask is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(~mask, float("-inf"))  # (batch, bag)
    return torch.softmax(scores, dim=-1)
