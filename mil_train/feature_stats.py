"""The training features' statistics that go into an exported model (`milkit.feature_stats`).

    stats = compute_feature_stats([bag["X"] for bag in train_bags])   # mil-train does this for you
    Trainer(..., feature_stats=stats)  ->  checkpoint["feature_stats"]  ->  mil-export  ->  the .onnx

Per-feature mean and std over every training tile, and the threshold of the runtime's out-of-domain
check: the 0.99 quantile of the per-tile distance (mean squared z-score) on these same tiles. The
distance is defined in mil_runtime.domain; it is repeated here (the one-way rule keeps mil_train from
importing the runtime) and tests/faults/test_cache_domain.py checks that both agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from mil_runtime.contract import FEATURE_STATS_DISTANCE, FEATURE_STATS_VERSION

QUANTILE = 0.99
STD_FLOOR = 0.05  # = mil_runtime.domain.STD_FLOOR


def _array(bag: Any) -> np.ndarray:
    x = bag["X"] if isinstance(bag, dict) else bag
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(-1, x.shape[-1])  # (N, D)


def _tile_distances(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    s = np.maximum(std, max(STD_FLOOR * float(np.median(std)), 1e-12))
    z = (x - mean) / s  # (N, D)
    return np.mean(z * z, axis=1)


def _round(values: np.ndarray) -> list[float]:
    return [float(f"{v:.7g}") for v in np.asarray(values, dtype=np.float64).ravel()]


def compute_feature_stats(bags: Iterable[Any], quantile: float = QUANTILE) -> dict[str, Any] | None:
    """`milkit.feature_stats` of training bags ((N, D) arrays or tensors, or dicts with "X"); None without tiles."""
    bags = [_array(b) for b in bags]
    bags = [b for b in bags if len(b)]
    if not bags:
        return None
    n = sum(len(b) for b in bags)
    mean = sum(b.sum(axis=0) for b in bags) / n  # (D,)
    var = sum(((b - mean) ** 2).sum(axis=0) for b in bags) / max(n - 1, 1)  # (D,)
    mean, std = np.array(_round(mean)), np.array(_round(np.sqrt(var)))  # score with what is stored
    distances = np.concatenate([_tile_distances(b, mean, std) for b in bags])  # (n,)
    return {
        "version": FEATURE_STATS_VERSION, "distance": FEATURE_STATS_DISTANCE,
        "mean": mean.tolist(), "std": std.tolist(),
        "threshold": float(f"{np.quantile(distances, quantile):.7g}"), "quantile": quantile,
        "n_tiles": int(n), "n_bags": len(bags),
    }


__all__ = ["QUANTILE", "STD_FLOOR", "compute_feature_stats"]
