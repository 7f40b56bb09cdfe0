"""ProbSmoothABMIL: ABMIL with probabilistic smooth attention (Castro-Macias, Morales-Alvarez, Wu, Molina,
Katsaggelos, Pattern Recognition 2025, arXiv 2507.14932).

`ProbSmoothHead` holds what ProbSmoothABMIL and TransformerProbSmoothABMIL share: the probabilistic
pool, the linear classifier, the deterministic inference path, sampling in training, and the loss
with its KL term. The two models differ only in how instances are encoded before the pool.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from mil_train.data.graphs import batch_graph
from mil_train.models.base import MILModel, MILOutput
from mil_train.models.registry import register_model
from mil_train.nn import ProbSmoothAttentionPool

FALLBACK_GRAPH_RULE = "grid8"  # the prior's graph when a batch has coords but no edges (torchmil's 8-neighbours)


class ProbSmoothHead(MILModel):
    """Shared body: encode instances -> probabilistic attention pool -> linear classifier.

    Eval mode pools with softmax(mean logits) (one deterministic pass). Train mode draws
    n_samples_train logit vectors and returns the average over draws: logits = mean of the per-draw
    logits, attention = mean of the per-draw softmax weights (the weights that pool to those logits,
    since the classifier is linear). `sample` gives the Monte Carlo predictions in any mode.
    Subclasses build `self.pool`, `self.classifier` and override `encode`.
    """

    pool: ProbSmoothAttentionPool
    classifier: nn.Linear

    def _check_samples(self, n_samples_train: int, n_samples_test: int) -> None:
        for name, value in (("n_samples_train", n_samples_train), ("n_samples_test", n_samples_test)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.n_samples_train = int(n_samples_train)
        self.n_samples_test = int(n_samples_test)

    def encode(self, X: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Instance features the pool reads, (batch, bag, dim)."""
        return X

    def _pooled_logits(self, X, mask, n_samples, variance: bool = False):
        """(per-draw logits (batch, samples, n_classes), PoolOutput)."""
        H = self.encode(X, mask)  # (batch, bag, dim)
        pool = self.pool(H, mask, n_samples, variance)
        return self.classifier(pool.pooled), pool  # (batch, samples, n_classes)

    def forward(
        self,
        X: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        edge_index: torch.Tensor | None = None,
        edge_weight: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> MILOutput:
        n_samples = self.n_samples_train if self.training else None
        logits, pool = self._pooled_logits(X, mask, n_samples)  # (batch, samples, n_classes)
        return MILOutput(logits=logits.mean(dim=1), attention=pool.weights.mean(dim=1))

    @torch.no_grad()
    def sample(
        self, X: torch.Tensor, mask: torch.Tensor | None = None, n_samples: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Monte Carlo predictions: (logits (batch, samples, n_classes), weights (batch, samples, bag)).

        n_samples defaults to n_samples_test (torchmil's test-time draws); memory is O(batch * samples * bag).
        Their spread is the predictive uncertainty the paper maps; `forward` stays deterministic in eval.
        """
        logits, pool = self._pooled_logits(X, mask, n_samples or self.n_samples_test)
        return logits, pool.weights

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits (batch, n_classes), {"cls", "kl"}); both weigh 1, as in torchmil.

        cls: in training, the classification loss averaged over the n_samples_train draws (each draw's
        logits against the bag label, as torchmil's criterion over its (batch, samples) predictions);
        in eval, the loss of the deterministic logits. kl: the pool's KL term averaged over the bags.
        The prior's graph is the batch's edge_index / edge_weight; without them, grid8 over the batch's
        coords; without coords, no edges (a warning says so).
        """
        X, mask = batch["X"], batch.get("mask", None)
        n_samples = self.n_samples_train if self.training else None
        logits, pool = self._pooled_logits(X, mask, n_samples, variance=True)  # (batch, samples, n_classes)
        samples = logits.shape[1]
        Y = batch["Y"].reshape(logits.shape[0], -1)  # (batch, 1) or (batch, n_classes)
        Y = Y.unsqueeze(1).expand(-1, samples, -1).reshape(logits.shape[0] * samples, -1)
        cls = self.classification_loss(logits.reshape(logits.shape[0] * samples, -1), Y.squeeze(-1))
        edge_index, edge_weight = self._prior_graph(batch, mask)
        kl = self.pool.kl_divergence(pool.mean, pool.log_var, mask, edge_index, edge_weight).mean()
        return logits.mean(dim=1), {"cls": cls, "kl": kl}

    @staticmethod
    def _prior_graph(batch: Any, mask: torch.Tensor | None):
        edge_index = batch.get("edge_index", None)
        if edge_index is not None:
            return edge_index, batch.get("edge_weight", None)
        coords = batch.get("coords", None)
        if coords is not None:
            edge_index, edge_weight = batch_graph(coords.cpu(), None if mask is None else mask.cpu(), FALLBACK_GRAPH_RULE)
            return edge_index.to(coords.device), edge_weight.to(coords.device)
        warnings.warn(
            "the batch has neither edge_index nor coords, so the KL prior has no neighbours and does not "
            "smooth attention; give the bags coords or a graph (e.g. MILDataset(bags, graph_rule='grid8'))",
            stacklevel=3,
        )
        return None, None


@register_model
class ProbSmoothABMIL(ProbSmoothHead):
    """Probabilistic smooth attention pool over the raw instance features -> linear classifier.

    Args:
        in_dim: instance feature dimension D.
        n_classes: 1 for binary (sigmoid), >= 2 for softmax.
        att_dim: the pool's MLP has width 2 * att_dim (torchmil default 128).
        covar_mode: "diag" (Gaussian attention logits with per-instance variance) or "zero"
            (deterministic logits; the KL term reduces to the Dirichlet energy of the mean).
        n_samples_train: attention draws per bag in a training step (torchmil default 1000).
        n_samples_test: draws for `sample` (torchmil default 5000); eval-mode `forward` does not sample.
    """

    name = "ProbSmoothABMIL"

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        att_dim: int = 128,
        covar_mode: str = "diag",
        n_samples_train: int = 1000,
        n_samples_test: int = 5000,
    ) -> None:
        super().__init__(
            n_classes=n_classes,
            in_dim=in_dim,
            att_dim=att_dim,
            covar_mode=covar_mode,
            n_samples_train=n_samples_train,
            n_samples_test=n_samples_test,
        )
        self._check_samples(n_samples_train, n_samples_test)
        self.pool = ProbSmoothAttentionPool(in_dim, att_dim, covar_mode)
        self.classifier = nn.Linear(in_dim, n_classes)
