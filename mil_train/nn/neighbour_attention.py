"""CAMIL's neighbour-constrained self-attention (Fourkioti et al., "CAMIL: Context-Aware Multiple Instance
Learning for Cancer Detection and Subtyping in Whole Slide Images", ICLR 2024, arXiv:2305.05314),
computed over an edge list.

The math is torchmil 1.0.2's `torchmil.models.camil.CAMILSelfAttention`: with q_i = W_q x_i,
k_i = W_k x_i (att_dim each), v_i = W_v x_i (in_dim, all without bias) and the bag's adjacency a_ij,

    s_i = (1 / sqrt(att_dim)) * sum_j a_ij q_i . k_j          one score per instance
    alpha = softmax of s over the instances of the bag
    l_i = alpha_i v_i

So the softmax runs over the bag (torchmil's `softmax(dim=1)` of a (batch, bag, 1) tensor), not over
each node's neighbours: a node's neighbours only decide its score. torchmil computes s from the dense
(batch, bag, bag) product q k^T * adj * mask; here only edges are touched:

    k_agg_i = sum over edges (i, j) of a_ij k_j          gather k[j], scale, scatter_add into i
    s_i = q_i . k_agg_i / sqrt(att_dim)

which is the same sum regrouped (q_i . sum_j a_ij k_j). Memory is O(E * att_dim + N * dim), time
O(E * att_dim): one (edges, att_dim) tensor, never (bag, bag). Duplicate edges add up, as torchmil's
sparse adjacency does when made dense.

Differences from torchmil, which show only on padding:
- torchmil's softmax is not masked: a padded instance has s = 0 and still takes a share of the
  softmax, so a padded bag's real weights shrink. Here the softmax is over real instances only (0 on
  padding), so a bag alone equals the same bag padded in a batch.
- Padded rows of x are zeroed before the projections and edges touching a padded node get weight 0
  (torchmil's `adj * mask`), so padding that holds 1e30 cannot reach a real instance.

Graph inputs follow the project's contract: edge_index (2, E) int64 in the flattened (batch * bag)
node space (row 0 = source i, row 1 = target j), edge_weight (E,) float32 (None = weight 1).
"""

from __future__ import annotations

import torch
from torch import nn

from mil_train.nn.masking import masked_softmax


class NeighbourAttention(nn.Module):
    """l_i = softmax_bag(q_i . sum_j a_ij k_j / sqrt(att_dim)) v_i over an edge list.

    Args:
        in_dim: instance feature dimension (also the width of v and of the output).
        att_dim: width of q and k.

    State dict: `qk.weight` (2 * att_dim, in_dim) holding [W_q; W_k] (torchmil `qk_nn.weight`) and
    `v.weight` (in_dim, in_dim) (torchmil `v_nn.weight`).
    """

    def __init__(self, in_dim: int, att_dim: int = 512) -> None:
        super().__init__()
        self.att_dim = att_dim
        self.qk = nn.Linear(in_dim, 2 * att_dim, bias=False)
        self.v = nn.Linear(in_dim, in_dim, bias=False)
        self.scale = att_dim**-0.5

    def scores(
        self,
        X: torch.Tensor,
        edge_index: torch.Tensor,
        edge_weight: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """s (batch, bag): each instance's edge-summed, scaled q . k, before the softmax.

        X must hold finite values on padding (`forward` zeroes padded rows first).
        """
        q, k = self.qk(X).chunk(2, dim=-1)  # (batch, bag, att_dim) each
        q = q.reshape(-1, self.att_dim)  # (batch * bag, att_dim)
        k = k.reshape(-1, self.att_dim)  # (batch * bag, att_dim)
        src, dst = edge_index[0], edge_index[1]  # (edges,) each
        weight = torch.ones_like(src, dtype=q.dtype) if edge_weight is None else edge_weight.to(q.dtype)  # (edges,)
        if mask is not None:
            real = mask.reshape(-1)  # (batch * bag,)
            weight = torch.where(real[src] & real[dst], weight, torch.zeros_like(weight))  # (edges,)
        messages = k.index_select(0, dst) * weight.unsqueeze(-1)  # (edges, att_dim)
        k_agg = torch.zeros_like(q).scatter_add(0, src.unsqueeze(-1).expand_as(messages), messages)  # (batch * bag, att_dim)
        s = (q * k_agg).sum(dim=-1) * self.scale  # (batch * bag,)
        return s.reshape(X.shape[0], X.shape[1])  # (batch, bag)

    def forward(
        self,
        X: torch.Tensor,
        edge_index: torch.Tensor,
        edge_weight: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L (batch, bag, in_dim), alpha (batch, bag)): L = alpha * v, 0 on padding; alpha sums to 1 per bag."""
        if mask is not None:
            X = X.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, in_dim)
        alpha = masked_softmax(self.scores(X, edge_index, edge_weight, mask), mask)  # (batch, bag)
        L = alpha.unsqueeze(-1) * self.v(X)  # (batch, bag, in_dim)
        return L, alpha
