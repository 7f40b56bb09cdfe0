"""Smoke test of benchmarks/musk.py: one fold, few epochs (the full benchmark is never a test)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def musk_module(shared_data):
    if not (shared_data / "mil" / "musk1.csv").exists():
        pytest.skip("needs ../shared/data/mil/musk1.csv, which is not on this machine")
    spec = importlib.util.spec_from_file_location("_milkit_bench_musk", ROOT / "benchmarks" / "musk.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_fold_trains_and_scores(musk_module):
    threads = torch.get_num_threads()
    args = musk_module.argparse.Namespace(
        repeats=1, folds=10, gated=True, epochs=1, patience=None, val_fraction=0.0, dropout=0.2
    )
    try:
        jobs = musk_module.jobs_for("musk1", args)
        assert len(jobs) == 10
        assert sorted(i for job in jobs for i in job["test"]) == list(range(92))  # folds partition the bags
        result = musk_module.run_fold(jobs[0])
    finally:
        torch.set_num_threads(threads)
    assert result["n"] == len(jobs[0]["test"]) and 0 <= result["correct"] <= result["n"]
    summary = musk_module.summarise([result], "musk1", gated=True)
    assert summary["mean"] == pytest.approx(result["correct"] / result["n"])
    assert summary["published"] == (0.900, 0.050)


def test_standardisation_uses_training_bags_only(musk_module):
    bags = musk_module.load_bags("musk1")
    train = np.arange(0, 60)
    scaled = musk_module.standardised(bags, train)
    train_X = np.concatenate([scaled[i]["X"].numpy() for i in train])
    np.testing.assert_allclose(train_X.mean(axis=0), 0, atol=1e-4)
    held_out = np.concatenate([scaled[i]["X"].numpy() for i in range(60, 92)])
    assert np.abs(held_out.mean(axis=0)).max() > 1e-2  # statistics were not refitted on held-out bags
