"""`synthetic_bags`: MIL bags with planted positive instances, for tests, examples and sanity runs."""

from __future__ import annotations

import math

import numpy as np
from tensordict import TensorDict

from mil_train.data.bag import make_bag

N_SIGNAL_DIMS = 4  # features where witnesses differ from background
SIGNAL_SHIFT = 2.0  # mean shift of witnesses in those dims, in background standard deviations
GRID_SLACK = 1.5  # tiles cover about 1 / GRID_SLACK of their square: tissue with holes


def _check(n_bags: int, feature_dim: int, bag_size: tuple[int, int], fractions: dict[str, float]) -> None:
    if n_bags < 1 or feature_dim < 1:
        raise ValueError(f"n_bags and feature_dim must be >= 1, got {n_bags} and {feature_dim}")
    low, high = bag_size
    if not 1 <= low <= high:
        raise ValueError(f"bag_size must be (min, max) with 1 <= min <= max, got {bag_size}")
    for name, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")


def _grid_cells(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct (y, x) cells scattered over a square about GRID_SLACK times larger than n."""
    side = math.ceil(math.sqrt(n * GRID_SLACK))
    cells = rng.choice(side * side, size=n, replace=False)
    return np.stack([cells // side, cells % side], axis=1).astype(np.int64)  # (N, 2)


def _clustered_witnesses(rng: np.random.Generator, n_witness: int, coords: np.ndarray) -> np.ndarray:
    """Indices of the n_witness tiles nearest a random tile: a spatially compact lesion."""
    n = len(coords)
    centre = coords[rng.integers(n)]
    distance = ((coords - centre) ** 2).sum(axis=1) + rng.random(n) * 0.5  # jitter breaks ties at random
    return np.argsort(distance)[:n_witness]


def synthetic_bags(
    n_bags: int,
    feature_dim: int = 32,
    bag_size: tuple[int, int] = (10, 50),
    positive_fraction: float = 0.5,
    witness_fraction: float = 0.1,
    seed: int = 0,
    with_coords: bool = False,
) -> list[TensorDict]:
    """Bags of standard-normal instances; positive bags hold witnesses shifted by SIGNAL_SHIFT in the
    first N_SIGNAL_DIMS features.

    round(n_bags * positive_fraction) bags are positive (Y = 1.0, in shuffled order), each with
    max(1, round(witness_fraction * N)) witnesses (y_inst = 1); negative bags have none (Y = 0.0), so
    Y == max(y_inst) always. Bag sizes are uniform in [bag_size[0], bag_size[1]]. with_coords places
    tiles on a grid with holes, and the witnesses of a bag are the tiles nearest one random centre.
    """
    fractions = {"positive_fraction": positive_fraction, "witness_fraction": witness_fraction}
    _check(n_bags, feature_dim, bag_size, fractions)
    rng = np.random.default_rng(seed)
    n_positive = round(n_bags * positive_fraction)
    labels = rng.permutation(np.arange(n_bags) < n_positive)
    signal = slice(0, min(N_SIGNAL_DIMS, feature_dim))
    bags = []
    for positive in labels:
        n = int(rng.integers(bag_size[0], bag_size[1] + 1))
        coords = _grid_cells(rng, n) if with_coords else None
        y_inst = np.zeros(n, dtype=np.int64)
        if positive:
            n_witness = max(1, round(witness_fraction * n))
            if coords is not None:
                y_inst[_clustered_witnesses(rng, n_witness, coords)] = 1
            else:
                y_inst[rng.choice(n, size=n_witness, replace=False)] = 1
        X = rng.standard_normal((n, feature_dim)).astype(np.float32)  # (N, D)
        X[y_inst == 1, signal] += SIGNAL_SHIFT
        bags.append(make_bag(X, np.float32(positive), y_inst=y_inst, coords=coords))
    return bags
