"""Stratified K-fold: a partition, classes in proportion, the same folds under the same seed."""

from __future__ import annotations

from collections import Counter

import pytest

from mil_train.folds import fold_of_each_bag, stratified_folds


def labels_of(n_neg, n_pos):
    return [0] * n_neg + [1] * n_pos


@pytest.mark.parametrize("labels, k", [(labels_of(47, 45), 10), (labels_of(30, 7), 5), ([0, 1, 2] * 9 + [2] * 4, 4)])
def test_folds_partition_the_bags_with_each_class_in_proportion(labels, k):
    folds = stratified_folds(labels, k, seed=0)
    assert len(folds) == k
    tests = [test for _, test in folds]
    assert sorted(i for test in tests for i in test) == list(range(len(labels)))  # each bag tested once
    for train, test in folds:
        assert sorted(train + test) == list(range(len(labels))) and not set(train) & set(test)
    for c, total in Counter(labels).items():
        per_fold = [sum(labels[i] == c for i in test) for test in tests]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == total
    assignment = fold_of_each_bag(folds)
    assert all(i in tests[assignment[i]] for i in range(len(labels)))


def test_same_seed_same_folds_other_seed_other_folds():
    labels = labels_of(47, 45)
    assert stratified_folds(labels, 10, seed=3) == stratified_folds(list(labels), 10, seed=3)
    assert stratified_folds(labels, 10, seed=3) != stratified_folds(labels, 10, seed=4)
    # shuffled, not cut in file order (unshuffled, fold 0 would be the first 5 bags of each class)
    assert stratified_folds(labels, 10, seed=3)[0][1] != [0, 1, 2, 3, 4, 47, 48, 49, 50, 51]


def test_plain_k_fold_without_labels():
    folds = stratified_folds(None, 3, seed=0, n_bags=10)
    assert sorted(len(test) for _, test in folds) == [3, 3, 4]
    assert sorted(i for _, test in folds for i in test) == list(range(10))


@pytest.mark.parametrize("labels, k, message", [
    (labels_of(10, 3), 5, "class 1 has 3 bag"), (labels_of(4, 4), 1, "K >= 2"),
])
def test_too_few_bags_or_folds_are_refused(labels, k, message):
    with pytest.raises(ValueError, match=message):
        stratified_folds(labels, k)


def test_mil_train_folds_writes_a_checkpoint_per_fold_and_a_summary_that_rescoring_reproduces(tmp_path):
    import json

    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score
    from train_cli_helpers import SMALL_ABMIL, planted_folder, run_cli

    from mil_train.checkpoint import load_checkpoint
    from mil_train.data.torchmil_folder import TorchmilFolderDataset

    labels = [i % 2 for i in range(20)]
    data = planted_folder(tmp_path / "bags", labels)
    result = run_cli([*SMALL_ABMIL, data, "-o", tmp_path / "cv.pt", "--folds", 4, "--epochs", 3, "--lr", 1e-2,
                      "--seed", 5, "--val-fraction", 0.25])
    assert result.exit_code == 0, result.output
    assert "4 folds, test" in result.output
    summary = json.loads((tmp_path / "cv.folds.json").read_text())
    assert [f["test_bags"] for f in summary["folds"]] == [test for _, test in stratified_folds(labels, 4, seed=5)]
    assert not (tmp_path / "cv.pt").exists()
    dataset = TorchmilFolderDataset(data)
    for fold in summary["folds"]:
        model, payload = load_checkpoint(tmp_path / fold["checkpoint"])
        assert payload["provenance"]["fold"] == fold["fold"] and payload["provenance"]["n_train"] == fold["n_train"]
        assert fold["n_train"] + fold["n_val"] + fold["n_test"] == 20 and fold["n_test"] == 5
        with torch.no_grad():
            scores = [float(torch.sigmoid(model(dataset[i]["X"][None]).logits)) for i in fold["test_bags"]]
        truth = [labels[i] for i in fold["test_bags"]]
        if len(set(truth)) == 2:
            assert fold["test"]["auroc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-9)
        accuracy = np.mean([(s >= 0.5) == t for s, t in zip(scores, truth)])
        assert fold["test"]["accuracy"] == pytest.approx(accuracy)
    accuracies = [f["test"]["accuracy"] for f in summary["folds"]]
    assert summary["mean"]["accuracy"] == pytest.approx(np.mean(accuracies))
    assert summary["std"]["accuracy"] == pytest.approx(np.std(accuracies, ddof=1))


def test_mil_train_folds_refuses_more_folds_than_the_smallest_class(tmp_path):
    from train_cli_helpers import SMALL_ABMIL, planted_folder, run_cli

    from mil_runtime.errors import InvalidInputError

    data = planted_folder(tmp_path / "bags", [0] * 9 + [1] * 3)
    result = run_cli([*SMALL_ABMIL, data, "-o", tmp_path / "cv.pt", "--folds", 4, "--epochs", 1])
    assert result.exit_code == InvalidInputError.exit_code
    assert "--folds 4: class 1 has 3 bag(s)" in result.output
