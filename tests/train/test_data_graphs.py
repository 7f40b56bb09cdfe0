"""Graphs on bags: the hand-counted 3x3 grid, and graphs attached by MILDataset."""

from __future__ import annotations

import torch

from mil_train.data import GRAPH_RULES, MILDataset, build_graph, make_bag


def grid_3x3() -> torch.Tensor:
    return torch.tensor([[y, x] for y in range(3) for x in range(3)])


def test_3x3_grid_has_40_directed_edges():
    # 4 corners x 3 neighbours + 4 sides x 5 + the centre's 8 = 40
    edge_index, edge_weight = build_graph(grid_3x3(), "grid8")
    assert edge_index.shape == (2, 40)
    degree = torch.bincount(edge_index[0], minlength=9)
    assert degree.tolist() == [3, 5, 3, 5, 8, 5, 3, 5, 3]
    centre_to_corner = (edge_index[0] == 4) & (edge_index[1] == 0)
    assert torch.allclose(edge_weight[centre_to_corner], torch.tensor([1 / 24**0.5]))
    reverse = {tuple(e) for e in edge_index.T.tolist()}
    assert all((j, i) in reverse for i, j in reverse)  # symmetric
    assert build_graph(grid_3x3(), "grid8", self_loops=True)[0].shape == (2, 49)
    assert build_graph(grid_3x3(), "grid4")[0].shape == (2, 24)
    assert set(GRAPH_RULES) >= {"grid8", "grid4"}


def test_dataset_attaches_the_rule_a_model_names():
    bag = make_bag(torch.randn(9, 4), 1.0, coords=grid_3x3())
    spec = {"rule": "grid8", "params": {"self_loops": True}}  # as MILModel.graph_rule gives it
    out = MILDataset([bag], graph_rule=spec)[0]
    expected_index, expected_weight = build_graph(grid_3x3(), "grid8", self_loops=True)
    assert torch.equal(out["edge_index"], expected_index)
    assert torch.equal(out["edge_weight"], expected_weight)
    assert "edge_index" not in bag.keys()  # the stored bag is left alone
    assert "edge_index" not in MILDataset([bag])[0].keys()
