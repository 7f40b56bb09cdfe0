"""PPEG, TransMIL's pyramid position encoding generator (Shao et al. 2021, arXiv:2106.00908), torchmil
1.0.2's `torchmil.models.transmil.PPEG`, over a padded batch of bags whose grids differ in size.

torchmil lays one bag's side^2 tokens row-major on a side x side grid (token t at row t // side, column
t % side) and returns x + conv7(x) + conv5(x) + conv3(x), three depthwise convolutions with zero
padding at the grid's border, flattened back in the same order.

Here every bag b keeps its own side s_b: the batch shares one canvas of side G >= every s_b, bag b's
grid sits in its top-left s_b x s_b corner and the rest of the canvas is 0, so a convolution over the
canvas reads exactly the zeros torchmil's border padding gives and each bag's result is the one it
gets alone. G is a size computed from tensors (`grid_side`, then `.item()` with `torch._check`
bounds, which torch.export keeps as a data-dependent axis): no Python integer comes from a tensor
size. Tokens go to the canvas and back by index gathers; the canvas holds G^2 cells, linear in N.

State dict (same keys as torchmil's PPEG): proj (7 x 7), proj1 (5 x 5), proj2 (3 x 3), each a
depthwise Conv2d(dim, dim, k, padding=k // 2, groups=dim) with bias.

The three convolutions and the identity run as one: with zero padding, a 5 x 5 (3 x 3) kernel equals the
7 x 7 kernel that holds it in its centre, and x itself is the 7 x 7 kernel with a 1 in its centre, so
x + conv7(x) + conv5(x) + conv3(x) = conv(x, w7 + pad(w5) + pad(w3) + delta, b7 + b5 + b3), exactly but for
float rounding (the reparametrisation RepVGG uses). Autograd hands each kernel its part of the merged
kernel's gradient. One depthwise pass instead of three: 0.47x the fp32 time forward and backward at
512 x 55 x 55 here. On the CPU it runs in float32 even under bf16 autocast: the channels-last bf16
depthwise kernels are 2.6x slower there than float32 (135 against 53 ms, one thread).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def grid_side(n: torch.Tensor) -> torch.Tensor:
    """ceil(sqrt(n)) for an int64 tensor n >= 0, exactly (a float square root, then integer fixes)."""
    side = torch.sqrt(n.to(torch.float64)).floor().to(torch.int64)
    side = torch.where(side * side > n, side - 1, side)  # the float root rounded up past an integer
    return torch.where(side * side < n, side + 1, side)


def canvas_side(mask: torch.Tensor) -> int:
    """The shared canvas side G = ceil(sqrt(bag)) as a size, for a (batch, bag) mask.

    Computed from a tensor holding the bag axis (not from a Python integer), so under torch.export
    G is a data-dependent size, with G >= 1 and G^2 >= bag recorded as runtime checks: the model's
    token layout (G^2 rows) then holds every bag's grid and the gathers back to the bag axis.
    """
    bag = torch.ones_like(mask[0], dtype=torch.int64).sum()  # () = the bag axis, as a tensor
    side = grid_side(bag).clamp(min=1).item()
    torch._check(side >= 1)
    torch._check(side * side >= mask.shape[1])
    return side


class PPEG(nn.Module):
    """x + conv7(x) + conv5(x) + conv3(x) on each bag's own square grid (depthwise, zero border).

    Args:
        dim: token width (channels of the three depthwise convolutions).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 7 // 2, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 5 // 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 3 // 2, groups=dim)

    def forward(self, tokens: torch.Tensor, side: torch.Tensor, canvas: int) -> torch.Tensor:
        """tokens: (batch, canvas^2, dim), bag b's grid in its first side_b^2 rows (row-major);
        side: (batch,) int64 grid sides, each <= canvas; canvas: the shared side G (a size).

        Returns (batch, canvas^2, dim): each bag's first side_b^2 rows encoded, the other rows 0.
        """
        batch, cells, dim = tokens.shape
        device = tokens.device
        side = side.clamp(min=1)[:, None, None]  # (batch, 1, 1); an empty bag has no real row anyway
        rows = torch.arange(canvas, device=device)[None, :, None]  # (1, G, 1)
        cols = torch.arange(canvas, device=device)[None, None, :]  # (1, 1, G)
        inside = (rows < side) & (cols < side)  # (batch, G, G) cell holds a token of the bag
        token_of_cell = torch.where(inside, rows * side + cols, torch.zeros_like(rows * side + cols))  # (batch, G, G)
        offsets = torch.arange(batch, device=device)[:, None, None] * cells  # (batch, 1, 1)
        flat = tokens.reshape(batch * cells, dim)  # (batch * G^2, dim)
        grid = flat.index_select(0, (token_of_cell + offsets).reshape(-1))  # (batch * G^2, dim)
        grid = grid.reshape(batch, canvas, canvas, dim)  # (batch, G, G, dim)
        grid = torch.where(inside[..., None], grid, torch.zeros_like(grid))  # zeros outside each bag's grid
        grid = grid.permute(0, 3, 1, 2)  # (batch, dim, G, G)
        encoded = self._merged_convolution(grid)  # (batch, dim, G, G) = grid + conv7 + conv5 + conv3
        encoded = encoded.permute(0, 2, 3, 1).reshape(batch * cells, dim)  # (batch * G^2, dim)

        t = torch.arange(cells, device=device)[None, :]  # (1, G^2) token index
        side = side[:, :, 0]  # (batch, 1)
        real = t < side * side  # (batch, G^2)
        cell_of_token = torch.where(real, (t // side) * canvas + t % side, torch.zeros_like(t))  # (batch, G^2)
        out = encoded.index_select(0, (cell_of_token + offsets[:, :, 0]).reshape(-1))  # (batch * G^2, dim)
        out = out.reshape(batch, cells, dim)  # (batch, G^2, dim)
        return torch.where(real[..., None], out, torch.zeros_like(out))

    def merged_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The one depthwise 7 x 7 kernel (dim, 1, 7, 7) and bias (dim,) of x + conv7 + conv5 + conv3."""
        dim = self.proj.weight.shape[0]
        identity = F.pad(self.proj.weight.new_ones(dim, 1, 1, 1), (3, 3, 3, 3))  # (dim, 1, 7, 7), 1 in the centre
        kernel = self.proj.weight + F.pad(self.proj1.weight, (1, 1, 1, 1)) + F.pad(self.proj2.weight, (2, 2, 2, 2))
        return kernel + identity, self.proj.bias + self.proj1.bias + self.proj2.bias

    def _merged_convolution(self, grid: torch.Tensor) -> torch.Tensor:
        kernel, bias = self.merged_kernel()
        if grid.device.type == "cpu" and torch.is_autocast_enabled("cpu"):  # see the module docstring
            with torch.autocast("cpu", enabled=False):
                return F.conv2d(grid.float(), kernel.float(), bias.float(), padding=3, groups=kernel.shape[0])
        return F.conv2d(grid, kernel, bias, padding=3, groups=kernel.shape[0])
