"""Fixtures of the slide tests: a fresh mock encoder and mock MIL model per test."""

from __future__ import annotations

import pytest
from slide_helpers import DarknessModel, MeanColourEncoder


@pytest.fixture
def encoder() -> MeanColourEncoder:
    return MeanColourEncoder()


@pytest.fixture
def model() -> DarknessModel:
    return DarknessModel()
