"""The Sm smoothing operator over an edge-list graph (Castro-Macias et al., "Sm: enhanced localization in
Multiple Instance Learning for medical imaging classification", NeurIPS 2024, arXiv 2410.03276), as
torchmil 1.0.2's `torchmil.nn.Sm` computes it, with torchmil's sparse `adj @ g` replaced by a scatter
over `edge_index` / `edge_weight`.

Notation: f (batch, bag, C) are node signals, A the weighted adjacency of the edge list
(A[s, t] = w for edge (s, t) = (edge_index[0], edge_index[1]), duplicate edges add, as a coalesced
sparse tensor does), c the coefficient torchmil calls `coef`:
    alpha a float  -> c = 1 / (1 - alpha) - 1 = alpha / (1 - alpha)   (a constant)
    "trainable"    -> c = a parameter, initialised to 1.0 (unconstrained, as in torchmil)

mode="approx" (torchmil's default everywhere): with a = 1 / (1 + c),
    g_0 = f,   g_t = (1 - a) f + a A g_{t-1},   Sm(f) = g_T,  T = num_steps.
mode="exact": Sm(f) = M^-1 f with M = (1 + c) I - c A.

torchmil's approx and exact modes are not two forms of one operator. The fixed point of the approx
recursion solves (I - a A) g = (1 - a) f, exact solves (I - a' A) g = f / (1 + c) with a' = c / (1 + c)
= 1 - a: they weigh the neighbours alike only at c = 1. For a float `alpha`, approx uses a = 1 - alpha
(so alpha = 0.9 keeps 90% of f per step), the reverse of the paper's and torchmil's own docstring
G(t) = alpha (I - L) G(t-1) + (1 - alpha) U. milkit reproduces both modes as torchmil computes them.

The exact mode's solve: eager mode forms the dense (batch, bag, bag) M and calls
`torch.linalg.solve`, torchmil's computation (O(N^2) memory, O(N^3) time: training in exact mode is
as costly as in torchmil). ONNX has no linear solve, so the exported graph (`torch.export`, see
`torch.compiler.is_exporting`) runs `EXPORT_CG_STEPS` steps of conjugate gradients on M instead,
one column system per (bag, channel), O(E C) memory, no (bag, bag) tensor. That is M^-1 f up to the
CG error, which is small where M is symmetric positive definite with a moderate condition number K:
a symmetric graph (every milkit rule is) and c lambda_max(A) < 1 + c. On torchmil's dataset graph
(grid8 with D^-1/2 A D^-1/2, no self loops; A's eigenvalues in [-1, 1]) M's eigenvalues lie in
[1, 1 + 2c] for c >= 0, so K <= 1 + 2c and the relative error after k steps is at most
2 sqrt(K) ((sqrt(K) - 1) / (sqrt(K) + 1))^k: below 1e-6 for c <= 4 at k = 32 (the trainable
coefficient starts at c = 1, K = 3, a contraction of 0.27 per step); tests/models/test_sm.py
measures it against the dense solve. Graphs whose A has eigenvalues near (1 + c) / c (e.g. with
self loops of weight 1 appended to every node, where lambda_max = 2 and M is singular at c = 1; the
models' rule, torchmil's dataset graph, has none but on a one-instance bag) make the exact mode
ill-posed in torchmil and the exported CG inaccurate. The approx mode has no such limit and exports
exactly (the same operations in eager and ONNX).

Padding: rows of f for padded instances must be 0 and padded nodes have no edges (milkit's collate
and graph rules guarantee both); then every mode leaves them 0. `transpose=True` applies Sm's
transpose (A^T in place of A), which the pool uses to move an early Sm onto fewer channels.
"""

from __future__ import annotations

import torch
from torch import nn

from mil_train.nn.neighbour_table import aggregate, neighbour_table

MODES = ("approx", "exact")
EXPORT_CG_STEPS = 32  # conjugate-gradient steps of the exported exact mode (see the module docstring)


def _coefficient(alpha: float | str) -> float | None:
    """torchmil's `coef` for a float alpha; None for "trainable"."""
    if alpha == "trainable":
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"sm_alpha must be a float in [0, 1) or 'trainable', got {alpha!r}")
    alpha = float(alpha)
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"sm_alpha must be in [0, 1) (torchmil divides by 1 - alpha), got {alpha}")
    return 1.0 / (1.0 - alpha) - 1.0


class EdgeAdjacency:
    """A (or A^T) of an edge list as an operator on (batch, bag, C) signals.

    (A g)[s] = sum over edges (s, t) of w * g[t], in the flattened (batch * bag) node space. Two
    layouts, the same sums (tests/models/test_sm.py):

    - "scatter" (eager, and the exported A^T, used on one channel only): gather the messages
      w * g[t] (E, C), `scatter_add` them onto s.
    - "table" (the exported A): `mil_train.nn.neighbour_table`, built once per forward and applied
      every step as one gather and a batched contraction; onnxruntime's ScatterElements-add would
      cost ~40 ns per element, 5x torchmil's whole SmABMIL at 10,000 instances.
    """

    def __init__(
        self,
        edge_index: torch.Tensor | None,
        edge_weight: torch.Tensor | None,
        shape: tuple[int, int, int],
        transpose: bool = False,
        dtype: torch.dtype = torch.float32,
        layout: str | None = None,
    ) -> None:
        self.shape = shape
        self.empty = edge_index is None
        if self.empty:
            return
        if layout is None:
            layout = "table" if torch.compiler.is_exporting() and not transpose else "scatter"
        self.layout = layout
        rows, cols = (edge_index[1], edge_index[0]) if transpose else (edge_index[0], edge_index[1])
        if edge_weight is None:
            edge_weight = torch.ones(edge_index.shape[1], dtype=dtype, device=edge_index.device)
        edge_weight = edge_weight.to(dtype)  # (E,)
        if layout == "table":
            self.table = neighbour_table(torch.stack([rows, cols]), edge_weight, shape[0] * shape[1], dtype)
        else:
            self.cols = cols  # (E,) nodes read
            self.weight = edge_weight[:, None]  # (E, 1)
            self.index = rows[:, None].expand(-1, shape[2])  # (E, C) nodes written

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        if self.empty:
            return torch.zeros_like(g)
        if self.layout == "table":
            return aggregate(g, self.table)  # (batch, bag, C)
        batch, bag, channels = g.shape
        flat = g.reshape(batch * bag, channels)  # (batch * bag, C)
        messages = flat.index_select(0, self.cols) * self.weight  # (E, C)
        out = torch.zeros_like(flat).scatter_add(0, self.index, messages)  # (batch * bag, C)
        return out.reshape(batch, bag, channels)


def dense_adjacency(
    edge_index: torch.Tensor | None,
    edge_weight: torch.Tensor | None,
    batch: int,
    bag: int,
    transpose: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The (batch, bag, bag) dense A of an edge list (duplicates add). Eager exact mode and tests only."""
    A = torch.zeros(batch * bag * bag, dtype=dtype, device=None if edge_index is None else edge_index.device)
    if edge_index is not None and edge_index.shape[1] > 0:
        rows, cols = (edge_index[1], edge_index[0]) if transpose else (edge_index[0], edge_index[1])
        if edge_weight is None:
            edge_weight = torch.ones(edge_index.shape[1], dtype=dtype, device=edge_index.device)
        flat = torch.div(rows, bag, rounding_mode="floor") * bag * bag + (rows % bag) * bag + cols % bag  # (E,)
        A = A.scatter_add(0, flat, edge_weight.to(dtype))
    return A.reshape(batch, bag, bag)


class Sm(nn.Module):
    """torchmil's Sm operator (approx or exact mode) over an edge-list graph; see the module docstring.

    Args:
        alpha: float in [0, 1) (a constant coefficient) or "trainable" (a parameter `coef`, init 1.0).
        num_steps: recursion steps of the approx mode (unused by exact).
        mode: "approx" or "exact".
    """

    def __init__(self, alpha: float | str = "trainable", num_steps: int = 10, mode: str = "approx") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"sm_mode must be 'approx' or 'exact', got {mode!r}")
        if int(num_steps) < 0:
            raise ValueError(f"sm_steps must be >= 0, got {num_steps}")
        self.mode = mode
        self.num_steps = int(num_steps)
        self.alpha = alpha
        coef = _coefficient(alpha)
        if coef is None:
            self.coef = nn.Parameter(torch.tensor(1.0))
        else:
            self.coef = coef  # a Python float: a constant of the graph, not a parameter

    def forward(
        self,
        f: torch.Tensor,
        edge_index: torch.Tensor | None,
        edge_weight: torch.Tensor | None = None,
        transpose: bool = False,
    ) -> torch.Tensor:
        """f: (batch, bag, C), 0 on padded rows. Returns Sm(f) (or Sm^T(f) with transpose), (batch, bag, C)."""
        if self.mode == "approx":
            return self._approx(f, EdgeAdjacency(edge_index, edge_weight, tuple(f.shape), transpose, f.dtype))
        if torch.compiler.is_exporting():
            return self.conjugate_gradient(f, edge_index, edge_weight, transpose)
        return self.exact_dense(f, edge_index, edge_weight, transpose)

    def _approx(self, f: torch.Tensor, adjacency: EdgeAdjacency) -> torch.Tensor:
        a = 1.0 / (1.0 + self.coef)
        g = f
        for _ in range(self.num_steps):
            g = (1.0 - a) * f + a * adjacency(g)  # (batch, bag, C)
        return g

    def exact_dense(self, f, edge_index, edge_weight, transpose: bool = False) -> torch.Tensor:
        """torchmil's exact mode: solve ((1 + c) I - c A) g = f with a dense (batch, bag, bag) matrix."""
        batch, bag = f.shape[0], f.shape[1]
        A = dense_adjacency(edge_index, edge_weight, batch, bag, transpose, f.dtype)  # (batch, bag, bag)
        eye = torch.eye(bag, dtype=f.dtype, device=f.device).expand(batch, bag, bag)  # (batch, bag, bag)
        M = (1.0 + self.coef) * eye - self.coef * A  # (batch, bag, bag)
        return torch.linalg.solve(M, f)  # (batch, bag, C)

    def conjugate_gradient(
        self, f, edge_index, edge_weight, transpose: bool = False, steps: int = EXPORT_CG_STEPS
    ) -> torch.Tensor:
        """The exported exact mode: `steps` CG iterations on M g = f from g = 0, per (bag, channel).

        Every (bag, channel) column is its own system (A is block diagonal over the bags), so the
        step sizes are (batch, 1, C) reductions over the bag axis. Padded rows stay 0 (f and M's
        padded rows are (1 + c) I). A column already solved (residual 0) takes steps of size 0.
        """
        adjacency = EdgeAdjacency(edge_index, edge_weight, tuple(f.shape), transpose, f.dtype)

        def apply_m(p):
            return (1.0 + self.coef) * p - self.coef * adjacency(p)  # (batch, bag, C)

        g = torch.zeros_like(f)  # (batch, bag, C)
        r = f  # (batch, bag, C)
        p = f  # (batch, bag, C)
        rr = (r * r).sum(dim=1, keepdim=True)  # (batch, 1, C)
        tiny = torch.finfo(f.dtype).tiny
        for _ in range(steps):
            mp = apply_m(p)  # (batch, bag, C)
            pmp = (p * mp).sum(dim=1, keepdim=True)  # (batch, 1, C)
            usable = pmp.abs() > tiny
            step = torch.where(usable, rr / torch.where(usable, pmp, 1.0), 0.0)  # (batch, 1, C)
            g = g + step * p
            r = r - step * mp
            rr_next = (r * r).sum(dim=1, keepdim=True)  # (batch, 1, C)
            ratio = torch.where(rr > tiny, rr_next / torch.where(rr > tiny, rr, 1.0), 0.0)  # (batch, 1, C)
            p = r + ratio * p
            rr = rr_next
        return g

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, alpha={self.alpha!r}, num_steps={self.num_steps}"
