"""Dense min-cut pooling (Bianchi, Grattarola, Alippi, "Spectral clustering with graph neural networks
for graph pooling", ICML 2020) driven by an edge-list graph, as GTP uses it (torchmil 1.0.2's
`torchmil.nn.gnns.dense_mincut_pool`, itself adapted from torch_geometric's).

With S = softmax(assignment logits / temp) over the K clusters, one row per instance (0 on padding),
A the bag's adjacency and D = diag(row sums of A):
    pooled features   X' = S^T X                                   (batch, K, dim)
    pooled adjacency  A' = S^T A S, its diagonal set to 0, then D'^-1/2 A' D'^-1/2 (D' = row sums + 1e-15
                      after the square root, torchmil's EPS)          (batch, K, K)
    min-cut loss      -tr(S^T A S) / tr(S^T D S)                      per bag
    orthogonality     || S^T S / ||S^T S||_F - I_K / sqrt(K) ||_F     per bag
A bag without edges (tr(S^T D S) = 0) gets a min-cut loss of 0 and no gradient from it, where
torchmil's 0 / 0 gives NaN.
torchmil averages both losses over the batch; the functions here return them per bag (batch,).

The graph is milkit's edge list in the flattened (batch * bag) node space: edge (s, t) of weight w is
A[s, t] = w (the orientation of `mil_train.interop.torchmil.torchmil_adjacency`), so
(A S)[s] = sum over edges (s, t) of w * S[t] is one gather and one `scatter_add` over the E edges,
and D[s] = sum over edges (s, t) of w. Nothing holds an N x N matrix: the largest tensors are
(E, K) (only the losses and A' need them) and (batch, bag, K). torchmil builds A densely in
`diag(d)` (an N x N identity times the degrees, two N x N float tensors) and multiplies S^T D S
through it, which is why it runs out of memory at 100,000 instances.

Padding: S is 0 on padded rows (torch.where, so whatever the logits or features hold there never
reaches a real row) and X is set to 0 there before S^T X. Edges are expected to join real instances
only (what `batch_graph` builds); an edge touching a padded node contributes nothing, its S row being 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-15  # torchmil's epsilon in the pooled adjacency's normalisation


@dataclass
class MinCutPoolOutput:
    """What `mincut_pool` returns.

    pooled:      (batch, K, dim) S^T X
    adjacency:   (batch, K, K) normalised pooled adjacency, 0 on the diagonal
    mincut_loss: (batch,) -tr(S^T A S) / tr(S^T D S)
    ortho_loss:  (batch,) || S^T S / ||S^T S||_F - I / ||I||_F ||_F
    assignments: (batch, bag, K) S, rows summing to 1 on real instances, 0 on padding
    """

    pooled: torch.Tensor
    adjacency: torch.Tensor
    mincut_loss: torch.Tensor
    ortho_loss: torch.Tensor
    assignments: torch.Tensor


def cluster_assignments(logits: torch.Tensor, mask: torch.Tensor | None = None, temp: float = 1.0) -> torch.Tensor:
    """S = softmax(logits / temp) over the clusters, 0 on padded rows.

    logits: (batch, bag, K); mask: (batch, bag) bool, True = real. Returns (batch, bag, K).
    """
    if temp != 1.0:
        logits = logits / temp  # (batch, bag, K)
    if mask is not None:
        logits = logits.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, K), finite on padding
    S = torch.softmax(logits, dim=-1)  # (batch, bag, K)
    if mask is not None:
        S = torch.where(mask.unsqueeze(-1), S, torch.zeros_like(S))  # (batch, bag, K)
    return S


def pool_features(X: torch.Tensor, S: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """X' = S^T X: X (batch, bag, dim), S (batch, bag, K) from `cluster_assignments`. Returns (batch, K, dim)."""
    if mask is not None:
        X = torch.where(mask.unsqueeze(-1), X, torch.zeros_like(X))  # (batch, bag, dim)
    return torch.matmul(S.transpose(1, 2), X)  # (batch, K, dim)


def _edges(edge_index: torch.Tensor | None, edge_weight: torch.Tensor | None, dtype: torch.dtype):
    if edge_index is None:
        edge_index = torch.zeros(2, 0, dtype=torch.int64)
    if edge_weight is None:
        edge_weight = torch.ones(edge_index.shape[1], dtype=dtype, device=edge_index.device)
    return edge_index, edge_weight.to(dtype)


def propagate(
    S: torch.Tensor, edge_index: torch.Tensor | None, edge_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A S (batch, bag, K), degrees D (batch, bag)) over the edge list, by scatter_add over the edges.

    S: (batch, bag, K); edge_index: (2, E) int64 in the flattened (batch * bag) node space, edge
    (s, t) meaning A[s, t] = weight; edge_weight: (E,), ones when None.
    """
    batch, bag, k = S.shape
    edge_index, edge_weight = _edges(edge_index, edge_weight, S.dtype)
    source, target = edge_index[0], edge_index[1]  # (E,), (E,)
    flat = S.reshape(batch * bag, k)  # (batch * bag, K)
    messages = flat.index_select(0, target) * edge_weight.unsqueeze(-1)  # (E, K)
    AS = torch.zeros_like(flat).scatter_add(0, source.unsqueeze(-1).expand(-1, k), messages)  # (batch * bag, K)
    degree = torch.zeros(batch * bag, dtype=S.dtype, device=S.device).scatter_add(0, source, edge_weight)
    return AS.reshape(batch, bag, k), degree.reshape(batch, bag)  # (batch, bag, K), (batch, bag)


def mincut_losses(S: torch.Tensor, AS: torch.Tensor, degree: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min-cut loss (batch,), orthogonality loss (batch,)) from S, A S and D (see `propagate`)."""
    k = S.shape[-1]
    cut = (S * AS).sum(dim=(1, 2))  # (batch,) tr(S^T A S)
    volume = (degree.unsqueeze(-1) * S * S).sum(dim=(1, 2))  # (batch,) tr(S^T D S)
    has_edges = volume > 0  # (batch,) a bag without edges has no cut: loss 0 (torchmil: 0 / 0 = NaN)
    mincut = torch.where(has_edges, -(cut / torch.where(has_edges, volume, torch.ones_like(volume))), 0.0)
    SS = torch.matmul(S.transpose(1, 2), S)  # (batch, K, K)
    identity = torch.eye(k, dtype=S.dtype, device=S.device)  # (K, K)
    SS = SS / torch.linalg.matrix_norm(SS, keepdim=True)  # (batch, K, K)
    ortho = torch.linalg.matrix_norm(SS - identity / k**0.5)  # (batch,)
    return mincut, ortho


def pooled_adjacency(S: torch.Tensor, AS: torch.Tensor) -> torch.Tensor:
    """S^T A S with a zero diagonal, symmetrically degree-normalised as torchmil does. Returns (batch, K, K)."""
    k = S.shape[-1]
    adjacency = torch.matmul(S.transpose(1, 2), AS)  # (batch, K, K)
    diagonal = torch.eye(k, dtype=torch.bool, device=S.device)  # (K, K)
    adjacency = torch.where(diagonal, torch.zeros_like(adjacency), adjacency)  # (batch, K, K)
    scale = torch.sqrt(adjacency.sum(dim=-1)) + EPS  # (batch, K)
    return adjacency / scale.unsqueeze(1) / scale.unsqueeze(2)  # (batch, K, K)


def mincut_pool(
    X: torch.Tensor,
    logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    edge_index: torch.Tensor | None = None,
    edge_weight: torch.Tensor | None = None,
    temp: float = 1.0,
) -> MinCutPoolOutput:
    """Everything torchmil's `dense_mincut_pool(x, adj, s, mask, temp)` returns, from an edge list.

    X: (batch, bag, dim) features; logits: (batch, bag, K) assignment logits (torchmil's `s`);
    mask: (batch, bag) bool; edge_index / edge_weight: the graph (no edges when None).
    Losses are per bag; torchmil's values are their batch means.
    """
    S = cluster_assignments(logits, mask, temp)  # (batch, bag, K)
    AS, degree = propagate(S, edge_index, edge_weight)  # (batch, bag, K), (batch, bag)
    mincut, ortho = mincut_losses(S, AS, degree)  # (batch,), (batch,)
    return MinCutPoolOutput(
        pooled=pool_features(X, S, mask),
        adjacency=pooled_adjacency(S, AS),
        mincut_loss=mincut,
        ortho_loss=ortho,
        assignments=S,
    )
