"""Named graph rules over tile coordinates, in numpy (the runtime's copy; no torch).

`mil_train.data.graphs` holds the same rules in torch. Both return the same edges in the same order, so
a model trained on one and run on the other sees the identical graph (tests/test_graph_parity.py).

Conventions shared by both copies:
- coords are (N, 2) integer grid units, row-major (y, x): level-0 pixels // tile stride.
- edge_index is (2, E) int64, row 0 = source, row 1 = target; every rule is symmetric, so both
  directions of an edge are present. Edges are sorted by (source, target).
- edge_weight is (E,) float32, the symmetric normalisation D^-1/2 A D^-1/2: w_ij = 1 / sqrt(d_i d_j),
  with d_i the number of edges leaving i (self loops included when asked for with `self_loops`).
  `lone_self_loop` gives a bag of one tile the self loop (0, 0) of weight 1 and changes nothing else:
  with grid8, the graph torchmil's datasets build (neighbours within 1.5 grid units, D^-1/2 A D^-1/2,
  a self loop only when the bag has one instance). Computed in float64, then rounded once to float32.
- Neighbours are found by sorting integer cell keys and binary search: O(N log N) time, O(N) memory.

Rules (`GRAPH_RULES`):
| name  | neighbours of (y, x)                          | params                   |
|-------|-----------------------------------------------|--------------------------|
| grid8 | the 8 cells with |dy| <= 1 and |dx| <= 1       | self_loops, lone_self_loop: bool = False  |
| grid4 | the 4 cells sharing a side (|dy| + |dx| == 1) | self_loops, lone_self_loop: bool = False  |
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np

from mil_runtime.errors import InvalidInputError, ModelFormatError

GRID8_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
GRID4_OFFSETS = ((-1, 0), (0, -1), (0, 1), (1, 0))


def _as_grid_coords(coords: np.ndarray) -> np.ndarray:
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise InvalidInputError(f"coords must have shape (N, 2) in (y, x) grid units, got {coords.shape}")
    if coords.dtype.kind == "f":
        if not np.all(np.isfinite(coords)) or not np.all(coords == np.round(coords)):
            raise InvalidInputError("coords must be whole grid units (level-0 pixels // tile stride)")
    elif coords.dtype.kind not in "iu":
        raise InvalidInputError(f"coords must be integers, got dtype {coords.dtype}")
    return coords.astype(np.int64)


def _cell_keys(coords: np.ndarray) -> tuple[np.ndarray, int]:
    """One int64 key per tile, and the row width: key + dy * width + dx is the neighbour's key.

    A one-cell margin on every side keeps x + dx inside its row, so no neighbour key wraps around.
    """
    low = coords.min(axis=0)
    span = coords.max(axis=0) - low + 3  # (2,) height, width with margins
    if float(span[0]) * float(span[1]) >= 2.0**62:
        raise InvalidInputError(f"coords span {span.tolist()} cells, too large for a grid graph")
    width = int(span[1])
    shifted = coords - low + 1  # (N, 2)
    return shifted[:, 0] * width + shifted[:, 1], width


def _grid_edges(coords: np.ndarray, offsets: tuple[tuple[int, int], ...], self_loops: bool) -> np.ndarray:
    """(2, E) edges between tiles whose cells differ by one of `offsets`, sorted by (source, target)."""
    coords = _as_grid_coords(coords)
    n = coords.shape[0]
    if n == 0:
        return np.zeros((2, 0), dtype=np.int64)
    keys, width = _cell_keys(coords)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    duplicate = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    if duplicate.size:
        cell = coords[order[duplicate[0]]].tolist()
        raise InvalidInputError(
            f"two tiles share the grid cell (y, x) = {cell}; coords must be unique grid units "
            "(level-0 pixels // tile stride): check the tile stride"
        )
    sources, targets = [], []
    for dy, dx in offsets:
        wanted = keys + dy * width + dx  # (N,)
        pos = np.minimum(np.searchsorted(sorted_keys, wanted), n - 1)
        found = sorted_keys[pos] == wanted
        sources.append(np.flatnonzero(found))
        targets.append(order[pos[found]])
    if self_loops:
        sources.append(np.arange(n))
        targets.append(np.arange(n))
    src = np.concatenate(sources).astype(np.int64)
    dst = np.concatenate(targets).astype(np.int64)
    edge_order = np.argsort(src * n + dst, kind="stable")  # keys are unique: the order is canonical
    return np.stack([src[edge_order], dst[edge_order]])


def _symmetric_weights(edge_index: np.ndarray, n: int) -> np.ndarray:
    """w_ij = 1 / sqrt(d_i d_j) in float64, rounded once to float32."""
    degree = np.bincount(edge_index[0], minlength=n).astype(np.float64)  # (N,)
    return (1.0 / np.sqrt(degree[edge_index[0]] * degree[edge_index[1]])).astype(np.float32)


def _normalised(coords: np.ndarray, offsets, self_loops: bool, lone_self_loop: bool) -> tuple[np.ndarray, np.ndarray]:
    edge_index = _grid_edges(coords, offsets, bool(self_loops))
    if lone_self_loop and len(coords) == 1 and edge_index.shape[1] == 0:  # torchmil's datasets do this
        return np.zeros((2, 1), dtype=np.int64), np.ones(1, dtype=np.float32)
    return edge_index, _symmetric_weights(edge_index, len(coords))


def grid8(coords: np.ndarray, *, self_loops: bool = False, lone_self_loop: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """8-neighbourhood graph on grid coords, symmetric normalisation."""
    return _normalised(coords, GRID8_OFFSETS, self_loops, lone_self_loop)


def grid4(coords: np.ndarray, *, self_loops: bool = False, lone_self_loop: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """4-neighbourhood (shared sides) graph on grid coords, symmetric normalisation."""
    return _normalised(coords, GRID4_OFFSETS, self_loops, lone_self_loop)


GRAPH_RULES: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {"grid8": grid8, "grid4": grid4}


def _rule(rule: str, params: dict) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    if rule not in GRAPH_RULES:
        raise ModelFormatError(
            f"unknown graph rule {rule!r}; this milkit knows {sorted(GRAPH_RULES)}: upgrade milkit"
        )
    fn = GRAPH_RULES[rule]
    known = [p for p in inspect.signature(fn).parameters if p != "coords"]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ModelFormatError(f"graph rule {rule!r} has no parameter {unknown}; it takes {known}")
    return fn


def build_graph(coords: np.ndarray, rule: str = "grid8", **params) -> tuple[np.ndarray, np.ndarray]:
    """Edges of one bag: (edge_index int64 (2, E), edge_weight float32 (E,)), nodes = rows of coords."""
    return _rule(rule, params)(coords, **params)


def batch_graph(
    coords: np.ndarray, mask: np.ndarray | None = None, rule: str = "grid8", **params
) -> tuple[np.ndarray, np.ndarray]:
    """Edges of a padded batch in the flattened (B * N) node space; padded slots get no edges.

    coords (B, N, 2), mask (B, N) bool with True = real tile (None: all real). Bag b's edges come
    after bag a's for a < b, each bag's sorted by (source, target).
    """
    coords = np.asarray(coords)
    if coords.ndim != 3 or coords.shape[2] != 2:
        raise InvalidInputError(f"batched coords must have shape (B, N, 2), got {coords.shape}")
    n_bags, n_max = coords.shape[:2]
    mask = np.ones((n_bags, n_max), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != (n_bags, n_max):
        raise InvalidInputError(f"mask shape {mask.shape} does not match coords {coords.shape[:2]}")
    fn = _rule(rule, params)
    edges, weights = [np.zeros((2, 0), np.int64)], [np.zeros((0,), np.float32)]
    for b in range(n_bags):
        real = np.flatnonzero(mask[b])  # padded positions of the real tiles
        edge_index, edge_weight = fn(coords[b, real], **params)
        edges.append(real[edge_index] + b * n_max)
        weights.append(edge_weight)
    return np.concatenate(edges, axis=1).astype(np.int64), np.concatenate(weights)
