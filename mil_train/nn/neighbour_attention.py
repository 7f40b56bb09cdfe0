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
(batch, bag, bag) product q k^T * adj * mask; here scores exist only on edges:

    e_ij = a_ij q_i . k_j              for each edge (i, j): gather q[i], k[j], multiply, sum
    s_i = sum over edges (i, j) of e_ij / sqrt(att_dim)      one scatter_add of (E,) scalars

Time O(E * att_dim), memory O(E + N * dim): the dot products are taken in fixed slices of
EDGE_CHUNK columns of q and k, so the largest temporaries are (E, EDGE_CHUNK), never (E, att_dim) and
never (bag, bag). At 100,000 grid tiles (E ~ 900,000 with self loops) and att_dim 512 an unsliced
(E, att_dim) gather would be 1.8 GB per operand; a slice is 0.23 GB. The scatter carries one scalar
per edge, so its index is (E,), not (E, att_dim). Duplicate edges add up, as torchmil's sparse
adjacency does when made dense.

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

EDGE_CHUNK = 64  # columns of q and k per edge gather: two (E, 64) float32 temporaries at a time


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
        # att_dim is the layer's fixed width (never a dynamic axis), so the slices are a fixed list at export.
        dots = None
        for start in range(0, self.att_dim, EDGE_CHUNK):
            stop = min(start + EDGE_CHUNK, self.att_dim)
            part = (q[:, start:stop].index_select(0, src) * k[:, start:stop].index_select(0, dst)).sum(dim=-1)  # (edges,)
            dots = part if dots is None else dots + part  # (edges,)
        if edge_weight is not None:
            dots = dots * edge_weight.to(q.dtype)  # (edges,)
        if mask is not None:
            real = mask.reshape(-1)  # (batch * bag,)
            dots = torch.where(real[src] & real[dst], dots, torch.zeros_like(dots))  # (edges,)
        s = torch.zeros(q.shape[0], dtype=q.dtype, device=q.device).scatter_add(0, src, dots)  # (batch * bag,)
        return (s * self.scale).reshape(X.shape[0], X.shape[1])  # (batch, bag)

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
