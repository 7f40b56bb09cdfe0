"""mil_train.metrics against hand-computed small cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from mil_train.metrics import classification_metrics, predicted_classes


def test_binary_hand_computed():
    y = [0, 0, 1, 1, 1]
    p = [0.1, 0.6, 0.4, 0.8, 0.9]
    m = classification_metrics(y, p, n_classes=1)
    # Predictions 0,1,0,1,1 -> TP=2, FP=1, FN=1, TN=1.
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # Pairs (neg, pos) ranked right: 0.1 beats all 3; 0.6 beats 0.8, 0.9 -> 5 of 6.
    assert m["auroc"] == pytest.approx(5 / 6)


def test_binary_accepts_column_vector_and_threshold_is_inclusive():
    p = np.array([[0.5], [0.49]])
    assert predicted_classes(p, 1).tolist() == [1, 0]
    assert classification_metrics([1, 0], p, 1)["accuracy"] == 1.0


def test_multiclass_hand_computed():
    y = [0, 1, 2, 2]
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.1, 0.1, 0.8]])
    m = classification_metrics(y, p, n_classes=3)
    # Predictions 0,1,1,2.
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 1 / 2) / 3)
    # Per-class F1: class0 1; class1 P=1/2 R=1 -> 2/3; class2 P=1 R=1/2 -> 2/3.
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    # OvR AUROC: class0 1 (0.7 above all); class1 positives 0.5 vs negs 0.2,0.6,0.1 -> 2/3;
    # class2 positives 0.3,0.8 vs negs 0.1,0.3 -> (1 + 0.5 + 1 + 1)/4 = 0.875.
    assert m["auroc"] == pytest.approx((1 + 2 / 3 + 0.875) / 3)


def test_single_class_split_gives_nan_auroc_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics([1, 1, 1], [0.9, 0.2, 0.7], n_classes=1)
    assert math.isnan(m["auroc"])
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_multiclass_with_missing_class_gives_nan_auroc():
    p = np.full((2, 3), 1 / 3)
    m = classification_metrics([0, 1], p, n_classes=3)
    assert math.isnan(m["auroc"])
    assert m["accuracy"] == 0.5  # argmax of a tie is class 0


def test_confident_logits_keep_their_order_in_auroc():
    """Logits past ~17 have a float32 sigmoid of exactly 1; the Trainer's AUROC ranks them in float64."""
    import torch

    from mil_train.tasks.classification import ClassificationTask

    logits = torch.tensor([[18.0], [20.0], [25.0], [30.0]])  # the first bag is the negative one
    metrics = ClassificationTask(1).metrics(logits, torch.tensor([0.0, 1.0, 1.0, 1.0]))
    assert torch.sigmoid(logits).unique().numel() == 1  # float32 would tie them all
    assert metrics["auroc"] == 1.0
