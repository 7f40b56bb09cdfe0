"""`MILDataset`: bags held in memory, optionally given a graph built from their coords."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tensordict import TensorDict
from torch.utils.data import Dataset

from mil_train.data.graphs import build_graph

GraphSpec = str | dict[str, Any] | None


def graph_spec(graph_rule: GraphSpec) -> tuple[str, dict[str, Any]] | None:
    """(rule, params) from a rule name, a model's `graph_rule` dict {"rule", "params"}, or None."""
    if graph_rule is None:
        return None
    if isinstance(graph_rule, str):
        return graph_rule, {}
    if isinstance(graph_rule, dict) and "rule" in graph_rule:
        return graph_rule["rule"], dict(graph_rule.get("params") or {})
    raise ValueError(f"graph_rule must be a rule name or {{'rule': ..., 'params': ...}}, got {graph_rule!r}")


def with_graph(bag: TensorDict, graph_rule: GraphSpec) -> TensorDict:
    """The bag with edge_index / edge_weight built from its coords by the named rule.

    A bag that already has an edge_index is returned as it is; no rule returns the bag unchanged.
    """
    spec = graph_spec(graph_rule)
    if spec is None or "edge_index" in bag.keys():
        return bag
    if "coords" not in bag.keys():
        raise ValueError(f"graph rule {spec[0]!r} needs coords, and this bag has none")
    edge_index, edge_weight = build_graph(bag["coords"], spec[0], **spec[1])
    out = bag.clone(recurse=False)
    out["edge_index"], out["edge_weight"] = edge_index, edge_weight  # (2, E), (E,)
    return out


class MILDataset(Dataset):
    """A torch Dataset over in-memory bags (from `make_bag`, a reader or `synthetic_bags`).

    Args:
        bags: the bags, each a TensorDict with batch_size [].
        graph_rule: None, a rule name ("grid8") or a model's `graph_rule` dict; bags without a graph
            get one built from their coords, once, on first access.
    """

    def __init__(self, bags: Sequence[TensorDict], graph_rule: GraphSpec = None) -> None:
        self.bags = list(bags)
        self.graph_rule = graph_rule
        graph_spec(graph_rule)  # refuse a malformed spec now, not at the first batch
        self._with_graph: dict[int, TensorDict] = {}

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> TensorDict:
        if self.graph_rule is None:
            return self.bags[index]
        if index not in self._with_graph:
            self._with_graph[index] = with_graph(self.bags[index], self.graph_rule)
        return self._with_graph[index]

    def labels(self):
        """Bag labels in order (for stratified splits)."""
        return [bag["Y"] for bag in self.bags]
