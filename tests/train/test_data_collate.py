"""collate: padding, mask and edge offsets against a hand-computed batch."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from mil_train.data import MILDataset, batch_graph, build_graph, collate, make_bag, synthetic_bags


def small_bags():
    a = make_bag(
        torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        1.0,
        y_inst=[1, 0],
        coords=[[0, 0], [0, 1]],
        edge_index=[[0, 1], [1, 0]],
        edge_weight=[0.5, 0.5],
    )
    b = make_bag(
        torch.tensor([[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]),
        0.0,
        coords=[[2, 2], [9, 9], [3, 3]],
        edge_index=[[0, 2], [2, 0]],
        edge_weight=[0.25, 0.75],
    )
    return [a, b]


def test_hand_computed_batch():
    batch = collate(small_bags())
    assert batch["X"].tolist() == [
        [[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]],
        [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]],
    ]
    assert batch["mask"].dtype == torch.bool
    assert batch["mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["Y"].tolist() == [1.0, 0.0]
    assert batch["y_inst"].tolist() == [[1, 0, -1], [-1, -1, -1]]
    assert batch["coords"].tolist() == [[[0, 0], [0, 1], [0, 0]], [[2, 2], [9, 9], [3, 3]]]
    # bag 1's node i is 1 * N_max + i = 3 + i in the flattened (2 * 3) node space
    assert batch["edge_index"].tolist() == [[0, 1, 3, 5], [1, 0, 5, 3]]
    assert batch["edge_weight"].tolist() == [0.5, 0.5, 0.25, 0.75]


def test_flattened_edges_address_the_right_features():
    bags = synthetic_bags(5, feature_dim=4, bag_size=(3, 12), with_coords=True, seed=2)
    bags = [make_bag(b["X"], b["Y"], coords=b["coords"], edge_index=build_graph(b["coords"])[0]) for b in bags]
    batch = collate(bags)
    flat = batch["X"].reshape(-1, 4)  # (B * N_max, D)
    n_max = batch["X"].shape[1]
    expected = torch.cat([bag["X"][bag["edge_index"][0]] for bag in bags])
    assert torch.equal(flat[batch["edge_index"][0]], expected)
    assert batch["mask"].reshape(-1)[batch["edge_index"]].all()
    assert int(batch["edge_index"].max()) < len(bags) * n_max


def test_collated_graph_equals_batch_graph():
    bags = synthetic_bags(4, bag_size=(5, 20), with_coords=True, seed=1)
    batch = collate(MILDataset(bags, graph_rule="grid8"))
    edge_index, edge_weight = batch_graph(batch["coords"], batch["mask"], "grid8")
    assert torch.equal(batch["edge_index"], edge_index)
    assert torch.equal(batch["edge_weight"], edge_weight)


def test_dataloader_and_no_graph():
    loader = DataLoader(MILDataset(synthetic_bags(7, seed=3)), batch_size=3, collate_fn=collate)
    batches = list(loader)
    assert [b["X"].shape[0] for b in batches] == [3, 3, 1]
    batch = batches[0].to("cpu")
    assert batch.get("edge_index") is None and batch.get("coords") is None
    assert batch["mask"].sum().item() == sum(len(b["X"]) for b in synthetic_bags(7, seed=3)[:3])


def test_vector_labels_and_refusals():
    bags = [make_bag(torch.zeros(2, 3), [1.0, 0.0]), make_bag(torch.zeros(4, 3), [0.0, 1.0])]
    assert collate(bags)["Y"].shape == (2, 2)
    with pytest.raises(ValueError, match="no 'coords'"):
        collate([make_bag(torch.zeros(2, 3), 1.0, coords=[[0, 0], [0, 1]]), make_bag(torch.zeros(2, 3), 0.0)])
    with pytest.raises(ValueError, match="shape of 'X'"):
        collate([make_bag(torch.zeros(2, 3), 1.0), make_bag(torch.zeros(2, 4), 0.0)])
    with pytest.raises(ValueError, match="no bags"):
        collate([])


def test_a_one_bag_batch_is_a_view_of_the_bag_not_a_copy():
    bag = make_bag(torch.randn(7, 3), torch.tensor(1.0), coords=torch.arange(14).reshape(7, 2))
    batch = collate([bag])
    assert batch["X"].shape == (1, 7, 3) and batch["X"].data_ptr() == bag["X"].data_ptr()
    assert batch["coords"].data_ptr() == bag["coords"].data_ptr()
    assert batch["mask"].all() and torch.equal(batch["X"][0], bag["X"])
    two = collate([bag, make_bag(torch.randn(4, 3), torch.tensor(0.0), coords=torch.zeros(4, 2, dtype=torch.long))])
    assert two["X"].data_ptr() != bag["X"].data_ptr() and torch.equal(two["X"][0], bag["X"])  # padded: a copy
