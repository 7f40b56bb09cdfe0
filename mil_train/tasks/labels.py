"""From bags with regression or survival labels to a task: checked labels, bins, target scaling.

`mil-train --task survival|regression` goes through `prepare_task`: it checks each bag's label,
places the survival bins (quantiles of the observed event times, PatchGCN's rule) or the targets'
mean and std over all the bags, as PatchGCN computes its bins over the whole cohort before splitting
(they describe the label scale, and no model parameter is fitted with them), and returns the
model's `task=` config and the labels to stratify the split by (the event indicator for survival,
none for regression).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mil_train.tasks.survival_losses import survival_bin_edges


def task_labels(bags: Sequence[Any], task_type: str) -> np.ndarray:
    """(n_bags, width) float64 labels: survival (time, event), regression the targets; ValueError if bad."""
    rows = []
    for i, bag in enumerate(bags):
        label = np.asarray(bag["Y"], dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(label)):
            raise ValueError(f"bag {i} has label {label.tolist()}; every bag needs a finite label")
        if task_type == "survival" and (label.size != 2 or label[0] < 0 or label[1] not in (0.0, 1.0)):
            raise ValueError(f"bag {i} has label {label.tolist()}; survival needs (time >= 0, event 0 or 1) per bag")
        rows.append(label)
    if not rows:
        raise ValueError("the data holds no bags")
    if len({row.size for row in rows}) != 1:
        raise ValueError("bags have labels of different lengths; give every bag the same targets")
    return np.stack(rows)


def prepare_task(task_type: str, options: dict[str, Any], bags: Sequence[Any],
                 target_names: Sequence[str] | None = None) -> tuple[dict[str, Any], list[int]]:
    """(the model's task config, stratification labels) for `task_type` on `bags`.

    options: the task's own (e.g. {"loss": "cox"}, {"n_bins": 8}, {"loss": "huber"}); what they leave
    out is filled in from the labels.
    """
    labels = task_labels(bags, task_type)
    task = {"type": task_type, **options}
    if task_type == "survival":
        if not labels[:, 1].any():
            raise ValueError("no bag has an observed event (event = 1): a survival model has nothing to learn from")
        if task.get("loss", "nll") == "nll" and task.get("bin_edges") is None:
            task["bin_edges"] = survival_bin_edges(labels[:, 0], labels[:, 1], int(task.get("n_bins", 4)))
        return task, [int(event) for event in labels[:, 1]]
    task.setdefault("n_targets", labels.shape[1])
    if task["n_targets"] != labels.shape[1]:
        raise ValueError(f"n_targets={task['n_targets']} but the bags have {labels.shape[1]} targets each")
    task.setdefault("target_mean", [float(v) for v in labels.mean(axis=0)])
    spread = labels.std(axis=0)
    task.setdefault("target_std", [float(v) if v > 0 else 1.0 for v in spread])  # a constant target: unscaled
    if target_names is not None:
        task.setdefault("target_names", list(target_names))
    return task, [0] * len(bags)
