"""Smooth top-1 SVM loss (Berrada, Zisserman, Kumar, ICLR 2018, arXiv 1802.07595): CLAM's instance loss."""

from __future__ import annotations

import math

import torch
from torch import nn

# A row whose best score leads the runner-up by tau * log(HARD_THRESHOLD) or more takes the hard
# (unsmoothed) form. The smooth form differs there by less than tau / HARD_THRESHOLD; the switch is
# kept so the values equal the reference implementations (oval-group/smooth-topk, torchmil).
HARD_THRESHOLD = 1e3


class SmoothTop1SVM(nn.Module):
    """Multi-class hinge loss max_c(x_c + alpha [c != y]) - x_y, smoothed with temperature tau:

        loss(x, y) = tau * log sum_c exp((x_c + alpha [c != y] - x_y) / tau)

    Args:
        n_classes: number of scores per row (>= 2).
        alpha: margin demanded between the true class and the others.
        tau: temperature; tau -> 0 recovers the hard hinge loss.
        reduction: "mean" over rows (the reference's value) or "none" (one loss per row).

    forward(logits (rows, n_classes), targets (rows,) class indices) -> scalar, or (rows,).
    """

    def __init__(self, n_classes: int, alpha: float = 1.0, tau: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"SmoothTop1SVM needs n_classes >= 2, got {n_classes}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        self.n_classes = n_classes
        self.alpha = alpha
        self.tau = tau
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.reshape(-1, 1).long()  # (rows, 1)
        classes = torch.arange(self.n_classes, device=logits.device)  # (n_classes,)
        margin = self.alpha * (classes != targets).to(logits.dtype)  # (rows, n_classes)
        excess = logits + margin - logits.gather(1, targets)  # (rows, n_classes)
        smooth = self.tau * torch.logsumexp(excess / self.tau, dim=1)  # (rows,)
        hard = excess.max(dim=1).values  # (rows,)
        best_two = logits.detach().topk(2, dim=1).values  # (rows, 2)
        use_hard = best_two[:, 0] - best_two[:, 1] >= self.tau * math.log(HARD_THRESHOLD)  # (rows,)
        loss = torch.where(use_hard, hard, smooth)  # (rows,)
        return loss.mean() if self.reduction == "mean" else loss
