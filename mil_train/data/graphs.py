"""Named graph rules over tile coordinates, in torch (the training side's copy).

`mil_runtime.graphs` holds the same rules in numpy. Both return the same edges in the same order
(tests/test_graph_parity.py), so the exported model's rule name and params rebuild the training graph.

Conventions:
- coords are (N, 2) integer grid units, row-major (y, x): level-0 pixels // tile stride.
- edge_index is (2, E) int64, row 0 = source, row 1 = target; rules are symmetric (both directions
  present); edges sorted by (source, target).
- edge_weight is (E,) float32 = D^-1/2 A D^-1/2: w_ij = 1 / sqrt(d_i d_j), d_i = edges leaving i (self
  loops included when asked for with `self_loops`); `lone_self_loop` gives a one-tile bag the self
  loop (0, 0) of weight 1 and changes nothing else (with grid8: torchmil's dataset graph); computed in
  float64 and rounded once.
- Neighbours come from sorted integer cell keys and binary search: O(N log N) time, O(N) memory.

Rules (`GRAPH_RULES`):
| name  | neighbours of (y, x)                          | params                   |
|-------|-----------------------------------------------|--------------------------|
| grid8 | the 8 cells with |dy| <= 1 and |dx| <= 1       | self_loops, lone_self_loop: bool = False  |
| grid4 | the 4 cells sharing a side (|dy| + |dx| == 1) | self_loops, lone_self_loop: bool = False  |
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

GRID8_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
GRID4_OFFSETS = ((-1, 0), (0, -1), (0, 1), (1, 0))

Graph = tuple[torch.Tensor, torch.Tensor]


def _as_grid_coords(coords) -> torch.Tensor:
    coords = torch.as_tensor(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must have shape (N, 2) in (y, x) grid units, got {tuple(coords.shape)}")
    if coords.is_floating_point():
        if not bool(torch.all(coords == torch.round(coords))):
            raise ValueError("coords must be whole grid units (level-0 pixels // tile stride)")
    elif coords.dtype == torch.bool or coords.is_complex():
        raise ValueError(f"coords must be integers, got dtype {coords.dtype}")
    return coords.long()


def _cell_keys(coords: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One int64 key per tile and the row width: key + dy * width + dx is the neighbour's key.

    A one-cell margin on every side keeps x + dx inside its row, so no neighbour key wraps around.
    """
    low = coords.min(dim=0).values
    span = coords.max(dim=0).values - low + 3  # (2,) height, width with margins
    if float(span[0]) * float(span[1]) >= 2.0**62:
        raise ValueError(f"coords span {span.tolist()} cells, too large for a grid graph")
    width = int(span[1])
    shifted = coords - low + 1  # (N, 2)
    return shifted[:, 0] * width + shifted[:, 1], width


def _grid_edges(coords, offsets: tuple[tuple[int, int], ...], self_loops: bool) -> torch.Tensor:
    """(2, E) edges between tiles whose cells differ by one of `offsets`, sorted by (source, target)."""
    coords = _as_grid_coords(coords)
    n = coords.shape[0]
    if n == 0:
        return torch.zeros((2, 0), dtype=torch.long, device=coords.device)
    keys, width = _cell_keys(coords)
    order = torch.argsort(keys, stable=True)
    sorted_keys = keys[order]
    duplicate = torch.nonzero(sorted_keys[1:] == sorted_keys[:-1]).flatten()
    if duplicate.numel():
        cell = coords[order[duplicate[0]]].tolist()
        raise ValueError(
            f"two tiles share the grid cell (y, x) = {cell}; coords must be unique grid units "
            "(level-0 pixels // tile stride): check the tile stride"
        )
    sources, targets = [], []
    for dy, dx in offsets:
        wanted = keys + (dy * width + dx)  # (N,)
        pos = torch.searchsorted(sorted_keys, wanted).clamp(max=n - 1)
        found = sorted_keys[pos] == wanted
        sources.append(torch.nonzero(found).flatten())
        targets.append(order[pos[found]])
    if self_loops:
        sources.append(torch.arange(n, device=coords.device))
        targets.append(torch.arange(n, device=coords.device))
    src = torch.cat(sources).long()
    dst = torch.cat(targets).long()
    edge_order = torch.argsort(src * n + dst, stable=True)  # keys are unique: the order is canonical
    return torch.stack([src[edge_order], dst[edge_order]])


def _symmetric_weights(edge_index: torch.Tensor, n: int) -> torch.Tensor:
    """w_ij = 1 / sqrt(d_i d_j) in float64, rounded once to float32."""
    degree = torch.bincount(edge_index[0], minlength=n).double()  # (N,)
    return (1.0 / torch.sqrt(degree[edge_index[0]] * degree[edge_index[1]])).float()


def _normalised(coords, offsets, self_loops: bool, lone_self_loop: bool) -> Graph:
    edge_index = _grid_edges(coords, offsets, bool(self_loops))
    if lone_self_loop and len(coords) == 1 and edge_index.shape[1] == 0:  # torchmil's datasets do this
        device = edge_index.device
        return torch.zeros((2, 1), dtype=torch.long, device=device), torch.ones(1, dtype=torch.float32, device=device)
    return edge_index, _symmetric_weights(edge_index, len(coords))


def grid8(coords, *, self_loops: bool = False, lone_self_loop: bool = False) -> Graph:
    """8-neighbourhood graph on grid coords, symmetric normalisation."""
    return _normalised(coords, GRID8_OFFSETS, self_loops, lone_self_loop)


def grid4(coords, *, self_loops: bool = False, lone_self_loop: bool = False) -> Graph:
    """4-neighbourhood (shared sides) graph on grid coords, symmetric normalisation."""
    return _normalised(coords, GRID4_OFFSETS, self_loops, lone_self_loop)


GRAPH_RULES: dict[str, Callable[..., Graph]] = {"grid8": grid8, "grid4": grid4}

# The graph torchmil 1.0.2's datasets build (ProcessedMILDataset._build_adj with its defaults: neighbours
# within 1.5 grid units, D^-1/2 A D^-1/2, a self loop of weight 1 only on a one-instance bag), as a
# model's `graph_rule`: the structure-aware models use it, so a torchmil user's graph carries over.
TORCHMIL_GRAPH_RULE = {"rule": "grid8", "params": {"lone_self_loop": True}}


def _rule(rule: str, params: dict) -> Callable[..., Graph]:
    if rule not in GRAPH_RULES:
        raise ValueError(f"unknown graph rule {rule!r}; choose one of {sorted(GRAPH_RULES)}")
    fn = GRAPH_RULES[rule]
    known = [p for p in inspect.signature(fn).parameters if p != "coords"]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"graph rule {rule!r} has no parameter {unknown}; it takes {known}")
    return fn


def build_graph(coords, rule: str = "grid8", **params) -> Graph:
    """Edges of one bag: (edge_index int64 (2, E), edge_weight float32 (E,)), nodes = rows of coords."""
    return _rule(rule, params)(coords, **params)


def batch_graph(coords, mask=None, rule: str = "grid8", **params) -> Graph:
    """Edges of a padded batch in the flattened (B * N) node space; padded slots get no edges.

    coords (B, N, 2), mask (B, N) bool with True = real tile (None: all real). Bag b's edges follow
    bag a's for a < b, each bag's sorted by (source, target).
    """
    coords = torch.as_tensor(coords)
    if coords.ndim != 3 or coords.shape[2] != 2:
        raise ValueError(f"batched coords must have shape (B, N, 2), got {tuple(coords.shape)}")
    n_bags, n_max = coords.shape[:2]
    if mask is None:
        mask = torch.ones((n_bags, n_max), dtype=torch.bool, device=coords.device)
    mask = torch.as_tensor(mask, device=coords.device).bool()
    if tuple(mask.shape) != (n_bags, n_max):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match coords {tuple(coords.shape[:2])}")
    fn = _rule(rule, params)
    edges = [torch.zeros((2, 0), dtype=torch.long, device=coords.device)]
    weights = [torch.zeros((0,), dtype=torch.float32, device=coords.device)]
    for b in range(n_bags):
        real = torch.nonzero(mask[b]).flatten()  # padded positions of the real tiles
        edge_index, edge_weight = fn(coords[b, real], **params)
        edges.append(real[edge_index] + b * n_max)
        weights.append(edge_weight)
    return torch.cat(edges, dim=1), torch.cat(weights)
