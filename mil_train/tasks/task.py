"""`Task`: what a model's head predicts, how it is trained, and how it is scored and exported.

A task owns the meaning of the model's last layer. The architecture only sees `head_dim`, the width of
its output (passed to the model as `n_classes`); the task turns those raw outputs ("logits") into a
loss, named outputs for the exported graph, and metrics. Three tasks exist: classification (the
default, unchanged), regression and survival (`mil_train.tasks.make_task`).
"""

from __future__ import annotations

from typing import Any

import torch


class Task:
    """Base class. Subclasses set `type`, `head_dim` and implement the methods below."""

    type: str = ""
    head_dim: int = 1

    def loss(self, logits: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Scalar training loss of the head's raw outputs (batch, head_dim) against the bag labels Y."""
        raise NotImplementedError

    def outputs(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The task's named outputs, in contract order (the exported graph has these, then `attention`)."""
        raise NotImplementedError

    def metrics(self, logits: torch.Tensor, Y: torch.Tensor) -> dict[str, float]:
        """Scores over a whole evaluated set (not averaged per batch)."""
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        """JSON-able description that `make_task` rebuilds the task from (stored in the model's config)."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """What the exported file's `milkit.task` records beyond the outputs (see mil_runtime.contract)."""
        return self.to_config()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_config()})"
