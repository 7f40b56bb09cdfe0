"""`make_bag`: one MIL bag as a TensorDict with validated shapes (DESIGN.md section 2).

The TensorDict has batch_size [] so bags of different sizes N are ordinary, independent objects;
`collate` pads them into a batch.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict


def _tensor(name: str, value) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} cannot be turned into a tensor: {exc}") from None


def _features(X) -> torch.Tensor:
    X = _tensor("X", X)
    if X.ndim not in (2, 4):
        raise ValueError(f"X must be (N, D) features or (N, C, H, W) images, got shape {tuple(X.shape)}")
    if X.shape[0] == 0:
        raise ValueError("X has no instances (N = 0); a bag needs at least one")
    if not X.is_floating_point():
        if X.ndim == 2:
            raise ValueError(f"X features must be floating point, got {X.dtype}")
        return X  # uint8 images stay as they are; the feature extractor normalises them
    return X.float()


def _bag_label(Y) -> torch.Tensor:
    Y = _tensor("Y", Y)
    if Y.ndim > 1:
        raise ValueError(f"Y must be a scalar or a (C,) vector, got shape {tuple(Y.shape)}")
    return Y


def _instance_labels(y_inst, n: int) -> torch.Tensor:
    if y_inst is None:
        return torch.full((n,), -1, dtype=torch.long)
    y_inst = _tensor("y_inst", y_inst)
    if y_inst.ndim == 2 and y_inst.shape[1] == 1:
        y_inst = y_inst[:, 0]  # (N, 1) as some files store it
    if tuple(y_inst.shape) != (n,):
        raise ValueError(f"y_inst must have shape ({n},) to match X, got {tuple(y_inst.shape)}")
    return y_inst.long()


def _grid_coords(coords, n: int) -> torch.Tensor:
    coords = _tensor("coords", coords)
    if tuple(coords.shape) != (n, 2):
        raise ValueError(f"coords must have shape ({n}, 2) in (y, x) grid units, got {tuple(coords.shape)}")
    if coords.is_floating_point() and not bool(torch.all(coords == torch.round(coords))):
        raise ValueError("coords must be whole grid units (level-0 pixels // tile stride), not fractions")
    return coords.long()


def _graph(edge_index, edge_weight, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    edge_index = _tensor("edge_index", edge_index).long()
    if edge_index.ndim != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape (2, E), got {tuple(edge_index.shape)}")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= n):
        raise ValueError(f"edge_index refers to nodes outside 0..{n - 1}")
    n_edges = edge_index.shape[1]
    if edge_weight is None:
        return edge_index, torch.ones(n_edges, dtype=torch.float32)
    edge_weight = _tensor("edge_weight", edge_weight).float()
    if tuple(edge_weight.shape) != (n_edges,):
        shape = tuple(edge_weight.shape)
        raise ValueError(f"edge_weight must have shape ({n_edges},) to match edge_index, got {shape}")
    return edge_index, edge_weight


def make_bag(X, Y, *, y_inst=None, coords=None, edge_index=None, edge_weight=None) -> TensorDict:
    """A bag: X (N, D) float32, Y () or (C,), y_inst (N,) int64 (-1 = unknown), optional coords (N, 2)
    int64 (y, x) grid units, optional edge_index (2, E) int64 and edge_weight (E,) float32 (ones when
    only edge_index is given). Raises ValueError naming the wrong shape."""
    X = _features(X)  # (N, D)
    n = X.shape[0]
    entries = {"X": X, "Y": _bag_label(Y), "y_inst": _instance_labels(y_inst, n)}
    if coords is not None:
        entries["coords"] = _grid_coords(coords, n)  # (N, 2)
    if edge_index is not None:
        entries["edge_index"], entries["edge_weight"] = _graph(edge_index, edge_weight, n)
    elif edge_weight is not None:
        raise ValueError("edge_weight given without edge_index")
    return TensorDict(entries, batch_size=[])
