"""Bags for the model tests, built by hand (independent of mil_train.data.collate)."""

from __future__ import annotations

import torch


def pad(bags: list[torch.Tensor], fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (N_i, D) bags to the largest; padded rows hold `fill`. Returns X (batch, bag, D), mask (batch, bag)."""
    n_max = max(len(b) for b in bags)
    X = torch.full((len(bags), n_max, bags[0].shape[1]), fill)  # (batch, bag, D)
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)  # (batch, bag)
    for i, bag in enumerate(bags):
        X[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    return X, mask

