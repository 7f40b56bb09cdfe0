"""Out of domain: how far a slide's features lie from the features the model was trained on.

A model exported from a `mil-train` checkpoint carries `milkit.feature_stats` (mil_runtime.contract):
the per-feature mean and std of its training tiles, and a threshold. The distance of one tile x (D,) is
its mean squared z-score,

    d(x) = mean_j ((x_j - mean_j) / s_j)^2,   s_j = max(std_j, STD_FLOOR * median(std))

(about 1 for a typical training tile; the floor keeps a feature that was constant in training from
dominating). The threshold is the 0.99 quantile of d over the training tiles. A slide's score is the
median of d over its tiles: in domain, at least half of a slide's tiles look like typical training
tiles, so the median sits near the training median and well below the 99th percentile; a slide of
another stain, scanner or modality (fluorescence through a brightfield model) moves most tiles
at once, and the median with them. Score > threshold: the result gets a warning (JSON `warnings`, and
stderr), the prediction is still made. Files without the key (older exports) are not checked.

Checked in tests/faults/test_cache_domain.py on held-out training bags (below) against shifted,
rescaled and fluorescence-like generated bags (above). numpy only: the runtime stays torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

STD_FLOOR = 0.05  # fraction of the median feature std below which a feature's std is raised (mil_train.feature_stats)


@dataclass
class DomainScore:
    score: float  # median over tiles of the mean squared z-score
    threshold: float  # 0.99 quantile of the same distance on the training tiles
    n_tiles: int

    @property
    def out_of_domain(self) -> bool:
        return self.score > self.threshold

    def as_dict(self) -> dict[str, Any]:
        return {"score": self.score, "threshold": self.threshold, "distance": "median mean_squared_z",
                "out_of_domain": self.out_of_domain}

    def warning(self) -> str:
        return (f"out of domain: the features lie far from the model's training features (median tile distance "
                f"{self.score:.3g} > threshold {self.threshold:.3g}, mean squared z-score); the slide may be of "
                "another stain, scanner, modality or tissue than the model was trained on: do not trust the prediction")


def scale(std: np.ndarray) -> np.ndarray:
    """The floored std s (D,) the z-scores divide by."""
    std = np.asarray(std, dtype=np.float64)
    floor = STD_FLOOR * float(np.median(std)) if std.size else 0.0
    return np.maximum(std, max(floor, 1e-12))


def tile_distances(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(N,) mean squared z-score of each tile's features (N, D) against mean, std (D,)."""
    z = (np.asarray(features, dtype=np.float64) - np.asarray(mean, dtype=np.float64)) / scale(std)  # (N, D)
    return np.mean(z * z, axis=1)


def domain_score(features: np.ndarray, stats: dict[str, Any] | None) -> DomainScore | None:
    """The slide's score against a model's `feature_stats`; None when the model has none or no tiles."""
    if stats is None or len(features) == 0:
        return None
    distances = tile_distances(features, np.asarray(stats["mean"]), np.asarray(stats["std"]))  # (N,)
    return DomainScore(score=float(np.median(distances)), threshold=float(stats["threshold"]), n_tiles=len(distances))


def check_domain(features: np.ndarray, metadata: Any, warnings: list[str]) -> dict[str, Any] | None:
    """Score `features` (N, D) against `metadata.feature_stats`; append the warning when out of domain.

    Returns the JSON `domain` field ({score, threshold, distance, out_of_domain}) or None (no stats)."""
    result = domain_score(features, getattr(metadata, "feature_stats", None))
    if result is None:
        return None
    if result.out_of_domain:
        warnings.append(result.warning())
    return result.as_dict()


__all__ = ["DomainScore", "STD_FLOOR", "check_domain", "domain_score", "scale", "tile_distances"]
