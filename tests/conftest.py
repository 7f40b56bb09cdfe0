"""Shared test fixtures: where the shared real data lives, and a skip when it is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_file(relative: str) -> Path:
    """Path of a file in ../shared/data, or skip the test naming the missing file."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs ../shared/data/{relative}, which is not on this machine")
    return path


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA
