"""Digit bags: Ilse et al.'s MNIST-bags protocol on scikit-learn's bundled 8x8 digits (nothing downloaded).

A bag holds digit images drawn at random from one pool; its label is 1 when it holds at least one
`target` digit (the instance labels mark them). Bag sizes are Gaussian (mean 10, std 2, at least 1),
as in Ilse et al. (ICML 2018, section 5.2). The 1,797 digits are split once, by a fixed permutation,
into a training pool (70%) and a test pool, so held-out bags never reuse a training image.

How the digits differ from MNIST: 8x8 pixels (MNIST 28x28) with 17 grey levels (0-16), 1,797 images of
about 43 writers (MNIST 70,000), so the instances are smaller, coarser and fewer. Images come as uint8
RGB-replicated (N, 3, 8, 8), the grey level scaled to 0-255, the layout slide tiles have after
permuting to channels-first, so an exported encoder takes them as tiles.
"""

from __future__ import annotations

import numpy as np
import torch
from tensordict import TensorDict

from mil_train.data.bag import make_bag

POOL_SEED = 0
TRAIN_SHARE = 0.7


def digit_pool(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 3, 8, 8), digits (n,)) of the training or test pool."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    digits = load_digits()
    grey = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    images = np.repeat(grey[:, None], 3, axis=1)  # (1797, 3, 8, 8)
    order = np.random.default_rng(POOL_SEED).permutation(len(images))
    cut = int(round(TRAIN_SHARE * len(images)))
    chosen = order[:cut] if split == "train" else order[cut:]
    return images[chosen], digits.target[chosen]


def digit_bags(n_bags: int, *, target: int = 9, split: str = "train", mean_size: float = 10.0,
               std_size: float = 2.0, seed: int = 0) -> list[TensorDict]:
    """`n_bags` bags of the pool `split`: X uint8 (N, 3, 8, 8), Y 1.0 when a `target` digit is in the
    bag, y_inst 1 on the target digits."""
    if not 0 <= target <= 9:
        raise ValueError(f"target must be a digit 0-9, got {target}")
    images, digits = digit_pool(split)
    rng = np.random.default_rng(seed)
    bags = []
    for _ in range(int(n_bags)):
        size = max(1, int(round(rng.normal(mean_size, std_size))))
        pick = rng.integers(0, len(images), size=size)
        y_inst = (digits[pick] == target).astype(np.int64)
        bags.append(make_bag(torch.from_numpy(images[pick]), np.float32(y_inst.max()), y_inst=y_inst))
    return bags
