"""Bag-level classification metrics, computed by scikit-learn.

`classification_metrics(y_true, probabilities, n_classes)` returns AUROC, accuracy, balanced accuracy
and F1 for both tasks the models support:

- binary (n_classes=1): `probabilities` are sigmoid outputs, shape (n,) or (n, 1); the predicted class
  is probability >= 0.5; F1 is the F1 of the positive class.
- multiclass (n_classes>=2): softmax outputs (n, n_classes); the prediction is the argmax; AUROC is the
  macro one-vs-rest AUROC and F1 the macro F1.

AUROC is undefined when the evaluated set lacks a class (a single-class validation split, or a
multiclass split where some class never occurs): it is then reported as NaN, never as an error, so a
small validation split cannot stop a training run. Monitor loss or accuracy on such splits.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

METRIC_NAMES = ("auroc", "accuracy", "balanced_accuracy", "f1")


def predicted_classes(probabilities: np.ndarray, n_classes: int) -> np.ndarray:
    """Class indices from probabilities: threshold 0.5 (binary) or argmax (multiclass)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if n_classes == 1:
        return (probabilities.reshape(-1) >= 0.5).astype(np.int64)
    return probabilities.argmax(axis=1)


def auroc(y_true: np.ndarray, probabilities: np.ndarray, n_classes: int) -> float:
    """Binary AUROC or macro one-vs-rest AUROC; NaN when some class is absent from `y_true`."""
    y_true = np.asarray(y_true).reshape(-1).astype(np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n_expected = 2 if n_classes == 1 else n_classes
    if np.unique(y_true).size < n_expected:
        return float("nan")
    if n_classes == 1:
        return float(roc_auc_score(y_true, probabilities.reshape(-1)))
    # sklearn's multiclass AUROC wants rows summing to exactly 1; float32 softmax is off by ~1e-7.
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    return float(
        roc_auc_score(y_true, probabilities, multi_class="ovr", average="macro", labels=np.arange(n_classes))
    )


def classification_metrics(y_true, probabilities, n_classes: int) -> dict[str, float]:
    """AUROC, accuracy, balanced accuracy and F1 (see the module docstring for each task)."""
    y_true = np.asarray(y_true).reshape(-1).astype(np.int64)
    y_pred = predicted_classes(probabilities, n_classes)
    with warnings.catch_warnings():
        # Single-class splits make sklearn warn about ill-defined scores; we report them as they are.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return {
            "auroc": auroc(y_true, probabilities, n_classes),
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "f1": float(
                f1_score(
                    y_true,
                    y_pred,
                    average="binary" if n_classes == 1 else "macro",
                    labels=None if n_classes == 1 else np.arange(n_classes),
                    zero_division=0.0,
                )
            ),
        }


# -- regression and survival -------------------------------------------------------------------

REGRESSION_METRIC_NAMES = ("mae", "rmse", "r2")
SURVIVAL_METRIC_NAMES = ("c_index",)
# metrics where lower is better (the Trainer monitors them with mode "min")
LOWER_IS_BETTER = ("mae", "rmse")


def regression_metrics(y_true, predictions) -> dict[str, float]:
    """MAE, RMSE and R², averaged uniformly over the targets (y_true, predictions: (n,) or (n, k)).

    R² is NaN on a set with fewer than two bags or a constant target (it is undefined there).
    """
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    predictions = np.asarray(predictions, dtype=np.float64).reshape(y_true.shape)
    constant = y_true.shape[0] < 2 or bool(np.any(np.ptp(y_true, axis=0) == 0))
    return {
        "mae": float(mean_absolute_error(y_true, predictions)),
        "rmse": float(np.sqrt(mean_squared_error(y_true, predictions))),
        "r2": float("nan") if constant else float(r2_score(y_true, predictions)),
    }


def concordance_index(times, events, risk) -> float:
    """Harrell's concordance index of `risk` (higher = earlier event) against censored times.

    A pair (i, j) is comparable when t_i < t_j and bag i's event was observed (event_i = 1): then i is
    known to have had the event first. It is concordant when risk_i > risk_j; tied risks count 1/2.
    Pairs with equal times are not compared. NaN when no pair is comparable. O(n^2) memory in blocks
    of rows, fine for the thousands of bags a validation set holds.
    """
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    events = np.asarray(events).reshape(-1) > 0
    risk = np.asarray(risk, dtype=np.float64).reshape(-1)
    concordant, comparable = 0.0, 0
    for start in range(0, times.size, 1024):  # rows i in blocks: a (block, n) comparison at a time
        rows = slice(start, start + 1024)
        pairs = (times[rows, None] < times[None, :]) & events[rows, None]  # (block, n)
        higher = risk[rows, None] > risk[None, :]  # (block, n)
        tied = risk[rows, None] == risk[None, :]  # (block, n)
        concordant += float(np.sum(pairs & higher)) + 0.5 * float(np.sum(pairs & tied))
        comparable += int(np.sum(pairs))
    return float("nan") if comparable == 0 else concordant / comparable
