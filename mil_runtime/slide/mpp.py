"""Microns per pixel of a slide's level 0: the one number every physical size depends on.

Order of trust: an explicit `--mpp`, then OpenSlide's `openslide.mpp-x/-y`, then the TIFF resolution
tags. Values outside 0.05-20 um/px are refused, an override's as well as a recorded one: generic TIFFs often carry a placeholder resolution
(72 dpi gives 352.8 um/px), and tiling with that would silently make tiles hundreds of times too big.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from mil_runtime.errors import InvalidInputError, MppUnknownError

PLAUSIBLE_MPP = (0.05, 20.0)
MICRONS_PER_UNIT = {"centimeter": 10_000.0, "inch": 25_400.0}

OVERRIDE, OPENSLIDE, TIFF_RESOLUTION = "override", "openslide", "tiff-resolution"

_HINT = "pass --mpp with the scanner's resolution (about 0.25 for 40x, 0.5 for 20x scans)"


def _is_plausible(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]


def _number(props: Mapping[str, str], key: str) -> float | None:
    try:
        value = float(props[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _openslide_mpp(props: Mapping[str, str]) -> float | None:
    x, y = _number(props, "openslide.mpp-x"), _number(props, "openslide.mpp-y")
    if x is None:
        return y
    return x if y is None else (x + y) / 2.0


def _tiff_mpp(props: Mapping[str, str]) -> float | None:
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    per_unit = MICRONS_PER_UNIT.get(unit)
    x, y = _number(props, "tiff.XResolution"), _number(props, "tiff.YResolution")
    if per_unit is None or (x is None and y is None):
        return None
    pixels_per_unit = x if y is None else (y if x is None else (x + y) / 2.0)
    return per_unit / pixels_per_unit


def resolve_mpp(
    props: Mapping[str, str], override: float | None = None, source_name: str = "slide"
) -> tuple[float, str]:
    """Return (mpp, source), source one of "override", "openslide", "tiff-resolution".

    Raises InvalidInputError for an override outside PLAUSIBLE_MPP and MppUnknownError when nothing
    plausible is found (the message names --mpp).
    """
    if override is not None:
        if not _is_plausible(override):
            raise InvalidInputError(
                f"--mpp {override:g} is outside the plausible {PLAUSIBLE_MPP[0]}-{PLAUSIBLE_MPP[1]} um/px; {_HINT}"
            )
        return float(override), OVERRIDE
    from_openslide = _openslide_mpp(props)
    if _is_plausible(from_openslide):
        return from_openslide, OPENSLIDE
    from_tiff = _tiff_mpp(props)
    if _is_plausible(from_tiff):
        return from_tiff, TIFF_RESOLUTION
    seen = [f"{name}: {value:.4g} um/px" for name, value in
            (("OpenSlide", from_openslide), ("TIFF resolution tags", from_tiff)) if value is not None]
    found = ("; ".join(seen) + f", outside the plausible {PLAUSIBLE_MPP[0]}-{PLAUSIBLE_MPP[1]} um/px") if seen \
        else "the file records no resolution"
    raise MppUnknownError(f"{source_name}: microns per pixel unknown ({found}); {_HINT}")
