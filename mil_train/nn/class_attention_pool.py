"""Attention pooling with one branch per class on a shared attention network (CLAM_MB, Lu et al. 2021)."""

from __future__ import annotations

import torch
from torch import nn

from mil_train.nn.masking import masked_softmax
from mil_train.nn.attention_pool import AttentionPool


class ClassAttentionPool(AttentionPool):
    """score_ci = w_c^T (act(V h_i) [* sigmoid(U h_i)]): V (and U) shared, one w_c per branch.

    Each branch's weights are a masked softmax over the bag, and each branch pools the bag on its own.
    Branch c holds exactly the parameters of an `AttentionPool` whose `w` is row c of this `w`, and
    with n_branches=1 the two are the same module (initialised alike from the same seed).

    forward(H (batch, bag, dim), mask (batch, bag)) -> pooled (batch, branches, dim),
    weights (batch, branches, bag).
    """

    def __init__(
        self, in_dim: int, att_dim: int = 128, act: str = "tanh", gated: bool = False, n_branches: int = 1
    ) -> None:
        super().__init__(in_dim, att_dim, act, gated)
        if n_branches != 1:  # one branch keeps the parent's w: same parameters, same initialisation
            self.w = nn.Linear(att_dim, n_branches, bias=False)

    def forward(self, H: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.raw_scores(H).transpose(1, 2)  # (batch, branches, bag)
        branch_mask = None if mask is None else mask.unsqueeze(1)  # (batch, 1, bag)
        weights = masked_softmax(scores, branch_mask)  # (batch, branches, bag)
        if mask is not None:
            # 0 * NaN/Inf is NaN: clear padded rows so whatever the padding holds cannot reach the pool.
            H = H.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, dim)
        pooled = torch.bmm(weights, H)  # (batch, branches, dim)
        return pooled, weights
