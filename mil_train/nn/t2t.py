"""Tokens-to-token layers and SETMIL's pyramid multi-scale fusion (PMF), on a grid of cells
(torchmil 1.0.2's `T2TLayer` and `PMF` as defined in `torchmil/models/setmil.py`, which unfold first;
the `torchmil.nn.transformers.T2TLayer` variant that attends first is not what SETMIL uses).

T2T layer, kernel k x k with dilation d: every cell's token becomes the concatenation of the k^2
cells around it (zeros beyond the grid), channel-major like `torch.nn.Unfold` (channel c, offset
(ki, kj) at c k^2 + ki k + kj), then one pre-norm transformer layer (in: dim k^2, out: att_dim;
`mil_train.nn.transformer.TransformerEncoderLayer`, the fused attention). PMF runs one T2T layer per
kernel, concatenates their outputs and projects them to out_dim.

The unfold is k^2 shifted slices of the zero-padded grid, so the grid side S stays a symbolic size
in the export (no im2col). Only grid-preserving unfolds are supported: stride 1 and padding
d (k - 1) / 2 per axis, which SETMIL's defaults are (kernels 3, 5, 7 with paddings 1, 2, 3); they
keep the S x S grid, so the tokens after PMF are still the cells and each bag keeps its own square
(`cell_mask`) as the attention's key mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mil_train.nn.transformer import TransformerEncoderLayer


def check_grid_preserving(kernel, stride, padding, dilation) -> None:
    for axis in range(2):
        if stride[axis] != 1 or 2 * padding[axis] != dilation[axis] * (kernel[axis] - 1):
            raise NotImplementedError(
                f"T2T unfold kernel={tuple(kernel)} stride={tuple(stride)} padding={tuple(padding)} "
                f"dilation={tuple(dilation)} changes the grid; milkit supports stride 1 with padding "
                "dilation * (kernel - 1) / 2 (SETMIL's defaults)"
            )


def unfold_grid(grid: torch.Tensor, side: int, kernel, padding, dilation) -> torch.Tensor:
    """(batch, S * S, dim) row-major cells -> (batch, S * S, dim * k0 * k1), `torch.nn.Unfold`'s order."""
    batch, _, dim = grid.shape
    image = grid.transpose(1, 2).reshape(batch, dim, side, side)  # (batch, dim, S, S)
    padded = nn.functional.pad(image, (padding[1], padding[1], padding[0], padding[0]))  # (batch, dim, S + 2p, S + 2p)
    patches = [
        padded[:, :, ki * dilation[0] : ki * dilation[0] + side, kj * dilation[1] : kj * dilation[1] + side]
        for ki in range(kernel[0])
        for kj in range(kernel[1])
    ]  # k0 * k1 x (batch, dim, S, S)
    stacked = torch.stack(patches, dim=2)  # (batch, dim, k0 * k1, S, S)
    return stacked.reshape(batch, dim * kernel[0] * kernel[1], side * side).transpose(1, 2)  # (batch, S * S, dim k^2)


class T2TLayer(nn.Module):
    """Unfold k x k neighbourhoods, then one transformer layer (dim k^2 -> att_dim), then out_proj."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        att_dim: int = 512,
        kernel_size: Sequence[int] = (3, 3),
        stride: Sequence[int] = (1, 1),
        padding: Sequence[int] = (1, 1),
        dilation: Sequence[int] = (1, 1),
        n_heads: int = 4,
        use_mlp: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_grid_preserving(kernel_size, stride, padding, dilation)
        self.kernel_size, self.padding, self.dilation = tuple(kernel_size), tuple(padding), tuple(dilation)
        self.transformer = TransformerEncoderLayer(
            in_dim=in_dim * kernel_size[0] * kernel_size[1],
            out_dim=att_dim,
            att_dim=att_dim,
            n_heads=n_heads,
            use_mlp=use_mlp,
            dropout=dropout,
        )
        self.out_proj = nn.Linear(att_dim, out_dim) if out_dim is not None and out_dim != att_dim else nn.Identity()

    def forward(self, grid: torch.Tensor, cells: torch.Tensor, side: int) -> torch.Tensor:
        """grid: (batch, S * S, in_dim), 0 on empty cells; cells: (batch, S * S) bool. -> (batch, S * S, out_dim)."""
        tokens = unfold_grid(grid, side, self.kernel_size, self.padding, self.dilation)  # (batch, S * S, in_dim k^2)
        Y = self.transformer(tokens, cells)  # (batch, S * S, att_dim)
        Y = torch.where(cells[..., None], Y, torch.zeros_like(Y))  # (batch, S * S, att_dim)
        return self.out_proj(Y)  # (batch, S * S, out_dim)


class PyramidMultiScaleFusion(nn.Module):
    """SETMIL's PMF: one T2T layer per kernel, outputs concatenated, Linear(att_dim * kernels, out_dim)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        att_dim: int = 512,
        kernel_list: Sequence[Sequence[int]] = ((3, 3), (5, 5), (7, 7)),
        stride_list: Sequence[Sequence[int]] = ((1, 1), (1, 1), (1, 1)),
        padding_list: Sequence[Sequence[int]] = ((1, 1), (2, 2), (3, 3)),
        dilation_list: Sequence[Sequence[int]] = ((1, 1), (1, 1), (1, 1)),
        n_heads: int = 4,
        use_mlp: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            T2TLayer(in_dim, att_dim, att_dim, kernel, stride, padding, dilation, n_heads, use_mlp, dropout)
            for kernel, stride, padding, dilation in zip(kernel_list, stride_list, padding_list, dilation_list)
        )
        width = att_dim * len(self.layers)
        self.out_proj = nn.Linear(width, out_dim) if out_dim is not None else nn.Identity()

    def forward(self, grid: torch.Tensor, cells: torch.Tensor, side: int) -> torch.Tensor:
        """grid: (batch, S * S, in_dim); cells: (batch, S * S) bool. -> (batch, S * S, out_dim), 0 off the cells."""
        fused = torch.cat([layer(grid, cells, side) for layer in self.layers], dim=-1)  # (batch, S * S, att_dim * k)
        Y = self.out_proj(fused)  # (batch, S * S, out_dim)
        return torch.where(cells[..., None], Y, torch.zeros_like(Y))  # (batch, S * S, out_dim)
