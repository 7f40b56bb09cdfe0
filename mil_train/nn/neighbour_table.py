"""A graph as a table of neighbour slots, and the weighted neighbour sum A x it serves.

Used wherever a model aggregates over the bag graph (GCNConv, Sm). The edge list (2, E) over the
flattened (batch * bag) nodes, A[edge_index[0], edge_index[1]] = edge_weight, becomes a (nodes, K)
table of neighbour ids and weights, K = the largest number of edges of one node (8 for grid8, 9 with
self loops; data-dependent, an unbacked size under torch.export); unused slots point at an extra zero
row with weight 0. A x is then one gather of (nodes, K, chunk) neighbour features and a batched
contraction with the weights, AGGREGATION_CHUNK feature columns at a time.

Why not scatter-add: onnxruntime's ScatterElements-add costs ~50 ns per element on the CPU (19 of
PatchGCN's 25 s at 10,000 tiles on one thread; 5x torchmil's whole SmABMIL), and ScatterND-add gives
run-to-run-varying sums (DESIGN section 4). The table needs only 1-D scatters of E integers and
weights. Time and memory are O(nodes * K * dim) = O(E * dim) for graphs of even degree; the largest
temporary is (nodes, K, chunk), 230 MB at 100,000 grid tiles, where one (E, dim) message tensor would
be 3.7 GB. The sum over a node's neighbours runs in slot order (a node's edges in input order).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

AGGREGATION_CHUNK = 64  # feature columns gathered at a time: (nodes, K, 64) float32


class NeighbourTable(NamedTuple):
    """A graph as fixed-width neighbour slots over the flattened (batch * bag) nodes.

    sender: (nodes, K) int64 neighbour ids; `nodes` (one past the last node) in unused slots.
    weight: (nodes, 1, K) edge weights (1 where the edge list had none); 0 in unused slots.
    """

    sender: torch.Tensor
    weight: torch.Tensor


def neighbour_table(
    edge_index: torch.Tensor, edge_weight: torch.Tensor | None, n_nodes, dtype: torch.dtype = torch.float32
) -> NeighbourTable:
    """Edges (2, E) (row 0 receives, row 1 sends) and weights (E,) -> a NeighbourTable of n_nodes rows.

    K is the largest in-degree in the batch (data-dependent: an unbacked size under torch.export).
    Edges are ordered by (receiver, position in the list) with a sort on unique int64 keys, so the
    layout does not depend on the sort being stable. Each edge gets its own slot (a repeated edge
    counts twice, as torchmil's coalesced adjacency sums it).
    """
    receiver, sender = edge_index[0], edge_index[1]  # (E,), (E,)
    n_edges = receiver.shape[0]
    position = torch.arange(n_edges, device=receiver.device)  # (E,)
    order = torch.argsort(receiver * n_edges + position)  # (E,) unique keys
    receiver, sender = receiver[order], sender[order]  # (E,) sorted by receiver
    if edge_weight is None:
        weight = torch.ones(n_edges, dtype=dtype, device=receiver.device)  # (E,)
    else:
        weight = edge_weight.to(dtype)[order]  # (E,)
    counts = torch.zeros(n_nodes, dtype=torch.long, device=receiver.device).scatter_add(
        0, receiver, torch.ones_like(receiver)
    )  # (nodes,) in-degree; a 1-D scatter of E integers
    first = torch.cumsum(counts, 0) - counts  # (nodes,) where each node's edges start in the sorted list
    rank = position - first[receiver]  # (E,) slot of each edge within its node
    width = counts.max().item()  # 0 without edges
    torch._check(width >= 0)
    slot = receiver * width + rank  # (E,) unique
    table = torch.full((n_nodes * width,), n_nodes, dtype=torch.long, device=receiver.device)
    table = table.scatter(0, slot, sender).reshape(n_nodes, width)  # (nodes, K)
    weights = torch.zeros(n_nodes * width, dtype=dtype, device=receiver.device).scatter(0, slot, weight)
    return NeighbourTable(table, weights.reshape(n_nodes, 1, width))  # (nodes, K), (nodes, 1, K)


def as_table(
    x: torch.Tensor, edge_index: torch.Tensor | NeighbourTable | None, edge_weight: torch.Tensor | None
) -> NeighbourTable | None:
    """The NeighbourTable of a graph given as an edge list (or already as a table, or None)."""
    if edge_index is None or isinstance(edge_index, NeighbourTable):
        return edge_index
    batch, bag = x.shape[0], x.shape[1]
    return neighbour_table(edge_index, edge_weight, batch * bag, x.dtype)


def aggregate(
    x: torch.Tensor, edge_index: torch.Tensor | NeighbourTable | None, edge_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """A x for a batch of graphs given as one edge list: (batch, bag, dim) -> (batch, bag, dim).

    edge_index (2, E) int64 in the flattened (batch * bag) node space, row 0 the node that receives,
    row 1 the node whose features it receives (adj[i, j] = w_ij, y_i = sum_j w_ij x_j), with
    edge_weight (E,) (1 where None); or a NeighbourTable built from them (edge_weight is then ignored).
    No edges (None or E = 0): zeros, as torchmil's product with an empty adjacency. Nodes without
    edges (padding) get 0; unused slots read an appended zero row, never another node's features.
    """
    batch, bag, dim = x.shape
    table = as_table(x, edge_index, edge_weight)
    if table is None:
        return torch.zeros_like(x)
    flat = x.reshape(batch * bag, dim)  # (nodes, dim)
    flat = torch.cat([flat, torch.zeros_like(flat[:1])], dim=0)  # (nodes + 1, dim): the unused slots' row
    senders = table.sender.reshape(-1)  # (nodes * K,)
    n_nodes, width = table.sender.shape
    parts = []
    # dim is the layer's fixed width (never a dynamic axis), so the slices are a fixed list at export.
    for start in range(0, dim, AGGREGATION_CHUNK):
        part = flat[:, start:start + AGGREGATION_CHUNK]  # (nodes + 1, chunk)
        neighbours = torch.index_select(part, 0, senders).reshape(n_nodes, width, part.shape[1])  # (nodes, K, chunk)
        parts.append(torch.matmul(table.weight, neighbours).squeeze(1))  # (nodes, chunk)
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (nodes, dim)
    return out.reshape(batch, bag, dim)
