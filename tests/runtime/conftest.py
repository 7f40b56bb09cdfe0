"""Fixtures for the runtime tests: exported ABMIL models (binary and 3-class) and feature files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime_fixtures import FEATURE_DIM, abmil, export, make_feature_file


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def binary_model(model_dir):
    """(eager ABMIL n_classes=1, path of its .onnx)."""
    model = abmil(1, seed=0)
    return model, export(model, model_dir / "abmil_binary.onnx")


@pytest.fixture(scope="session")
def multiclass_model(model_dir):
    """(eager ABMIL n_classes=3 with class names, path of its .onnx)."""
    model = abmil(3, seed=1)
    return model, export(model, model_dir / "abmil_3class.onnx", class_names=["normal", "tumor", "other"])


@pytest.fixture
def features_h5(tmp_path) -> Path:
    """A valid 23-instance feature file for the test models."""
    rng = np.random.default_rng(0)
    return make_feature_file(tmp_path / "slide_a.h5", rng.standard_normal((23, FEATURE_DIM)).astype(np.float32))
