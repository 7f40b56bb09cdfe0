"""Tasks a model's head can learn: classification (default), regression, survival.

    create_model("ABMIL", in_dim=1024, task="regression")
    create_model("ABMIL", in_dim=1024, task={"type": "regression", "n_targets": 2, "loss": "huber"})
    edges = survival_bin_edges(times, events, n_bins=4)
    create_model("TransMIL", in_dim=1024, task={"type": "survival", "n_bins": 4, "bin_edges": edges})
    create_model("ABMIL", in_dim=1024, task={"type": "survival", "loss": "cox"})

Labels: classification a class index; regression a value or a (n_targets,) vector; survival a
(time, event) pair (event 1 = observed, 0 = censored).
"""

from __future__ import annotations

from typing import Any

from mil_train.tasks.classification import ClassificationTask
from mil_train.tasks.regression import REGRESSION_LOSSES, RegressionTask
from mil_train.tasks.survival import SURVIVAL_LOSSES, SurvivalTask
from mil_train.tasks.survival_losses import cox_partial_nll, discrete_hazard_nll, survival_bin_edges, time_bins
from mil_train.tasks.task import Task

TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "regression": RegressionTask,
    "survival": SurvivalTask,
}


def make_task(task: str | dict[str, Any] | Task | None, n_classes: int = 1) -> Task:
    """A Task from a name, a config dict ({"type": name, **options}) or a Task; None = classification.

    `n_classes` applies to classification only (the other tasks' head width follows from their options).
    """
    if isinstance(task, Task):
        return task
    if task is None:
        task = "classification"
    options: dict[str, Any] = {}
    if isinstance(task, dict):
        options = dict(task)
        task = options.pop("type", None)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "classification":
        return ClassificationTask(n_classes=options.pop("n_classes", n_classes), **options)
    return TASKS[task](**options)


__all__ = [
    "TASKS", "REGRESSION_LOSSES", "SURVIVAL_LOSSES", "ClassificationTask", "RegressionTask", "SurvivalTask", "Task",
    "cox_partial_nll", "discrete_hazard_nll", "make_task", "survival_bin_edges", "time_bins",
]
