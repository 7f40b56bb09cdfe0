"""CLAM's instance-level clustering (Lu et al. 2021): instance classifiers trained on attention pseudo-labels."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mil_train.nn.smooth_svm import SmoothTop1SVM

INSTANCE_LOSSES = ("SmoothTop1SVM", "CrossEntropyLoss", "BCEWithLogitsLoss")
OUTSIDE, INSIDE = 0, 1  # the two outputs of every instance classifier


class InstanceClustering(nn.Module):
    """One linear instance classifier per class, outputs (outside, inside) the class; the loss term only.

    For a bag of class y and each class c, the classifier of c sees instances picked by the attention
    of branch c (the one attention of a single-branch model, or c's own row in a multi-branch one):
      c == y (in the class):  the k most attended are labelled inside, the k least attended outside;
                              the term is the mean loss over those 2k instances.
      c != y (out of class):  only when `subtyping`: the k most attended are labelled outside, since
                              they belong to class y; the term is the mean over those k.
    k = min(k_sample, real instances of the bag), and padding is never picked. A bag's loss:
      binary (n_classes=1, one logit): two classifiers, for label 0 and label 1; loss = in + out, as
          torchmil's CLAM_SB (out only when `subtyping`).
      n_classes >= 2: CLAM's code: in + sum of the out terms, divided by n_classes when `subtyping`.

    Selection ranks the weights it is given; CLAM ranks its softmax weights (the same order as the raw
    scores; weights that underflow to exactly 0 tie, and ties go to the lower index).

    forward(H (batch, bag, dim), weights (batch, 1 or n_classifiers, bag), labels (batch,) class
    indices, mask (batch, bag)) -> (batch,) loss per bag.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 1,
        k_sample: int = 10,
        loss: str = "SmoothTop1SVM",
        subtyping: bool = True,
    ) -> None:
        super().__init__()
        if loss not in INSTANCE_LOSSES:
            raise ValueError(f"inst_loss_name must be one of {INSTANCE_LOSSES}, got {loss!r}")
        if k_sample < 1:
            raise ValueError(f"k_sample must be >= 1, got {k_sample}")
        self.binary = n_classes == 1
        self.n_classifiers = 2 if self.binary else n_classes
        self.k_sample = k_sample
        self.loss_name = loss
        self.subtyping = subtyping
        self.classifiers = nn.ModuleList(nn.Linear(in_dim, 2) for _ in range(self.n_classifiers))
        self.svm = SmoothTop1SVM(n_classes=2, reduction="none")

    def select(
        self, weights: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices of the k most and k least attended real instances per branch, and which ranks are real.

        weights: (batch, branches, bag). Returns top (batch, branches, k), bottom (batch, branches, k)
        and valid (batch, k): rank r is valid where the bag holds more than r real instances; the
        indices at invalid ranks point at padding and must not count.
        """
        batch, _, bag = weights.shape
        k = min(self.k_sample, bag)  # training-only: a Python int from a size is fine here
        if mask is None:
            mask = torch.ones(batch, bag, dtype=torch.bool, device=weights.device)
        real = mask.unsqueeze(1)  # (batch, 1, bag)
        top = weights.masked_fill(~real, float("-inf")).topk(k, dim=-1).indices  # (batch, branches, k)
        bottom = weights.masked_fill(~real, float("inf")).topk(k, dim=-1, largest=False).indices  # (batch, branches, k)
        ranks = torch.arange(k, device=weights.device)  # (k,)
        valid = ranks.unsqueeze(0) < mask.sum(dim=1, keepdim=True)  # (batch, k)
        return top, bottom, valid

    def forward(
        self,
        H: torch.Tensor,
        weights: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, bag, _ = H.shape
        weights = weights.expand(batch, self.n_classifiers, bag)  # (batch, classifiers, bag)
        if mask is not None:
            # Invalid ranks gather padded rows; zero them so that nothing they hold can reach a gradient.
            H = H.masked_fill(~mask.unsqueeze(-1), 0.0)  # (batch, bag, dim)
        top, bottom, valid = self.select(weights, mask)
        top_logits = self._classify(H, top)  # (batch, classifiers, k, 2)
        bottom_logits = self._classify(H, bottom)  # (batch, classifiers, k, 2)

        valid = valid.unsqueeze(1)  # (batch, 1, k)
        n_picked = valid.sum(dim=-1).to(H.dtype)  # (batch, 1)
        top_inside = _sum_valid(self._row_loss(top_logits, INSIDE), valid)  # (batch, classifiers)
        bottom_outside = _sum_valid(self._row_loss(bottom_logits, OUTSIDE), valid)  # (batch, classifiers)
        top_outside = _sum_valid(self._row_loss(top_logits, OUTSIDE), valid)  # (batch, classifiers)
        in_class = (top_inside + bottom_outside) / (2 * n_picked)  # (batch, classifiers)
        out_of_class = top_outside / n_picked  # (batch, classifiers)
        if not self.subtyping:
            out_of_class = torch.zeros_like(out_of_class)

        is_true_class = F.one_hot(labels.reshape(-1).long(), self.n_classifiers).bool()  # (batch, classifiers)
        per_bag = torch.where(is_true_class, in_class, out_of_class).sum(dim=-1)  # (batch,)
        if not self.binary and self.subtyping:
            per_bag = per_bag / self.n_classifiers
        return per_bag

    def _classify(self, H: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Classifier c applied to the instances that branch c picked: index (batch, classifiers, k)."""
        batch, n_classifiers, k = index.shape
        flat = index.reshape(batch, n_classifiers * k, 1).expand(-1, -1, H.shape[-1])  # (batch, classifiers*k, dim)
        picked = H.gather(1, flat).reshape(batch, n_classifiers, k, -1)  # (batch, classifiers, k, dim)
        weight = torch.stack([c.weight for c in self.classifiers])  # (classifiers, 2, dim)
        bias = torch.stack([c.bias for c in self.classifiers])  # (classifiers, 2)
        return torch.einsum("bckd,cod->bcko", picked, weight) + bias[None, :, None, :]  # (batch, classifiers, k, 2)

    def _row_loss(self, logits: torch.Tensor, target: int) -> torch.Tensor:
        """Loss of every row of logits (..., 2) against one pseudo-label -> (...)."""
        rows = logits.reshape(-1, 2)  # (rows, 2)
        targets = torch.full((rows.shape[0],), target, dtype=torch.long, device=logits.device)  # (rows,)
        if self.loss_name == "SmoothTop1SVM":
            loss = self.svm(rows, targets)  # (rows,)
        elif self.loss_name == "CrossEntropyLoss":
            loss = F.cross_entropy(rows, targets, reduction="none")  # (rows,)
        else:  # BCEWithLogitsLoss on the one-hot pseudo-label, averaged over the two outputs
            one_hot = F.one_hot(targets, 2).to(rows.dtype)  # (rows, 2)
            loss = F.binary_cross_entropy_with_logits(rows, one_hot, reduction="none").mean(dim=-1)  # (rows,)
        return loss.reshape(logits.shape[:-1])


def _sum_valid(loss: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sum of loss (batch, classifiers, k) over the valid ranks (batch, 1, k) -> (batch, classifiers)."""
    return torch.where(valid, loss, 0.0).sum(dim=-1)
