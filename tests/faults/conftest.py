"""Every test under tests/faults/ carries the `faults` marker: `pytest -m faults` runs them together with the
earlier bad-input tests marked by hand elsewhere (docs/faults.md lists them all)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.faults)
