"""`collate`: pad a list of bags into one batch (DESIGN.md section 2); a DataLoader `collate_fn`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDict


def _pad(values: Sequence[torch.Tensor], n_max: int, fill) -> torch.Tensor:
    """Stack (N_b, ...) tensors into (B, n_max, ...), filling the tail of each bag with `fill`.

    One bag needs no padding: it is returned as a (1, N, ...) view of the bag, not a copy (the bag's
    features are the largest tensor of a step, and copying them cost 8 % of an ABMIL epoch)."""
    first = values[0]
    if len(values) == 1 and first.shape[0] == n_max:
        return first.unsqueeze(0)
    out = torch.full((len(values), n_max, *first.shape[1:]), fill, dtype=first.dtype, device=first.device)
    for b, value in enumerate(values):
        out[b, : value.shape[0]] = value
    return out


def _all_or_none(bags: Sequence[TensorDict], key: str) -> bool:
    present = [key in bag.keys() for bag in bags]
    if any(present) and not all(present):
        missing = [i for i, p in enumerate(present) if not p]
        raise ValueError(f"bags {missing} have no {key!r} while others do; give every bag in a batch the same keys")
    return all(present)


def _check_same(bags: Sequence[TensorDict], key: str, shape_of) -> None:
    shapes = {tuple(shape_of(bag[key])) for bag in bags}
    if len(shapes) > 1:
        raise ValueError(f"bags disagree on the shape of {key!r}: {sorted(shapes)}")


def _batched_graph(bags: Sequence[TensorDict], n_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each bag's edges shifted by b * n_max: one edge list over the flattened (B * n_max) nodes."""
    edges, weights = [], []
    for b, bag in enumerate(bags):
        edge_index = bag["edge_index"]  # (2, E_b)
        edges.append(edge_index + b * n_max)
        weight = bag.get("edge_weight", None)
        weights.append(torch.ones(edge_index.shape[1]) if weight is None else weight.float())
    return torch.cat(edges, dim=1), torch.cat(weights)  # (2, E), (E,)


def collate(bags: Sequence[TensorDict]) -> TensorDict:
    """Pad bags to the largest one; use as `DataLoader(..., collate_fn=collate)`.

    Returns a TensorDict with batch_size [] (not [B]) holding:
      X           (B, N_max, D)  zeros on padding
      Y           (B,) or (B, C) stacked bag labels
      mask        (B, N_max)     bool, True = real instance
      y_inst      (B, N_max)     -1 on padding
      coords      (B, N_max, 2)  0 on padding; only when every bag has coords
      edge_index  (2, E)         only when every bag has a graph: bag b's node i is b * N_max + i
      edge_weight (E,)
    batch_size is [] because the edge list has no batch axis, and a TensorDict with batch_size [B]
    cannot hold (2, E) tensors; with [] every entry is a plain tensor, so `batch["X"]`,
    `batch.get("edge_index")` and `batch.to(device)` behave as usual. The batch size is
    `batch["X"].shape[0]`.
    """
    if len(bags) == 0:
        raise ValueError("collate got no bags")
    n_max = max(bag["X"].shape[0] for bag in bags)
    _check_same(bags, "X", lambda x: x.shape[1:])
    _check_same(bags, "Y", lambda y: y.shape)
    entries = {
        "X": _pad([bag["X"] for bag in bags], n_max, 0),  # (B, N_max, D)
        "Y": torch.stack([bag["Y"] for bag in bags]),  # (B,) or (B, C)
        "mask": _pad([torch.ones(bag["X"].shape[0], dtype=torch.bool) for bag in bags], n_max, False),
        "y_inst": _pad([_instance_labels(bag) for bag in bags], n_max, -1),  # (B, N_max)
    }
    if _all_or_none(bags, "coords"):
        entries["coords"] = _pad([bag["coords"] for bag in bags], n_max, 0)  # (B, N_max, 2)
    if _all_or_none(bags, "edge_index"):
        entries["edge_index"], entries["edge_weight"] = _batched_graph(bags, n_max)
    return TensorDict(entries, batch_size=[])


def _instance_labels(bag: TensorDict) -> torch.Tensor:
    y_inst = bag.get("y_inst", None)
    if y_inst is None:
        return torch.full((bag["X"].shape[0],), -1, dtype=torch.long)
    return y_inst.long()
