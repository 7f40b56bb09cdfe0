"""Image relative position encoding (iRPE, Wu et al., ICCV 2021), the part SETMIL's defaults use:
the "product" method in "contextual" mode on the keys, one class token skipped (torchmil 1.0.2's
`torchmil.nn.irpe` with ratio 1.9).

For a query at grid cell (y_i, x_i) and a key at (y_j, x_j) the offsets dy = y_i - y_j and
dx = x_i - x_j go through the piecewise index g (exact within alpha, logarithmic up to beta):

    g(d) = d                                                              |d| <= alpha
    g(d) = sign(d) min(round(alpha + ln(|d| / alpha) / ln(gamma / alpha) (beta - alpha)), beta)
                                                                          (truncated to an integer)
    alpha, beta, gamma = ratio, 2 ratio, 8 ratio;   B = int(beta);   n = 2 B + 1 values per axis

and the pair's bucket is (g(dy) + B) * n + (g(dx) + B), one of n^2; the class token's row and column
use one more bucket, n^2. Contextual mode on keys adds to the score of (i, j)

    bias_ij = q_i . w[:, bucket(i, j)]          q scaled by 1 / sqrt(head_dim), w: (head_dim, n^2 + 1)

Where torchmil gathers bias_ij with an (L, L) int64 bucket table, here the bias is built from two
one-hot tables over one axis each, (S, S, n) for S grid rows: P_i = q_i w (n x n per query) is
contracted first with the column table (`bhyxac,xXc->bhyxaX`, L x n x S values) and then with the
row table (`bhyxaX,yYa->bhyxYX`, the (L, L) bias), so no (L, L) integer tensor exists. A one-hot
contraction selects exactly (1 * p plus zeros), so the bias equals torchmil's gather bit for bit.
"""

from __future__ import annotations

import math

import torch


class ProductBuckets:
    """The product method's piecewise index for one `ratio` (torchmil's alpha, beta, gamma)."""

    def __init__(self, ratio: float = 1.9) -> None:
        self.alpha = 1 * ratio
        self.beta = 2 * ratio
        self.gamma = 8 * ratio
        self.beta_int = int(self.beta)
        self.per_axis = 2 * self.beta_int + 1  # n values of g(d) + B
        self.grid_buckets = self.per_axis**2  # n^2 buckets of grid pairs
        self.class_bucket = self.grid_buckets  # the class token's row and column

    def num_buckets(self, skip: int) -> int:
        """Buckets in the lookup table: n^2, plus one per skipped (class) token."""
        return self.grid_buckets + skip

    def piecewise(self, offset: torch.Tensor) -> torch.Tensor:
        """g(d) for integer offsets (any shape), as int64 in [-B, B]."""
        d = offset.to(torch.float32)
        magnitude = d.abs()
        log_part = torch.log(magnitude.clamp(min=self.alpha) / self.alpha) / math.log(self.gamma / self.alpha)
        far = (self.alpha + log_part * (self.beta - self.alpha)).round().clamp(max=self.beta)
        far = (torch.sign(d) * far).to(torch.int64)  # truncates towards 0, as torchmil's .to(long)
        return torch.where(magnitude <= self.alpha, offset.to(torch.int64), far)

    def axis_onehot(self, side: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(S, S, n) one-hot of g(i - j) + B for grid rows (or columns) i, j in [0, S)."""
        position = torch.arange(side, device=device)  # (S,)
        index = self.piecewise(position[:, None] - position[None, :]) + self.beta_int  # (S, S)
        values = torch.arange(self.per_axis, device=device)  # (n,)
        return (index[..., None] == values).to(dtype)  # (S, S, n)

    def bucket_table(self, side: int) -> torch.Tensor:
        """(S * S, S * S) int64 bucket of every grid pair, row-major cells. Tests only: it is (L, L)."""
        position = torch.arange(side)
        index = self.piecewise(position[:, None] - position[None, :]) + self.beta_int  # (S, S)
        table = index[:, None, :, None] * self.per_axis + index[None, :, None, :]  # (S, S, S, S)
        return table.reshape(side * side, side * side)


def contextual_key_bias(
    lookup: torch.Tensor, row_onehot: torch.Tensor, col_onehot: torch.Tensor, side: int
) -> torch.Tensor:
    """The (batch, heads, S * S, S * S) grid-pair bias from each grid query's bucket scores.

    lookup: (batch, heads, S * S, n * n), q_i . w[:, b] for the n^2 grid buckets b; row_onehot and
    col_onehot: (S, S, n) from `ProductBuckets.axis_onehot`. bias[i, j] = lookup[i, bucket(i, j)].
    """
    batch, heads = lookup.shape[0], lookup.shape[1]
    n = row_onehot.shape[-1]
    scores = lookup.reshape(batch, heads, side, side, n, n)  # (batch, heads, y_i, x_i, a, c)
    by_column = torch.einsum("bhyxac,xXc->bhyxaX", scores, col_onehot)  # (batch, heads, y_i, x_i, a, x_j)
    bias = torch.einsum("bhyxaX,yYa->bhyxYX", by_column, row_onehot)  # (batch, heads, y_i, x_i, y_j, x_j)
    return bias.reshape(batch, heads, side * side, side * side)  # (batch, heads, L, L)
