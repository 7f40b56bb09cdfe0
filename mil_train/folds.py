"""Cross-validation folds: stratified K-fold, the same folds under the same seed.

`stratified_folds(labels, k, seed)` deals the bags of each class round-robin over the K folds after
one seeded shuffle (scikit-learn's StratifiedKFold with shuffle=True), so every fold holds each class
in the proportion of the whole set (its count differs by at most one between folds). The folds depend
on the labels, K and the seed alone: every model run under the same seed sees the same folds, which is
what a comparison between models needs. Without labels to stratify on (regression), plain shuffled
K-fold. Fold f's test set is its own bags; its training set is the other K - 1 folds.

    for fold, (train, test) in enumerate(stratified_folds(labels, 5, seed=0)):
        ...
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def stratified_folds(labels: Sequence[int] | None, k: int, seed: int = 0, n_bags: int | None = None
                     ) -> list[tuple[list[int], list[int]]]:
    """K (train indices, test indices) pairs, each sorted; stratified by `labels` unless they are None.

    Every class needs at least K bags (else some test fold would lack it and its AUROC be undefined);
    without labels, `n_bags` gives the number of bags.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    if k < 2:
        raise ValueError(f"K-fold cross-validation needs K >= 2, got {k}")
    if labels is None:
        if n_bags is None:
            raise ValueError("give the labels to stratify on, or n_bags for plain K-fold")
        if n_bags < k:
            raise ValueError(f"{k} folds need at least {k} bags, the data has {n_bags}")
        splitter, y = KFold(n_splits=k, shuffle=True, random_state=seed), np.zeros(n_bags)
    else:
        counts = Counter(int(label) for label in labels)
        smallest, count = min(counts.items(), key=lambda item: item[1])
        if count < k:
            raise ValueError(f"class {smallest} has {count} bag(s), fewer than the {k} folds; "
                             f"use at most {count} folds")
        splitter, y = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed), np.asarray(labels)
    return [(sorted(map(int, train)), sorted(map(int, test))) for train, test in splitter.split(np.zeros(len(y)), y)]


def fold_of_each_bag(folds: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[int]:
    """Bag i's fold number (0-based), the form a summary records."""
    n_bags = sum(len(test) for _, test in folds)
    assignment = [-1] * n_bags
    for fold, (_, test) in enumerate(folds):
        for i in test:
            assignment[i] = fold
    return assignment
