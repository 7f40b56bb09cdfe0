"""A bag between its sequence form and its spatial form, in torch and in numpy.

    sequence:  X (batch, bag, D) with integer coords (batch, bag, n)
    spatial:   X_spatial (batch, c_1, ..., c_n, D), c_k = max over the batch of coords[..., k] + 1

`seq_to_spatial` writes row i of bag b into cell coords[b, i]; `spatial_to_seq` reads each row back
from its cell. Both take torch tensors or numpy arrays and return the same kind; n = 2 (slides, (y, x)
tile indices) and n = 3 (volumes) alike, any n >= 1 in fact.

Without a mask they equal torchmil 1.0.2's `torchmil.data.representations` functions of the same
names on the same input, padding included: every row is written, padded rows too (torchmil's collate
pads coords with 0, so padded rows land in cell (0, ..., 0)). Two rows in one cell: the later row in
the bag wins, which is what torchmil's `index_put` gives on CPU; here it is computed, not left to the
order in which a kernel happens to write, so it holds on any device and in numpy too.

With a mask (batch, bag) bool, True = real, padded rows are neither written nor counted in the grid's
size, and `spatial_to_seq` gives 0 on them. That is the form for padded batches: torchmil's padded
rows overwrite a real tile at (0, ..., 0) with whatever the padding holds (zeros), so a bag's tile there
depends on whether the bag was padded; with the mask, a bag gives the same cells alone and in a batch.

Training-side only (torch and numpy, not exported): the ONNX contract keeps (bag, 2) coords.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _check_coords(coords: Any, X_rows: tuple[int, int]) -> None:
    if coords.ndim != 3 or tuple(coords.shape[:2]) != X_rows:
        raise ValueError(f"coords must be (batch, bag, n) matching X's {X_rows}, got {tuple(coords.shape)}")
    integer = (not coords.dtype.is_floating_point and not coords.dtype.is_complex and coords.dtype != torch.bool
               if isinstance(coords, torch.Tensor) else np.issubdtype(coords.dtype, np.integer))
    if not integer:
        raise TypeError(f"coords must hold integers (cell indices), got {coords.dtype}")
    if coords.numel() if isinstance(coords, torch.Tensor) else coords.size:
        if int(coords.min()) < 0:
            raise ValueError("coords must be >= 0 (cell indices); shift them by their minimum first")


def _grid_shape(coords: Any, mask: Any) -> list[int]:
    """Per axis, 1 + the largest coordinate over the rows that are written (at least 1)."""
    n = coords.shape[-1]
    if isinstance(coords, torch.Tensor):
        rows = coords.reshape(-1, n) if mask is None else coords[mask.bool()]  # (rows, n)
        largest = rows.amax(dim=0) if rows.shape[0] else None  # (n,)
    else:
        rows = coords.reshape(-1, n) if mask is None else coords[np.asarray(mask, dtype=bool)]  # (rows, n)
        largest = rows.max(axis=0) if rows.shape[0] else None  # (n,)
    return [1] * n if largest is None else [int(c) + 1 for c in largest.tolist()]


def _flat_cells(coords: Any, shape: list[int]) -> Any:
    """(batch, bag) row-major index of each row's cell inside its bag's grid of `shape`."""
    flat = coords[..., 0]
    for k in range(1, len(shape)):
        flat = flat * shape[k] + coords[..., k]  # (batch, bag)
    return flat


def _winners_torch(cells: torch.Tensor, written: torch.Tensor, n_cells: int) -> torch.Tensor:
    """(batch, bag) bool: the row is written and no later written row shares its cell."""
    batch, bag = cells.shape
    order = torch.arange(bag, device=cells.device).expand(batch, bag)  # (batch, bag)
    order = torch.where(written, order, torch.full_like(order, -1))  # (batch, bag)
    last = torch.full((batch, n_cells), -1, dtype=order.dtype, device=cells.device)  # (batch, cells)
    last = last.scatter_reduce(1, cells, order, reduce="amax")  # (batch, cells) last row in each cell
    return written & (torch.gather(last, 1, cells) == order)  # (batch, bag)


def _winners_numpy(cells: np.ndarray, written: np.ndarray, n_cells: int) -> np.ndarray:
    batch, bag = cells.shape
    order = np.where(written, np.arange(bag)[None, :], -1)  # (batch, bag)
    last = np.full((batch, n_cells), -1, dtype=np.int64)  # (batch, cells)
    np.maximum.at(last, (np.arange(batch)[:, None].repeat(bag, 1), cells), order)
    return written & (np.take_along_axis(last, cells, axis=1) == order)  # (batch, bag)


def seq_to_spatial(X: Any, coords: Any, mask: Any = None) -> Any:
    """(batch, bag, D) rows and (batch, bag, n) integer coords -> (batch, c_1, ..., c_n, D); empty cells 0.

    mask (batch, bag) bool, optional: padded rows (False) are not written and do not size the grid.
    Torch in, torch out (same device and dtype as X); numpy in, numpy out.
    """
    _check_coords(coords, tuple(X.shape[:2]))
    is_torch = isinstance(X, torch.Tensor)
    batch, bag, dim = X.shape
    shape = _grid_shape(coords, mask)
    n_cells = int(np.prod(shape))
    cells = _flat_cells(coords, shape)  # (batch, bag)
    if is_torch:
        written = torch.ones(batch, bag, dtype=torch.bool, device=X.device) if mask is None else mask.bool()
        # a padded row's coords may lie outside the grid sized by the real rows: park it in cell 0
        cells = torch.where(written, cells, torch.zeros_like(cells)).long()  # (batch, bag)
        keep = _winners_torch(cells, written, n_cells)  # (batch, bag)
        grid = X.new_zeros(batch, n_cells, dim)  # (batch, cells, D)
        rows_b, rows_i = keep.nonzero(as_tuple=True)  # (kept,), (kept,)
        grid[rows_b, cells[rows_b, rows_i]] = X[rows_b, rows_i]  # one row per cell: no duplicates left
        return grid.reshape(batch, *shape, dim)  # (batch, c_1, ..., c_n, D)
    X, coords = np.asarray(X), np.asarray(coords)
    written = np.ones((batch, bag), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    cells = np.where(written, cells, 0).astype(np.int64)  # (batch, bag)
    keep = _winners_numpy(cells, written, n_cells)  # (batch, bag)
    grid = np.zeros((batch, n_cells, dim), dtype=X.dtype)  # (batch, cells, D)
    rows_b, rows_i = np.nonzero(keep)  # (kept,), (kept,)
    grid[rows_b, cells[rows_b, rows_i]] = X[rows_b, rows_i]
    return grid.reshape(batch, *shape, dim)  # (batch, c_1, ..., c_n, D)


def spatial_to_seq(X_spatial: Any, coords: Any, mask: Any = None) -> Any:
    """(batch, c_1, ..., c_n, D) and (batch, bag, n) integer coords -> (batch, bag, D): each row's cell.

    mask (batch, bag) bool, optional: padded rows (False) read nothing and are 0 (their coords may lie
    outside the grid). Torch in, torch out; numpy in, numpy out.
    """
    batch, bag = coords.shape[:2]
    _check_coords(coords, (X_spatial.shape[0], bag))
    shape = list(X_spatial.shape[1:-1])
    if coords.shape[-1] != len(shape):
        raise ValueError(f"coords have {coords.shape[-1]} axes, the spatial tensor {len(shape)}")
    dim = X_spatial.shape[-1]
    if isinstance(X_spatial, torch.Tensor):
        inside = torch.ones(batch, bag, dtype=torch.bool, device=coords.device) if mask is None else mask.bool()
        over = (coords >= torch.tensor(shape, device=coords.device)).any(-1) & inside  # (batch, bag)
        if bool(over.any()):
            raise IndexError("coords lie outside the spatial tensor")
        cells = torch.where(inside, _flat_cells(coords, shape), torch.zeros_like(coords[..., 0])).long()
        rows = torch.gather(X_spatial.reshape(batch, -1, dim), 1, cells[..., None].expand(batch, bag, dim))
        return rows if mask is None else torch.where(inside[..., None], rows, torch.zeros_like(rows))  # (batch, bag, D)
    X_spatial, coords = np.asarray(X_spatial), np.asarray(coords)
    inside = np.ones((batch, bag), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if np.any((coords >= np.asarray(shape)).any(-1) & inside):
        raise IndexError("coords lie outside the spatial tensor")
    cells = np.where(inside, _flat_cells(coords, shape), 0).astype(np.int64)  # (batch, bag)
    rows = np.take_along_axis(X_spatial.reshape(batch, -1, dim), cells[..., None], axis=1)  # (batch, bag, D)
    return rows if mask is None else np.where(inside[..., None], rows, np.zeros_like(rows))
