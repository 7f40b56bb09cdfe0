"""Class imbalance: class weights for the loss (`--class-weights auto`) and a balanced sampler.

Two remedies, usable alone or together:

- `auto_class_weights(labels, n_classes)` gives class c the weight n / (K * n_c) (K classes, n_c bags
  of class c; scikit-learn's "balanced"), so every class carries the same total weight. The Trainer
  (`Trainer(class_weights=...)`) then trains on the mean over the batch of w[y_i] * loss_i, for the
  terms a model computes with its `classification_loss` ("cls", and DSMIL's max-instance term). The
  weights multiply each bag's loss rather than normalising by their sum as torch's
  `cross_entropy(weight=...)` does: with the usual batch of one bag that normalisation would cancel
  them. Validation losses stay unweighted; monitor balanced accuracy or AUROC on imbalanced data.
- `balanced_sampler(labels, seed)` draws each epoch's bags with replacement, with probability
  proportional to 1 / n_{y_i}, so each class makes up about the same share of an epoch; its own
  seeded generator makes the draws repeat run to run, and a resumed run continues them.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import WeightedRandomSampler


def auto_class_weights(labels: Sequence[int], n_classes: int) -> list[float]:
    """n / (K * n_c) per class c (K = 2 for a binary model, n_classes = 1); every class must occur."""
    n_kinds = 2 if n_classes == 1 else n_classes
    counts = Counter(int(y) for y in labels)
    missing = [c for c in range(n_kinds) if counts[c] == 0]
    if missing:
        raise ValueError(f"class(es) {missing} have no training bag, so they get no weight; check the labels")
    return [len(labels) / (n_kinds * counts[c]) for c in range(n_kinds)]


def balanced_sampler(labels: Sequence[int], seed: int = 0, num_samples: int | None = None) -> WeightedRandomSampler:
    """Draws `num_samples` (default: as many as there are bags) indices per epoch, classes about equal."""
    counts = Counter(int(y) for y in labels)
    weights = torch.tensor([1.0 / counts[int(y)] for y in labels], dtype=torch.float64)  # (n_bags,)
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, num_samples or len(labels), replacement=True, generator=generator)


def weighted_classification_loss(n_classes: int, weights: torch.Tensor):
    """A `classification_loss(logits, Y)` that weighs bag i's loss by weights[Y_i] (see the module docstring)."""

    def loss(logits: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        classes = Y.reshape(-1).long()  # (batch,)
        if n_classes == 1:
            per_bag = torch.nn.functional.binary_cross_entropy_with_logits(
                logits.reshape(-1), classes.to(logits.dtype), reduction="none")  # (batch,)
        else:
            per_bag = torch.nn.functional.cross_entropy(logits, classes, reduction="none")  # (batch,)
        return (weights.to(per_bag.device, per_bag.dtype)[classes] * per_bag).mean()

    return loss


@contextlib.contextmanager
def class_weighted(model: torch.nn.Module, weights: Sequence[float] | None) -> Iterator[None]:
    """Within the block, `model.classification_loss` weighs each bag by its class (no-op for None).

    The weighted loss shadows the method on this one model object, so nothing changes for other
    models, for evaluation outside the block, or in the saved checkpoint.
    """
    if weights is None:
        yield
        return
    if not getattr(model, "is_classifier", True):
        raise ValueError(f"class weights are for classification; this model's task is {model.task.type}")
    if not hasattr(model, "classification_loss"):
        raise ValueError(f"{type(model).__name__} has no classification_loss, so class weights cannot apply")
    n_classes = int(getattr(model, "n_classes", 1))
    expected = 2 if n_classes == 1 else n_classes
    if len(weights) != expected:
        raise ValueError(f"class weights give {len(weights)} values, the model has {expected} classes")
    model.classification_loss = weighted_classification_loss(n_classes, torch.tensor(list(weights)))
    try:
        yield
    finally:
        del model.classification_loss  # the class's own method shows again
