"""seq_to_spatial / spatial_to_seq against torchmil 1.0.2's, on batches padded by torchmil's own collate,
against hand-written grids, numpy against torch, and the masked form (a bag alone equals the bag padded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mil_train.data import seq_to_spatial, spatial_to_seq

tm_representations = pytest.importorskip("torchmil.data.representations")
tm_collate = pytest.importorskip("torchmil.data.collate")


def unique_coords(n_rows: int, sides: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """(n_rows, len(sides)) distinct cells of a grid with those sides."""
    cells = torch.randperm(int(np.prod(sides)), generator=generator)[:n_rows]  # (n_rows,)
    axes = []
    for side in reversed(sides):
        axes.append(cells % side)
        cells = cells // side
    return torch.stack(axes[::-1], dim=-1)  # (n_rows, n)


def torchmil_batch(sizes, sides, dim: int = 3, seed: int = 0):
    """Bags with distinct cells each, padded by torchmil's collate_fn (coords and X padded with 0)."""
    generator = torch.Generator().manual_seed(seed)
    bags = [{"X": torch.randn(n, dim, generator=generator), "coords": unique_coords(n, sides, generator)}
            for n in sizes]
    batch = tm_collate.collate_fn(bags)
    return batch["X"], batch["coords"], batch["mask"].bool(), bags


@pytest.mark.parametrize("sides", [(4, 5), (3, 4, 2)])
def test_equals_torchmil_on_its_padded_batches(sides):
    X, coords, mask, _ = torchmil_batch((7, 3, 12), sides)
    spatial = seq_to_spatial(X, coords)
    expected = tm_representations.seq_to_spatial(X, coords)
    assert spatial.shape == expected.shape
    assert torch.equal(spatial, expected)  # padded rows at cell 0 included
    assert torch.equal(spatial_to_seq(spatial, coords), tm_representations.spatial_to_seq(expected, coords))


def test_two_rows_in_one_cell_the_later_wins_as_in_torchmil():
    X = torch.arange(12.0).reshape(1, 4, 3)  # (1, 4, 3)
    coords = torch.tensor([[[1, 0], [0, 1], [1, 0], [0, 1]]])  # rows 0 and 2 share (1, 0), 1 and 3 (0, 1)
    spatial = seq_to_spatial(X, coords)
    assert torch.equal(spatial[0, 1, 0], X[0, 2]) and torch.equal(spatial[0, 0, 1], X[0, 3])
    assert torch.equal(spatial, tm_representations.seq_to_spatial(X, coords))
    assert np.array_equal(seq_to_spatial(X.numpy(), coords.numpy()), spatial.numpy())


def test_a_hand_written_grid_and_volume():
    X = torch.tensor([[[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]]])  # (1, 3, 2)
    coords = torch.tensor([[[0, 2], [1, 0], [1, 1]]])  # (1, 3, 2)
    expected = torch.zeros(1, 2, 3, 2)
    expected[0, 0, 2] = torch.tensor([1.0, 10.0])
    expected[0, 1, 0] = torch.tensor([2.0, 20.0])
    expected[0, 1, 1] = torch.tensor([3.0, 30.0])
    assert torch.equal(seq_to_spatial(X, coords), expected)
    volume = seq_to_spatial(X, torch.tensor([[[0, 0, 1], [2, 1, 0], [0, 1, 1]]]))
    assert volume.shape == (1, 3, 2, 2, 2)
    assert volume[0, 0, 0, 1].tolist() == [1.0, 10.0] and volume[0, 2, 1, 0].tolist() == [2.0, 20.0]
    assert volume[0, 0, 1, 1].tolist() == [3.0, 30.0] and int((volume != 0).any(-1).sum()) == 3


@pytest.mark.parametrize("sides", [(4, 5), (3, 4, 2)])
@pytest.mark.parametrize("masked", [False, True])
def test_numpy_equals_torch(sides, masked):
    X, coords, mask, _ = torchmil_batch((6, 2, 9), sides, seed=1)
    given = {"mask": mask} if masked else {}
    spatial = seq_to_spatial(X, coords, **given)
    from_numpy = seq_to_spatial(X.numpy(), coords.numpy(), **({"mask": mask.numpy()} if masked else {}))
    assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.float32
    assert np.array_equal(from_numpy, spatial.numpy())
    rows = spatial_to_seq(spatial, coords, **given)
    rows_numpy = spatial_to_seq(from_numpy, coords.numpy(), **({"mask": mask.numpy()} if masked else {}))
    assert isinstance(rows_numpy, np.ndarray) and np.array_equal(rows_numpy, rows.numpy())


@pytest.mark.parametrize("sides", [(4, 5), (3, 4, 2)])
def test_masked_bag_in_a_batch_equals_torchmil_on_the_bag_alone(sides):
    X, coords, mask, bags = torchmil_batch((7, 3, 12), sides, seed=2)
    X = torch.where(mask[..., None], X, torch.tensor(1e30))  # padding must not reach any cell
    coords = torch.where(mask[..., None], coords, torch.tensor(10_000))  # nor size the grid
    spatial = seq_to_spatial(X, coords, mask=mask)
    assert spatial.shape[1:-1] == tuple(int(coords[mask][:, k].max()) + 1 for k in range(len(sides)))
    for b, bag in enumerate(bags):
        alone = tm_representations.seq_to_spatial(bag["X"][None], bag["coords"][None])[0]
        window = spatial[(b, *[slice(0, s) for s in alone.shape[:-1]])]
        assert torch.equal(window, alone)
        assert float(spatial[b].abs().sum()) == pytest.approx(float(alone.abs().sum()))  # nothing else written
    rows = spatial_to_seq(spatial, coords, mask=mask)
    assert torch.equal(rows[mask], X[mask]) and bool((rows[~mask] == 0).all())


def test_torchmil_padding_overwrites_a_tile_at_the_origin_and_the_mask_keeps_it():
    X = torch.tensor([[[5.0], [6.0]], [[7.0], [0.0]]])  # (2, 2, 1); bag 1's second row is padding
    coords = torch.tensor([[[1, 1], [0, 1]], [[0, 0], [0, 0]]])  # bag 1's real tile sits at (0, 0)
    mask = torch.tensor([[True, True], [True, False]])
    assert float(tm_representations.seq_to_spatial(X, coords)[1, 0, 0, 0]) == 0.0
    assert float(seq_to_spatial(X, coords)[1, 0, 0, 0]) == 0.0  # torchmil's result, padding included
    assert float(seq_to_spatial(X, coords, mask=mask)[1, 0, 0, 0]) == 7.0


def test_gradients_reach_the_rows_that_were_written():
    X = torch.randn(1, 3, 2, requires_grad=True)
    coords = torch.tensor([[[0, 0], [0, 0], [1, 1]]])
    seq_to_spatial(X, coords).sum().backward()
    assert X.grad[0, :, 0].tolist() == [0.0, 1.0, 1.0]  # row 0 lost its cell to row 1


def test_refuses_cells_that_are_not_indices():
    X = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match=">= 0"):
        seq_to_spatial(X, torch.tensor([[[0, -1], [1, 1]]]))
    with pytest.raises(TypeError, match="integers"):
        seq_to_spatial(X, torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="coords must be"):
        seq_to_spatial(X, torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(IndexError, match="outside"):
        spatial_to_seq(torch.zeros(1, 2, 2, 3), torch.tensor([[[0, 0], [2, 0]]]))
