"""A bag as a square grid of cells over its (y, x) coordinates, and back (torchmil 1.0.2's
`seq_to_spatial` / `spatial_to_seq` followed by SETMIL's pad-to-square).

torchmil writes bag row i into cell coords[i] of a (max_y + 1, max_x + 1) grid and pads the grid
to a square with zeros; the square's cells, row-major, are SETMIL's tokens. Here a padded batch gets
one grid of side S = max over bags of each bag's own side s_b = max(max_y, max_x) + 1 (real rows
only), and each bag keeps its own s_b x s_b square (`cell_mask`): cells outside it are masked, never
tokens, so a bag alone and the same bag padded in a batch see the same tokens.

S is read from the coords' values (`.item()` under `torch._check` bounds), which torch.export keeps
as a data-dependent symbol and onnxruntime computes from the coords input at run time. Rows go into
the grid with `scatter_add` (ScatterElements with add in ONNX, never an accumulating ScatterND):
padded rows go to a trash cell past the grid, and two rows with the same coordinates are averaged
(torchmil keeps one of them, whichever its index_put writes last).
"""

from __future__ import annotations

import torch

# Largest grid side the export is traced for (torch._check bound): 2^15 cells a side, 2^30 cells.
MAX_SIDE = 2**15


def default_coords(mask: torch.Tensor) -> torch.Tensor:
    """(batch, bag, 2) int64 (y, x): each bag's real rows on a near-square grid, row by row.

    The layout of `mil_export.onnx_export.grid_coords(n)` (width isqrt(n - 1) + 1) for a bag of n
    real rows that come first, computed with tensor arithmetic; 0 on padding. For models that read
    coords when none are given.
    """
    n = mask.sum(dim=1, keepdim=True).to(torch.int64)  # (batch, 1)
    m = (n - 1).clamp(min=0)  # (batch, 1)
    root = torch.sqrt(m.to(torch.float64)).floor().to(torch.int64)  # (batch, 1)
    root = root - (root * root > m).to(torch.int64)  # (batch, 1) exact isqrt after float rounding
    root = root + ((root + 1) * (root + 1) <= m).to(torch.int64)  # (batch, 1)
    width = root + 1  # (batch, 1)
    index = (torch.cumsum(mask.to(torch.int64), dim=1) - 1).clamp(min=0)  # (batch, bag)
    coords = torch.stack([index // width, index % width], dim=-1)  # (batch, bag, 2)
    return torch.where(mask[..., None], coords, torch.zeros_like(coords))  # (batch, bag, 2)


def bag_sides(coords: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch,) int64: each bag's square side max(max_y, max_x) + 1 over its real rows (0 if empty)."""
    largest = coords.amax(dim=-1) + 1  # (batch, bag)
    largest = torch.where(mask, largest, torch.zeros_like(largest))  # (batch, bag)
    return largest.amax(dim=1)  # (batch,)


def grid_side(sides: torch.Tensor) -> int:
    """The batch grid's side S = max of the bags' sides, as a (data-dependent, exportable) size."""
    side = sides.reshape(-1).amax(dim=0).clamp(min=1).item()
    torch._check(side >= 1)
    torch._check(side <= MAX_SIDE)
    return side


def cell_mask(sides: torch.Tensor, side: int) -> torch.Tensor:
    """(batch, S * S) bool: cell (y, x) of the batch grid lies in its bag's own s_b x s_b square."""
    rows = torch.arange(side, device=sides.device)  # (S,)
    inside = rows[None, :] < sides[:, None]  # (batch, S)
    return (inside[:, :, None] & inside[:, None, :]).reshape(sides.shape[0], side * side)  # (batch, S * S)


def cell_index(coords: torch.Tensor, side: int) -> torch.Tensor:
    """(batch, bag) int64 row-major cell y * S + x of each row in the batch grid."""
    return coords[..., 0] * side + coords[..., 1]  # (batch, bag)


def seq_to_grid(X: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor, side: int) -> torch.Tensor:
    """(batch, bag, dim) rows -> (batch, S * S, dim) cells, row-major; empty cells and padding are 0.

    Padded rows go to a trash cell past the grid (so their values never reach a cell), rows sharing
    a cell are averaged.
    """
    batch, bag, dim = X.shape
    cells = side * side
    index = torch.where(mask, cell_index(coords, side), torch.full_like(coords[..., 0], cells))  # (batch, bag)
    values = torch.where(mask[..., None], X, torch.zeros_like(X))  # (batch, bag, dim)
    total = X.new_zeros(batch, cells + 1, dim).scatter_add(
        1, index[..., None].expand(batch, bag, dim), values
    )  # (batch, S * S + 1, dim)
    count = X.new_zeros(batch, cells + 1).scatter_add(1, index, mask.to(X.dtype))  # (batch, S * S + 1)
    grid = total / count.clamp(min=1.0)[..., None]  # (batch, S * S + 1, dim)
    return grid[:, :cells]  # (batch, S * S, dim)


def grid_to_seq(grid: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor, side: int) -> torch.Tensor:
    """(batch, S * S, dim) cells -> (batch, bag, dim): each row reads its own cell; 0 on padding."""
    batch, bag = coords.shape[0], coords.shape[1]
    dim = grid.shape[-1]
    index = torch.where(mask, cell_index(coords, side), torch.zeros_like(coords[..., 0]))  # (batch, bag)
    rows = torch.gather(grid, 1, index[..., None].expand(batch, bag, dim))  # (batch, bag, dim)
    return torch.where(mask[..., None], rows, torch.zeros_like(rows))  # (batch, bag, dim)


def token_positions(sides: torch.Tensor, side: int) -> torch.Tensor:
    """(batch, 1 + S * S) float32 sequence positions: 0 for the class token, 1 + y s_b + x for cell (y, x).

    torchmil numbers the tokens of one bag's s_b x s_b square 0 (class), 1, 2, ... row by row; each
    bag gets those numbers for its own square whatever the batch grid's side S is. Cells outside the
    bag's square get numbers too, but are masked.
    """
    rows = torch.arange(side, device=sides.device)  # (S,)
    cells = rows[:, None] * sides[:, None, None] + rows[None, None, :]  # (batch, S, S)
    cells = cells.reshape(sides.shape[0], side * side) + 1  # (batch, S * S)
    return torch.cat([torch.zeros_like(cells[:, :1]), cells], dim=1).to(torch.float32)  # (batch, 1 + S * S)


def sinusoidal_inverse_frequencies(dim: int) -> torch.Tensor:
    """torchmil's `SinusoidalPositionalEncodingND(1, dim)` frequencies, ceil(dim / 2) of them."""
    channels = 2 * ((dim + 1) // 2)
    return 1.0 / (10000 ** (torch.arange(0, channels, 2).float() / channels))


def sinusoidal_encoding(positions: torch.Tensor, inv_freq: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, L) positions -> (batch, L, dim): sin and cos of p * f interleaved, cut to dim."""
    angles = positions[..., None] * inv_freq  # (batch, L, dim / 2)
    encoding = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (batch, L, 2 ceil(dim / 2))
    return encoding[..., :dim]  # (batch, L, dim)
