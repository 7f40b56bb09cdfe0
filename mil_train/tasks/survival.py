"""`SurvivalTask`: time-to-event per bag, with censoring; discrete-time hazards (NLL) or Cox."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mil_train.tasks.survival_losses import cox_partial_nll, discrete_hazard_nll, time_bins
from mil_train.tasks.task import Task

SURVIVAL_LOSSES = ("nll", "cox")


class SurvivalTask(Task):
    """Bag labels Y = (time, event): event 1 observed, 0 censored.

    Args:
        loss: "nll" (default): a discrete-time hazard head, one logit per time bin, trained with the
            PatchGCN/MCAT negative log-likelihood; outputs `hazards` (batch, n_bins), `survival`
            (batch, n_bins) = S_k, the probability of being event-free at the end of bin k, and
            `risk` (batch,) = -sum_k S_k (PatchGCN's risk: higher = earlier event).
            "cox": one logit, the log relative hazard, trained with the Cox partial likelihood (needs
            batches of several bags, since each loss compares a batch's bags); outputs `risk` only
            (a Cox model has no baseline hazard, hence no survival curve).
        n_bins: time bins of the "nll" head (PatchGCN uses 4).
        bin_edges: the n_bins - 1 inner edges, in the times' unit (`survival_bin_edges` on the training
            bags); needed to train with "nll", recorded in the exported file so that bin k's time span
            is known.
        alpha: weight of the extra uncensored term of the NLL (PatchGCN's alpha_surv, default 0).
    """

    type = "survival"

    def __init__(
        self, loss: str = "nll", n_bins: int = 4, bin_edges: Sequence[float] | None = None, alpha: float = 0.0
    ) -> None:
        if loss not in SURVIVAL_LOSSES:
            raise ValueError(f"survival loss must be one of {SURVIVAL_LOSSES}, got {loss!r}")
        if loss == "nll" and n_bins < 2:
            raise ValueError(f"a discrete-time hazard head needs n_bins >= 2, got {n_bins}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.loss_name, self.alpha = loss, float(alpha)
        self.n_bins = n_bins if loss == "nll" else 1
        self.head_dim = self.n_bins
        self.bin_edges = None if bin_edges is None else [float(e) for e in bin_edges]
        if loss == "nll" and self.bin_edges is not None:
            if len(self.bin_edges) != n_bins - 1 or any(b < a for a, b in zip(self.bin_edges, self.bin_edges[1:])):
                raise ValueError(f"bin_edges must be {n_bins - 1} non-decreasing times, got {self.bin_edges}")

    @staticmethod
    def split_label(Y: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(times (batch,), events (batch,)) from Y (batch, 2)."""
        Y = Y.reshape(batch, -1)
        if Y.shape[1] != 2:
            raise ValueError(f"survival labels are (time, event) pairs, got labels of shape {tuple(Y.shape)}")
        return Y[:, 0].float(), Y[:, 1].float()

    def loss(self, logits: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        times, events = self.split_label(Y, logits.shape[0])
        if self.loss_name == "cox":
            return cox_partial_nll(logits[:, 0], times, events)
        if self.bin_edges is None:
            raise ValueError(
                "the survival task has no bin_edges: pass task={'type': 'survival', 'bin_edges': "
                "mil_train.tasks.survival_bin_edges(times, events, n_bins)} computed on the training bags"
            )
        return discrete_hazard_nll(logits, time_bins(times, self.bin_edges), events, self.alpha)

    def outputs(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.loss_name == "cox":
            return {"risk": logits[:, 0]}  # (batch,)
        hazards = torch.sigmoid(logits)  # (batch, n_bins)
        # S_k = prod_{j <= k} (1 - h_j) as exp of a cumulative sum of log-sigmoids: exact where 1 - h
        # rounds to 0 in float32, and it exports to ONNX (cumprod does not)
        survival = torch.exp(torch.cumsum(torch.nn.functional.logsigmoid(-logits), dim=1))  # (batch, n_bins)
        return {"risk": -survival.sum(dim=1), "hazards": hazards, "survival": survival}

    def metrics(self, logits: torch.Tensor, Y: torch.Tensor) -> dict[str, float]:
        from mil_train.metrics import concordance_index

        times, events = self.split_label(Y, logits.shape[0])
        risk = self.outputs(logits.float())["risk"]
        return {"c_index": concordance_index(times.numpy(), events.numpy(), risk.numpy())}

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"type": self.type, "loss": self.loss_name}
        if self.loss_name == "nll":
            config.update(n_bins=self.n_bins, bin_edges=self.bin_edges, alpha=self.alpha)
        return config
