"""DSMIL's dual stream (Li, Li, Eliceiri, CVPR 2021): a max-instance classifier and critical-instance attention.

Stream one scores every instance with a linear instance classifier and keeps, per class, the best
scoring real instance (the critical instance) and its score. Stream two matches every instance's
query against the critical instance's query (scaled dot product) and pools the values with the
masked softmax of those similarities, giving one bag embedding per class.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def query_network(in_dim: int, att_dim: int, nonlinear: bool) -> nn.Module:
    """W_q: a linear map, or Linear -> ReLU -> Linear -> Tanh (DSMIL's `nonlinear_q`)."""
    if not nonlinear:
        return nn.Linear(in_dim, att_dim)
    return nn.Sequential(nn.Linear(in_dim, att_dim), nn.ReLU(), nn.Linear(att_dim, att_dim), nn.Tanh())


def value_network(in_dim: int, nonlinear: bool, dropout: float) -> nn.Module:
    """W_v: the identity, or Dropout -> Linear -> ReLU (DSMIL's `nonlinear_v`; dropout acts only here)."""
    if not nonlinear:
        return nn.Identity()
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, in_dim), nn.ReLU())


class MaxInstanceAttention(nn.Module):
    """Instance classifier + attention whose query is the critical (max-scoring) instance.

    forward(X, mask) -> (max_logits, weights, embeddings):
      max_logits (batch, n_classes):       the critical instance's score per class (stream one)
      weights    (batch, bag, n_classes):  softmax over real instances of q_i . q_crit / sqrt(att_dim)
      embeddings (batch, n_classes, dim):  sum_i weights_i v_i, one bag embedding per class
    Padding never becomes the critical instance, never gets weight, and its values never reach a sum,
    whatever it holds (NaN and Inf included). A bag needs at least one real instance.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        att_dim: int = 128,
        nonlinear_q: bool = False,
        nonlinear_v: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.instance_classifier = nn.Linear(in_dim, n_classes)
        self.query = query_network(in_dim, att_dim, nonlinear_q)
        self.value = value_network(in_dim, nonlinear_v, dropout)
        self.scale = 1.0 / math.sqrt(att_dim)

    def forward(
        self, X: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if mask is not None:
            X = X.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, dim)
        instance_logits = self.instance_classifier(X)  # (batch, bag, n_classes)
        max_logits, critical = self._critical_instances(instance_logits, mask)  # (batch, n_classes) x2
        Q = self.query(X)  # (batch, bag, att_dim)
        index = critical.unsqueeze(-1).expand(-1, -1, Q.shape[-1])  # (batch, n_classes, att_dim)
        critical_queries = torch.gather(Q, 1, index)  # (batch, n_classes, att_dim)
        similarity = torch.bmm(Q, critical_queries.transpose(1, 2)) * self.scale  # (batch, bag, n_classes)
        if mask is not None:
            similarity = similarity.masked_fill(~mask.unsqueeze(-1), float("-inf"))  # (batch, bag, n_classes)
        weights = torch.softmax(similarity, dim=1)  # (batch, bag, n_classes)
        embeddings = torch.bmm(weights.transpose(1, 2), self.value(X))  # (batch, n_classes, dim)
        return max_logits, weights, embeddings

    @staticmethod
    def _critical_instances(
        instance_logits: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked max over the bag: (score, index) of the best real instance per class."""
        if mask is not None:
            instance_logits = instance_logits.masked_fill(~mask.unsqueeze(-1), float("-inf"))  # (batch, bag, C)
        max_logits, critical = instance_logits.max(dim=1)  # (batch, n_classes), (batch, n_classes)
        return max_logits, critical
