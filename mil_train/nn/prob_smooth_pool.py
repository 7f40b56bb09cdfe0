"""Probabilistic smooth attention pooling (Castro-Macias et al., Pattern Recognition 2025, arXiv 2507.14932).

The attention logits f of a bag are a random vector with a Gaussian distribution predicted from the
instances, q(f | X) = N(mean, diag(exp(log_var))), and a smoothness prior over the bag's graph. The
bag is pooled with softmax(f) over its real instances.

Two ways to pool, both O(N) in the bag size N:
  mean path   softmax of the *mean* logits: weights = masked_softmax(mean). Deterministic; what the
              models use at inference and what the ONNX graph computes (the covariance is never read).
  sampled     S draws f_s = mean + exp(log_var / 2) * eps_s (reparameterisation trick, eps ~ N(0, I)),
              clipped to [-20, 20] as torchmil does; weights_s = masked_softmax(f_s). Used in training.
The mean path is softmax(E[f]); it is not the Monte Carlo average E[softmax(f)] that torchmil's 5,000
draws estimate at test time (the two agree when the variance is small).

covar_mode: "diag" (the paper's mean-field Gaussian) or "zero" (no variance: f = mean, a Dirac delta;
the earlier Smooth Attention model, arXiv 2307.09457). torchmil 1.0.2's pool accepts exactly these two;
its docstrings mention "full", which it refuses, and neither paper defines one.

KL term (`kl_divergence`), per bag, with A the bag's (normalised) adjacency and L = I - A:
  kl_b = ( mean^T L mean + tr(L Sigma) - 1/2 log det Sigma ) / N_b,   Sigma = diag(exp(log_var))
(up to a constant; the last two terms are 0 when covar_mode="zero"). It is evaluated on an edge list
in O(N + E), never with a dense N x N matrix, and over real instances only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from mil_train.nn.masking import masked_softmax

COVAR_MODES = ("diag", "zero")
LOGIT_CLIP = 20.0  # torchmil clips sampled logits to [-20, 20]; softmax is unchanged below that size


class PoolOutput(NamedTuple):
    """pooled (batch, samples, dim), weights (batch, samples, bag), mean / log_var (batch, bag).

    samples is 1 on the mean path. log_var is None when covar_mode="zero".
    """

    pooled: torch.Tensor
    weights: torch.Tensor
    mean: torch.Tensor
    log_var: torch.Tensor | None


class ProbSmoothAttentionPool(nn.Module):
    """MLP (Linear-GELU-Linear-GELU, width 2 * att_dim) -> per-instance mean and log-variance of f.

    forward(X, mask, n_samples=None, variance=False): n_samples None pools on the mean path, an int >= 1
    draws that many samples. A bag must hold at least one real instance.
    """

    def __init__(self, in_dim: int, att_dim: int = 128, covar_mode: str = "diag") -> None:
        super().__init__()
        if covar_mode not in COVAR_MODES:
            raise ValueError(
                f"covar_mode must be one of {COVAR_MODES}, got {covar_mode!r} (torchmil 1.0.2 implements "
                "only these two; a full covariance would be N x N per bag)"
            )
        self.covar_mode = covar_mode
        hidden = 2 * att_dim
        self.in_mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.mean_head = nn.Linear(hidden, 1)
        self.log_var_head = nn.Linear(hidden, 1) if covar_mode == "diag" else None

    def distribution(self, X: torch.Tensor, variance: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean and log-variance of each instance's attention logit, (batch, bag) each.

        variance=False skips the log-variance head (None), so the mean path's graph holds no unused
        weights. Rows are independent: padded rows only produce values that the callers mask out.
        """
        hidden = self.in_mlp(X)  # (batch, bag, 2 * att_dim)
        mean = self.mean_head(hidden).squeeze(-1)  # (batch, bag)
        if not variance or self.log_var_head is None:
            return mean, None
        return mean, self.log_var_head(hidden).squeeze(-1)  # (batch, bag) each

    def sample_logits(self, mean: torch.Tensor, log_var: torch.Tensor | None, n_samples: int) -> torch.Tensor:
        """(batch, samples, bag) draws of f by reparameterisation; the mean itself when there is no variance.

        The noise is drawn in torchmil's (batch, bag, samples) layout and transposed, so under the same
        seed a training step sees torchmil's draws.
        """
        if log_var is None:
            return mean.unsqueeze(1)  # (batch, 1, bag)
        batch, bag = mean.shape
        noise = torch.randn(batch, bag, n_samples, device=mean.device, dtype=mean.dtype).transpose(1, 2)
        std = torch.exp(0.5 * log_var).unsqueeze(1)  # (batch, 1, bag)
        samples = mean.unsqueeze(1) + std * noise  # (batch, samples, bag)
        return samples.clamp(-LOGIT_CLIP, LOGIT_CLIP)

    def forward(
        self, X: torch.Tensor, mask: torch.Tensor | None = None, n_samples: int | None = None, variance: bool = False
    ) -> PoolOutput:
        """variance=True also returns log_var on the mean path (the KL term needs it)."""
        mean, log_var = self.distribution(X, variance or n_samples is not None)  # (batch, bag) each
        if n_samples is None:
            logits = mean.unsqueeze(1)  # (batch, 1, bag)
        else:
            if n_samples < 1:
                raise ValueError(f"n_samples must be >= 1 (or None for the mean path), got {n_samples}")
            logits = self.sample_logits(mean, log_var, n_samples)  # (batch, samples, bag)
        row_mask = mask.unsqueeze(1) if mask is not None else None  # (batch, 1, bag)
        weights = masked_softmax(logits, row_mask)  # (batch, samples, bag)
        if mask is not None:
            # 0 * NaN/Inf is NaN: clear padded rows so whatever the padding holds cannot reach the pool.
            X = X.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, dim)
        pooled = torch.bmm(weights, X)  # (batch, samples, dim)
        return PoolOutput(pooled, weights, mean, log_var)

    def kl_divergence(
        self,
        mean: torch.Tensor,
        log_var: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        edge_index: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-bag KL term (batch,), scaled by 1 / N_b as torchmil scales it (see the module docstring).

        edge_index (2, E) indexes the flattened (batch * bag) node space (mil_train.data.collate's
        layout), edge_weight (E,) holds A's entries (1 where None); self loops are A's diagonal. With no
        edges A = 0 and the prior has no neighbour coupling.
        """
        batch, bag = mean.shape
        if mask is None:
            mask = torch.ones_like(mean, dtype=torch.bool)
        mean = mean.masked_fill(~mask, 0.0)  # (batch, bag)
        n_real = mask.sum(dim=1).to(mean.dtype)  # (batch,)
        energy = (mean * mean).sum(dim=1)  # (batch,) mean^T I mean
        if log_var is not None:
            variance = torch.exp(log_var).masked_fill(~mask, 0.0)  # (batch, bag)
            energy = energy + variance.sum(dim=1) - 0.5 * log_var.masked_fill(~mask, 0.0).sum(dim=1)
        if edge_index is not None and edge_index.shape[1] > 0:
            energy = energy - self._adjacency_terms(mean, log_var, mask, edge_index, edge_weight, bag)
        return energy / n_real

    @staticmethod
    def _adjacency_terms(mean, log_var, mask, edge_index, edge_weight, bag: int) -> torch.Tensor:
        """mean^T A mean + tr(A Sigma) per bag (batch,), from the edge list in O(E)."""
        source, target = edge_index[0], edge_index[1]  # (E,) each
        weight = edge_weight.to(mean.dtype) if edge_weight is not None else torch.ones_like(source, dtype=mean.dtype)
        flat_mean = mean.reshape(-1)  # (batch * bag,) 0 on padding
        per_edge = weight * flat_mean[source] * flat_mean[target]  # (E,)
        if log_var is not None:
            flat_variance = torch.exp(log_var).masked_fill(~mask, 0.0).reshape(-1)  # (batch * bag,)
            per_edge = per_edge + torch.where(source == target, weight * flat_variance[source], 0.0)  # (E,)
        bag_of_edge = torch.div(source, bag, rounding_mode="floor")  # (E,)
        return torch.zeros(mean.shape[0], dtype=mean.dtype, device=mean.device).scatter_add(0, bag_of_edge, per_edge)
