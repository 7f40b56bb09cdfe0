"""`ClassificationTask`: bag classes, the default task (binary sigmoid with one logit, or softmax)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mil_train.tasks.task import Task


class ClassificationTask(Task):
    """n_classes = 1: one logit, sigmoid, BCE; n_classes >= 2: softmax, cross-entropy (as always)."""

    type = "classification"

    def __init__(self, n_classes: int = 1) -> None:
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.n_classes = n_classes
        self.head_dim = n_classes

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.n_classes == 1 else torch.softmax(logits, dim=-1)

    def loss(self, logits: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        if self.n_classes == 1:
            return nn.functional.binary_cross_entropy_with_logits(logits.reshape(-1), Y.reshape(-1).float())
        return nn.functional.cross_entropy(logits, Y.reshape(-1).long())

    def outputs(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": logits, "probabilities": self.probabilities(logits)}

    def metrics(self, logits: torch.Tensor, Y: torch.Tensor) -> dict[str, float]:
        from mil_train.metrics import classification_metrics

        # float64: float32's sigmoid is exactly 1 past a logit of ~17, which ties confident bags in AUROC
        # (and PyTorch and onnxruntime tie them at slightly different logits)
        probabilities = self.probabilities(logits.double()).numpy()
        return classification_metrics(Y.numpy(), probabilities, self.n_classes)

    def to_config(self) -> dict[str, Any]:
        return {"type": self.type}
