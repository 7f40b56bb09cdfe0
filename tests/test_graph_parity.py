"""The runtime's numpy graph rules build exactly the training side's torch graphs.

Truth: a dense O(N^2) Chebyshev-distance adjacency on small cases, and hand-computed weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mil_runtime import graphs as np_graphs
from mil_runtime.errors import InvalidInputError, ModelFormatError
from mil_train.data import graphs as torch_graphs


def grid(height: int, width: int) -> np.ndarray:
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([ys, xs], axis=-1).reshape(-1, 2).astype(np.int64)


def holey_grid(seed: int, side: int, keep: float, offset: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coords = grid(side, side)
    coords = coords[rng.random(len(coords)) < keep] + offset
    return coords[rng.permutation(len(coords))]  # tiles in no particular order


def assert_same(coords: np.ndarray, **params) -> tuple[np.ndarray, np.ndarray]:
    edge_index, edge_weight = np_graphs.build_graph(coords, **params)
    t_index, t_weight = torch_graphs.build_graph(torch.from_numpy(coords), **params)
    assert edge_index.dtype == np.int64 and edge_weight.dtype == np.float32
    assert t_index.dtype == torch.int64 and t_weight.dtype == torch.float32
    np.testing.assert_array_equal(t_index.numpy(), edge_index)
    np.testing.assert_allclose(t_weight.numpy(), edge_weight, rtol=0, atol=1e-7)
    return edge_index, edge_weight


def dense_reference(coords: np.ndarray, rule: str, self_loops: bool) -> tuple[np.ndarray, np.ndarray]:
    """O(N^2) truth: adjacency from pairwise offsets, D^-1/2 A D^-1/2, edges in (source, target) order."""
    diff = np.abs(coords[:, None, :] - coords[None, :, :])  # (N, N, 2)
    adjacency = diff.max(-1) == 1 if rule == "grid8" else diff.sum(-1) == 1
    if self_loops:
        adjacency |= np.eye(len(coords), dtype=bool)
    degree = adjacency.sum(1)
    src, dst = np.nonzero(adjacency)  # row-major: sorted by (source, target)
    return np.stack([src, dst]), 1.0 / np.sqrt(degree[src] * degree[dst])


@pytest.mark.parametrize("rule", ["grid8", "grid4"])
@pytest.mark.parametrize("self_loops", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_holes_match_dense_truth(rule, self_loops, seed):
    coords = holey_grid(seed, side=17, keep=0.6, offset=-5)  # negative coords too
    edge_index, edge_weight = assert_same(coords, rule=rule, self_loops=self_loops)
    ref_index, ref_weight = dense_reference(coords, rule, self_loops)
    np.testing.assert_array_equal(edge_index, ref_index)
    np.testing.assert_allclose(edge_weight, ref_weight, rtol=0, atol=1e-7)


def test_full_grid_and_large_bag():
    edge_index, _ = assert_same(grid(20, 31))
    assert edge_index.shape[1] == 2 * (20 * 30 + 19 * 31 + 2 * 19 * 30)  # h, v, two diagonals; both ways
    coords = holey_grid(3, side=380, keep=0.7)  # ~100k tiles
    assert len(coords) > 100_000
    edge_index, edge_weight = assert_same(coords)
    assert np.all(edge_index[0] != edge_index[1])
    assert np.all(edge_weight > 0) and np.all(edge_weight <= 1)


def test_single_tile_and_empty():
    edge_index, edge_weight = assert_same(np.array([[7, 3]]))
    assert edge_index.shape == (2, 0) and edge_weight.shape == (0,)
    edge_index, edge_weight = assert_same(np.array([[7, 3]]), self_loops=True)
    np.testing.assert_array_equal(edge_index, [[0], [0]])
    np.testing.assert_array_equal(edge_weight, [1.0])
    edge_index, _ = assert_same(np.zeros((0, 2), dtype=np.int64))
    assert edge_index.shape == (2, 0)


def test_hand_computed_2x2_and_3x1():
    # 2x2: every tile touches the other three (d = 3), so 12 edges of weight 1/3.
    edge_index, edge_weight = assert_same(np.array([[0, 0], [0, 1], [1, 0], [1, 1]]))
    assert edge_index.shape == (2, 12)
    np.testing.assert_allclose(edge_weight, np.full(12, 1 / 3, np.float32), rtol=0, atol=1e-7)
    # 3x1 column: 0-1-2, degrees 1, 2, 1 -> 4 edges of weight 1/sqrt(2).
    column = np.array([[2, 5], [0, 5], [1, 5]])  # rows 2, 0, 1: node 2 sits in the middle
    edge_index, edge_weight = assert_same(column)
    np.testing.assert_array_equal(edge_index, [[0, 1, 2, 2], [2, 2, 0, 1]])
    np.testing.assert_allclose(edge_weight, np.full(4, 2**-0.5), rtol=0, atol=1e-7)
    # with self loops: degrees 2, 2, 3
    edge_index, edge_weight = assert_same(column, self_loops=True)
    np.testing.assert_array_equal(edge_index, [[0, 0, 1, 1, 2, 2, 2], [0, 2, 1, 2, 0, 1, 2]])
    expected = [1 / 2, 1 / 6**0.5, 1 / 2, 1 / 6**0.5, 1 / 6**0.5, 1 / 6**0.5, 1 / 3]
    np.testing.assert_allclose(edge_weight, expected, rtol=0, atol=1e-7)


def test_padded_batch():
    bags = [holey_grid(10, 6, 0.7), np.array([[4, 4]]), grid(3, 3), holey_grid(11, 5, 0.5)]
    n_max = max(len(b) for b in bags)
    coords = np.zeros((len(bags), n_max, 2), np.int64)
    mask = np.zeros((len(bags), n_max), bool)
    for b, bag in enumerate(bags):
        coords[b, : len(bag)] = bag
        mask[b, : len(bag)] = True
    mask[3, 0], coords[3, 0] = False, 0  # a hole inside a bag: that slot must get no edges
    edge_index, edge_weight = np_graphs.batch_graph(coords, mask, "grid8")
    t_index, t_weight = torch_graphs.batch_graph(torch.from_numpy(coords), torch.from_numpy(mask), "grid8")
    np.testing.assert_array_equal(t_index.numpy(), edge_index)
    np.testing.assert_allclose(t_weight.numpy(), edge_weight, rtol=0, atol=1e-7)
    # the batch is the per-bag graphs, offset into the flattened (B * N_max) node space
    pieces = []
    for b in range(len(bags)):
        real = np.flatnonzero(mask[b])
        ei, _ = np_graphs.build_graph(coords[b, real])
        pieces.append(real[ei] + b * n_max)
    np.testing.assert_array_equal(edge_index, np.concatenate(pieces, axis=1))
    assert not np.isin(3 * n_max, edge_index)  # the masked slot
    assert np.all(mask.reshape(-1)[edge_index])


def test_refusals():
    with pytest.raises(InvalidInputError, match="share the grid cell"):
        np_graphs.build_graph(np.array([[0, 0], [0, 1], [0, 0]]))
    with pytest.raises(ValueError, match="share the grid cell"):
        torch_graphs.build_graph(torch.tensor([[0, 0], [0, 1], [0, 0]]))
    with pytest.raises(ModelFormatError, match="unknown graph rule"):
        np_graphs.build_graph(grid(2, 2), rule="knn")
    with pytest.raises(ValueError, match="no parameter"):
        torch_graphs.build_graph(grid(2, 2), rule="grid8", radius=2)
    with pytest.raises(InvalidInputError, match="whole grid units"):
        np_graphs.build_graph(np.array([[0.5, 0.0]]))
    assert set(np_graphs.GRAPH_RULES) == set(torch_graphs.GRAPH_RULES)


def torchmil_dataset_graph(coords: np.ndarray) -> np.ndarray:
    """torchmil 1.0.2's own dataset graph for one bag (ProcessedMILDataset._build_adj, default settings), dense."""
    from types import SimpleNamespace

    datasets = pytest.importorskip("torchmil.datasets.processed_mil_dataset")
    settings = SimpleNamespace(adj_with_dist=False, dist_thr=1.5)  # the dataset's defaults
    bag = {"coords": coords.astype(np.float64), "X": None}
    edge_index, _, weight = datasets.ProcessedMILDataset._build_adj(settings, bag)
    dense = np.zeros((len(coords), len(coords)))
    dense[edge_index[0], edge_index[1]] = weight
    return dense


@pytest.mark.parametrize("coords", [holey_grid(0, side=13, keep=0.7), holey_grid(1, side=9, keep=0.5, offset=4),
                                    np.array([[3, 5]]), np.array([[0, 0], [5, 5]])],
                         ids=["holes", "holes-offset", "one tile", "two apart"])
def test_lone_self_loop_grid8_is_torchmils_dataset_graph(coords):
    edge_index, edge_weight = assert_same(coords, rule="grid8", lone_self_loop=True)
    ours = np.zeros((len(coords), len(coords)))
    ours[edge_index[0], edge_index[1]] = edge_weight
    np.testing.assert_allclose(ours, torchmil_dataset_graph(coords), rtol=0, atol=1e-6)
    assert edge_index.shape[1] == np.count_nonzero(torchmil_dataset_graph(coords))
    if len(coords) > 1:  # only a one-tile bag gets a self loop
        assert not np.any(edge_index[0] == edge_index[1])
    key = edge_index[0] * len(coords) + edge_index[1]
    assert np.all(np.diff(key) > 0), "edges sorted by (source, target)"
