"""synthetic_bags: labels agree with the planted instances; witnesses shifted and spatially clustered."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mil_train.data import synthetic_bags


def test_labels_sizes_and_witnesses():
    bags = synthetic_bags(40, feature_dim=16, bag_size=(10, 30), positive_fraction=0.25, witness_fraction=0.2)
    assert sum(int(b["Y"]) for b in bags) == 10
    for bag in bags:
        n = bag["X"].shape[0]
        assert 10 <= n <= 30 and bag["X"].shape[1] == 16
        assert bag["Y"].item() == bag["y_inst"].max().item()  # positive iff it holds a witness
        if bag["Y"] == 1:
            assert bag["y_inst"].sum().item() == max(1, round(0.2 * n))
    X = torch.cat([b["X"] for b in bags])
    y = torch.cat([b["y_inst"] for b in bags])
    shift = X[y == 1].mean(0) - X[y == 0].mean(0)  # (D,)
    assert shift[:4].min() > 1.3  # the planted dims moved by ~2
    assert shift[4:].abs().max() < 0.6  # the others did not


def test_seeded_and_refusals():
    a, b = synthetic_bags(3, seed=5), synthetic_bags(3, seed=5)
    assert all(torch.equal(x["X"], y["X"]) for x, y in zip(a, b))
    assert not torch.equal(synthetic_bags(1, seed=6)[0]["X"][:5], a[0]["X"][:5])
    with pytest.raises(ValueError, match="bag_size"):
        synthetic_bags(2, bag_size=(5, 3))
    with pytest.raises(ValueError, match="positive_fraction"):
        synthetic_bags(2, positive_fraction=1.5)


def mean_pairwise_distance(coords: np.ndarray) -> float:
    diff = coords[:, None, :] - coords[None, :, :]
    return float(np.sqrt((diff**2).sum(-1)).sum() / max(len(coords) * (len(coords) - 1), 1))


def test_coords_unique_and_witnesses_clustered():
    bags = synthetic_bags(30, bag_size=(40, 80), positive_fraction=1.0, witness_fraction=0.15, with_coords=True)
    rng = np.random.default_rng(0)
    witness_spread, random_spread = [], []
    for bag in bags:
        coords = bag["coords"].numpy()
        assert len(np.unique(coords, axis=0)) == len(coords)
        witnesses = bag["y_inst"].numpy() == 1
        witness_spread.append(mean_pairwise_distance(coords[witnesses]))
        random_spread.append(mean_pairwise_distance(coords[rng.permutation(witnesses)]))
    assert np.mean(witness_spread) < 0.6 * np.mean(random_spread)
