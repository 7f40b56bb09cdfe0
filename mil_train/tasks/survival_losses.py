"""Survival losses and the discretisation of survival times, as plain functions.

Labels are (time, event) pairs: `event` 1 = the event was observed at `time`, 0 = censored at `time`
(the patient was event-free at least until then).

- `discrete_hazard_nll`: the negative log-likelihood of a discrete-time hazard model (Zadeh and
  Schmid 2020), the survival loss of PatchGCN and MCAT. The head gives one logit per time bin; the
  hazard h_k = sigmoid(z_k) is the probability of the event in bin k given survival to its start, and
  S_k = prod_{j <= k} (1 - h_j). An event in bin y has likelihood S_{y-1} h_y; a patient censored in
  bin y is known to have survived it, likelihood S_y (PatchGCN's convention). `alpha` upweights the
  uncensored term as in their code (0 by default, as their training scripts).
  Computed with log-sigmoids, so no probability is clamped.
- `cox_partial_nll`: the negative Cox partial log-likelihood over a batch (Breslow's handling of tied
  times: everyone with time >= t_i is at risk at t_i), averaged over the batch's events.
- `survival_bin_edges` / `time_bins`: PatchGCN's bins, quantiles of the observed event times.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def time_bins(times: torch.Tensor, bin_edges: Sequence[float]) -> torch.Tensor:
    """(batch,) int64 bin index of each time: the number of inner edges <= time (bins are [a, b))."""
    edges = torch.as_tensor(list(bin_edges), dtype=times.dtype, device=times.device)  # (n_bins - 1,)
    return torch.searchsorted(edges, times.contiguous(), right=True)


def survival_bin_edges(times, events, n_bins: int) -> list[float]:
    """The n_bins - 1 inner edges splitting the observed (event = 1) times into equal-count bins.

    As PatchGCN: quantiles of the uncensored times; times beyond them fall in the first or last bin.
    """
    times, events = np.asarray(times, dtype=np.float64).reshape(-1), np.asarray(events).reshape(-1)
    observed = times[events > 0]
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if observed.size == 0:
        raise ValueError("no bag has an observed event (event = 1): survival bins cannot be placed")
    return [float(q) for q in np.quantile(observed, np.arange(1, n_bins) / n_bins)]


def discrete_hazard_nll(
    logits: torch.Tensor, bins: torch.Tensor, events: torch.Tensor, alpha: float = 0.0
) -> torch.Tensor:
    """Mean NLL of hazard logits (batch, n_bins) for event/censoring bins (batch,) and events (batch,)."""
    log_hazard = nn.functional.logsigmoid(logits)  # (batch, n_bins) log h_k
    log_survive_bin = nn.functional.logsigmoid(-logits)  # (batch, n_bins) log (1 - h_k)
    log_survival = torch.cumsum(log_survive_bin, dim=1)  # (batch, n_bins) log S_k
    zero = torch.zeros_like(log_survival[:, :1])  # (batch, 1) log S_{-1} = log 1
    log_survival_before = torch.cat([zero, log_survival[:, :-1]], dim=1)  # (batch, n_bins) log S_{k-1}
    index = bins.long().reshape(-1, 1)  # (batch, 1)
    observed = events.reshape(-1).to(logits.dtype)  # (batch,)
    uncensored = -observed * (log_survival_before.gather(1, index) + log_hazard.gather(1, index)).squeeze(1)
    censored = -(1.0 - observed) * log_survival.gather(1, index).squeeze(1)  # (batch,)
    return ((1.0 - alpha) * (censored + uncensored) + alpha * uncensored).mean()


def cox_partial_nll(risk: torch.Tensor, times: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood of risks (batch,), averaged over the events in the batch.

    A batch without an observed event carries no information: the loss is 0 (still attached to the
    graph). The risk sets are a (batch, batch) comparison, cheap at the batch sizes MIL trains with.
    """
    risk, times = risk.reshape(-1), times.reshape(-1)
    observed = events.reshape(-1) > 0  # (batch,)
    if not bool(observed.any()):
        return risk.sum() * 0.0
    at_risk = times[None, :] >= times[:, None]  # (batch, batch): row i = who is at risk at t_i
    log_denominator = torch.logsumexp(risk[None, :].masked_fill(~at_risk, float("-inf")), dim=1)  # (batch,)
    return -(risk - log_denominator)[observed].mean()
