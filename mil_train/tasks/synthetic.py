"""Bags whose survival time or continuous target depends on planted instances (tests, examples).

Each bag holds standard-normal instances, a `witness_fraction` of which are planted: shifted by
SIGNAL_SHIFT in the first N_SIGNAL_DIMS features (what tells them from the background, as in
`mil_train.data.synthetic`) and by GRADE_SHIFT * g in the next N_SIGNAL_DIMS, where g in [0, 1] is
the bag's grade. The outcome depends on g alone, and only the planted instances carry it, so a model
must find them and read their grade (an attention pool normalises the count of instances away, so
the grade lives in the instances, not in how many there are):

- survival: log time = -HAZARD_SLOPE * g + TIME_NOISE * N(0, 1) (an accelerated failure time model:
  a higher grade, an earlier event); a random `censored_fraction` of the bags is censored at a uniform
  0.2 to 1 fraction of its event time, Y = (observed time, event). The true risk's c-index is about 0.9.
- regression: Y = TARGET_SCALE * g + N(0, noise^2) (one target).
"""

from __future__ import annotations

import numpy as np
from tensordict import TensorDict

from mil_train.data.bag import make_bag

N_SIGNAL_DIMS = 4
SIGNAL_SHIFT = 2.0
GRADE_SHIFT = 4.0
HAZARD_SLOPE = 3.0  # log time ratio between grade 0 and grade 1
TIME_NOISE = 0.3  # std of log time around its mean
TARGET_SCALE = 10.0


def _planted_bag(rng: np.random.Generator, feature_dim: int, size: int, witness_fraction: float,
                 grade: float) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, y_inst (N,)) with max(1, round(witness_fraction * N)) planted instances."""
    if feature_dim < 2 * N_SIGNAL_DIMS:
        raise ValueError(f"feature_dim must be >= {2 * N_SIGNAL_DIMS}, got {feature_dim}")
    features = rng.standard_normal((size, feature_dim)).astype(np.float32)  # (N, D)
    witnesses = rng.choice(size, size=max(1, int(round(witness_fraction * size))), replace=False)
    features[witnesses, :N_SIGNAL_DIMS] += SIGNAL_SHIFT
    features[witnesses, N_SIGNAL_DIMS:2 * N_SIGNAL_DIMS] += GRADE_SHIFT * grade
    y_inst = np.zeros(size, dtype=np.int64)
    y_inst[witnesses] = 1
    return features, y_inst


def planted_survival_bags(
    n_bags: int, feature_dim: int = 16, bag_size: tuple[int, int] = (20, 40), witness_fraction: float = 0.2,
    censored_fraction: float = 0.3, seed: int = 0,
) -> list[TensorDict]:
    """Bags with Y = (time, event) float32 (see the module docstring); "risk" holds the true
    HAZARD_SLOPE * grade (higher = earlier event), the oracle a model's c-index compares with."""
    rng = np.random.default_rng(seed)
    bags = []
    for grade in rng.uniform(0.0, 1.0, size=n_bags):
        size = int(rng.integers(bag_size[0], bag_size[1] + 1))
        features, y_inst = _planted_bag(rng, feature_dim, size, witness_fraction, grade)
        risk = HAZARD_SLOPE * grade
        time = float(np.exp(-risk + TIME_NOISE * rng.standard_normal()))
        censored = rng.random() < censored_fraction
        observed = time * rng.uniform(0.2, 1.0) if censored else time
        bag = make_bag(features, np.array([observed, 0.0 if censored else 1.0], dtype=np.float32), y_inst=y_inst)
        bag["risk"] = np.float32(risk)
        bags.append(bag)
    return bags


def planted_regression_bags(
    n_bags: int, feature_dim: int = 16, bag_size: tuple[int, int] = (20, 40), witness_fraction: float = 0.2,
    noise: float = 0.5, seed: int = 0,
) -> list[TensorDict]:
    """Bags with Y = TARGET_SCALE * grade + N(0, noise^2), float32 (one target)."""
    rng = np.random.default_rng(seed)
    bags = []
    for grade in rng.uniform(0.0, 1.0, size=n_bags):
        size = int(rng.integers(bag_size[0], bag_size[1] + 1))
        features, y_inst = _planted_bag(rng, feature_dim, size, witness_fraction, grade)
        target = np.float32(TARGET_SCALE * grade + noise * rng.standard_normal())
        bags.append(make_bag(features, target, y_inst=y_inst))
    return bags
