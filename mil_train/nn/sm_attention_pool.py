"""Attention pooling with the Sm operator (torchmil 1.0.2's `torchmil.nn.SmAttentionPool`, Castro-Macias
et al., NeurIPS 2024, arXiv 2410.03276): ABMIL's attention with Sm smoothing at one of three places.

torchmil's definition, for a bag X (N, D), proj1 = Linear(D, att_dim), proj2 = Linear(att_dim, 1, no bias):
    early: X' = Sm(X);  f = proj2(act(proj1(X')));  z = X'^T softmax(f)
    mid:   f = proj2(act(Sm(proj1(X))));            z = X^T softmax(f)
    late:  f = Sm(proj2(act(proj1(X))));            z = X^T softmax(f)
    none:  f = proj2(act(proj1(X)));                z = X^T softmax(f)
Sm is the identity when sm_steps == 0, sm_alpha == 0 or sm_where == "none" (torchmil's rule).

The early form is computed without smoothing the D-wide features (D = 1,024 for a slide encoder). Sm
acts on the bag axis and proj1 on the feature axis, so Sm(X) W^T = Sm(X W^T), and
z = Sm(X)^T s = X^T Sm^T(s):
    early (milkit): f = proj2(act(Sm(X W^T) + b));  s = softmax(f);  z = X^T Sm^T(s)
Equal to torchmil's up to float rounding (tests/models/test_sm.py), with Sm run on att_dim channels
and on one, instead of D: O(E (att_dim + 1)) instead of O(E D) work and memory, which is what lets
a 100,000-instance bag (E ~ 900,000 edges on grid8) run within 8 GB. `weights` is s, the softmax
weights Sm(X) is pooled with.

spectral_norm (torchmil's rule): proj1 and proj2 for "early" and "none", proj2 for "mid", none for
"late" (the docstring's "linear layers after the Sm operator"), by torch's
`torch.nn.utils.parametrizations.spectral_norm`, as torchmil (one power iteration per forward in
training; eval uses the stored vectors, deterministic).

Padding: padded rows are zeroed first; padded nodes have no edges, so no Sm mixes them in; weights
are exactly 0 there.
"""

from __future__ import annotations

import torch
from torch import nn

from mil_train.nn.masking import masked_softmax
from mil_train.nn.sm import Sm

ACTIVATIONS = {"tanh": torch.tanh, "relu": nn.functional.relu, "gelu": nn.functional.gelu}
SM_PLACES = ("early", "mid", "late", "none")


def sm_is_identity(sm_alpha, sm_steps: int, sm_where: str) -> bool:
    """torchmil's rule for replacing Sm by the identity in the pool."""
    return int(sm_steps) <= 0 or (not isinstance(sm_alpha, str) and float(sm_alpha) == 0.0) or sm_where == "none"


class SmAttentionPool(nn.Module):
    """ABMIL attention pooling with Sm smoothing (early / mid / late / none); see the module docstring.

    Args:
        in_dim: feature dimension D.
        att_dim: width of proj1.
        act: "tanh", "relu" or "gelu" (torchmil's pool default "gelu"; SmABMIL passes "tanh").
        sm_mode, sm_alpha, sm_steps: the Sm operator's mode, alpha, approx steps (`mil_train.nn.sm`).
        sm_where: "early", "mid", "late" or "none".
        spectral_norm: spectral normalisation of the linear layers after Sm.
    """

    def __init__(
        self,
        in_dim: int,
        att_dim: int = 128,
        act: str = "gelu",
        sm_mode: str = "approx",
        sm_alpha: float | str = "trainable",
        sm_steps: int = 10,
        sm_where: str = "early",
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        if sm_where not in SM_PLACES:
            raise ValueError(f"sm_where must be one of {list(SM_PLACES)}, got {sm_where!r}")
        self.act = ACTIVATIONS[act]
        self.sm_where = sm_where
        self.sm = None if sm_is_identity(sm_alpha, sm_steps, sm_where) else Sm(sm_alpha, sm_steps, sm_mode)
        self.proj1 = nn.Linear(in_dim, att_dim)
        self.proj2 = nn.Linear(att_dim, 1, bias=False)
        if spectral_norm:
            if sm_where == "mid":
                self.proj2 = nn.utils.parametrizations.spectral_norm(self.proj2)
            elif sm_where in ("early", "none"):
                self.proj1 = nn.utils.parametrizations.spectral_norm(self.proj1)
                self.proj2 = nn.utils.parametrizations.spectral_norm(self.proj2)

    def forward(
        self,
        X: torch.Tensor,
        mask: torch.Tensor | None = None,
        edge_index: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """X (batch, bag, D), mask (batch, bag) -> (pooled (batch, D), weights (batch, bag))."""
        if mask is not None:
            X = X.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, D)
        sm = self.sm
        where = self.sm_where if sm is not None else "none"
        if where == "early":
            H = sm(nn.functional.linear(X, self.proj1.weight), edge_index, edge_weight)  # (batch, bag, att_dim)
            H = H + self.proj1.bias  # (batch, bag, att_dim)
        else:
            H = self.proj1(X)  # (batch, bag, att_dim)
            if where == "mid":
                H = sm(H, edge_index, edge_weight)  # (batch, bag, att_dim)
        scores = self.proj2(self.act(H))  # (batch, bag, 1)
        if where == "late":
            scores = sm(scores, edge_index, edge_weight)  # (batch, bag, 1)
        weights = masked_softmax(scores.squeeze(-1), mask)  # (batch, bag)
        pool_weights = weights.unsqueeze(-1)  # (batch, bag, 1)
        if where == "early":
            pool_weights = sm(pool_weights, edge_index, edge_weight, transpose=True)  # (batch, bag, 1) Sm^T(s)
        pooled = torch.bmm(pool_weights.transpose(1, 2), X).squeeze(1)  # (batch, D)
        return pooled, weights
