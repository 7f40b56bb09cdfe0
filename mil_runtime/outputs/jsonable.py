"""Plain JSON values from what results hold (numpy scalars and arrays, Paths, non-finite floats).

One function for every JSON file milkit writes (the record, the DSA annotation, ...): JSON has no NaN,
so non-finite floats become null.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
    """numpy scalars/arrays and Paths to plain JSON values; non-finite floats to None (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


__all__ = ["to_jsonable"]
