"""`RegressionTask`: one or more continuous targets per bag, MSE or Huber loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mil_train.tasks.task import Task

REGRESSION_LOSSES = ("mse", "huber")


class RegressionTask(Task):
    """The head predicts `n_targets` values per bag.

    Args:
        n_targets: number of continuous targets (Y is () for one target, (n_targets,) otherwise).
        loss: "mse" or "huber" (smooth L1 with `delta`, robust to outlying targets).
        delta: the Huber threshold, in standardised target units.
        target_mean, target_std: the training targets' mean and std (one per target, or None). The
            head learns the standardised target (Y - mean) / std, so the loss is scale-free and the
            default learning rates work for targets in any unit; `outputs` undoes it, so the exported
            `values` are in the targets' own units. None: mean 0, std 1 (raw targets).
        target_names: a name per target (the exported file and mil-infer report values by name);
            None: "value", or value_0, value_1, ...
    """

    type = "regression"

    def __init__(
        self,
        n_targets: int = 1,
        loss: str = "mse",
        delta: float = 1.0,
        target_mean: Sequence[float] | None = None,
        target_std: Sequence[float] | None = None,
        target_names: Sequence[str] | None = None,
    ) -> None:
        if n_targets < 1:
            raise ValueError(f"n_targets must be >= 1, got {n_targets}")
        if loss not in REGRESSION_LOSSES:
            raise ValueError(f"regression loss must be one of {REGRESSION_LOSSES}, got {loss!r}")
        if delta <= 0:
            raise ValueError(f"delta must be > 0, got {delta}")
        self.n_targets = self.head_dim = n_targets
        self.loss_name, self.delta = loss, float(delta)
        self.target_mean = _per_target(target_mean, n_targets, 0.0, "target_mean")
        self.target_std = _per_target(target_std, n_targets, 1.0, "target_std")
        if any(s <= 0 for s in self.target_std):
            raise ValueError(f"target_std must be > 0, got {self.target_std}")
        self.target_names = None if target_names is None else [str(n) for n in target_names]
        if self.target_names is not None and len(set(self.target_names)) != n_targets:
            raise ValueError(f"target_names must be {n_targets} distinct names, got {self.target_names}")

    def _scale(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.target_mean, dtype=like.dtype, device=like.device)  # (n_targets,)
        std = torch.tensor(self.target_std, dtype=like.dtype, device=like.device)  # (n_targets,)
        return mean, std

    def targets(self, Y: torch.Tensor, batch: int) -> torch.Tensor:
        """(batch, n_targets) float targets from Y (batch,) or (batch, n_targets)."""
        Y = Y.reshape(batch, -1).float()  # (batch, n_targets)
        if Y.shape[1] != self.n_targets:
            raise ValueError(f"regression with n_targets={self.n_targets} got labels of shape {tuple(Y.shape)}")
        return Y

    def loss(self, logits: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        mean, std = self._scale(logits)
        standardised = (self.targets(Y, logits.shape[0]) - mean) / std  # (batch, n_targets)
        if self.loss_name == "mse":
            return nn.functional.mse_loss(logits, standardised)
        return nn.functional.huber_loss(logits, standardised, delta=self.delta)

    def outputs(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        mean, std = self._scale(logits)
        return {"values": logits * std + mean}  # (batch, n_targets), in the targets' units

    def metrics(self, logits: torch.Tensor, Y: torch.Tensor) -> dict[str, float]:
        from mil_train.metrics import regression_metrics

        values = self.outputs(logits.float())["values"].numpy()
        return regression_metrics(self.targets(Y, logits.shape[0]).numpy(), values)

    def to_config(self) -> dict[str, Any]:
        config = {"type": self.type, "n_targets": self.n_targets, "loss": self.loss_name, "delta": self.delta,
                  "target_mean": list(self.target_mean), "target_std": list(self.target_std)}
        if self.target_names is not None:
            config["target_names"] = list(self.target_names)
        return config


def _per_target(values: Sequence[float] | float | None, n: int, default: float, what: str) -> list[float]:
    if values is None:
        return [default] * n
    if isinstance(values, (int, float)):
        values = [values]
    values = [float(v) for v in values]
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} values for {n} targets")
    return values
