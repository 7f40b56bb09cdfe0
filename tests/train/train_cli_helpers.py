"""Helpers for the mil-train convenience tests: small bag folders with a planted signal, and running the CLI."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from mil_train.cli import main


def planted_folder(root, labels, dim=4, seed=0):
    """A torchmil folder: bag i has label labels[i]; a positive bag holds one instance shifted by +3."""
    rng = np.random.default_rng(seed)
    for folder in ("features", "labels"):
        (root / folder).mkdir(parents=True)
    for i, label in enumerate(labels):
        X = rng.normal(size=(3 + i % 4, dim)).astype(np.float32)
        if label:
            X[0] += 3.0
        np.save(root / "features" / f"bag{i:03d}.npy", X)
        np.save(root / "labels" / f"bag{i:03d}.npy", np.array(label))
    return root


SMALL_ABMIL = ["ABMIL", "--model-arg", "att_dim=4", "--model-arg", "embed_dims=[8]"]  # the model, small: put DATA next


def run_cli(args):
    """mil-train with these arguments (paths and numbers as text), through click's test runner."""
    return CliRunner().invoke(main, [str(a) for a in args])
