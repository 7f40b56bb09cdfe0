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
