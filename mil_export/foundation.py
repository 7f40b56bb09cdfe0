"""Pathology foundation-model tile encoders by TRIDENT's names (issue 15): registry of published configurations.

Filled in by the foundation-encoder work; `build_encoder` dispatches here for every name listed.
"""

from __future__ import annotations

FOUNDATION: dict = {}


def foundation_names() -> list[str]:
    return sorted(FOUNDATION)


def build_foundation(name: str, *, input_px: int | None = None, depth: int | None = None):
    """(TileEncoder, dropped key prefixes) of registered foundation model `name`, seeded random weights."""
    raise KeyError(name)
