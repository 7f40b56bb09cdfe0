"""Regions of interest in: QuPath's annotation GeoJSON restricts tiling to its polygons (`mil-infer --roi`).

QuPath exports annotations (File > Export objects as GeoJSON) as a FeatureCollection, a list of
Features, or one Feature; each geometry is a Polygon or MultiPolygon in QuPath's image frame, which
is OpenSlide's level 0 shifted by `openslide.bounds-x/y` (QuPath crops to the bounds). The regions are
turned into level-0 rings once, then drawn onto the tissue mask's grid (exteriors filled, holes cut
out), so "tissue inside a region" is one boolean mask and tiles are selected from it as before.
Points and lines enclose no area and are skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mil_runtime.errors import InputNotFoundError, InvalidInputError

ROI_SUFFIXES = (".geojson", ".json")
FRAMES = ("bounds", "level0")  # GeoJSON frames, in and out: QuPath's (bounds) or OpenSlide's level 0
AREA_TYPES = ("Polygon", "MultiPolygon")

Ring = list[tuple[float, float]]  # (x, y) vertices, level-0 px
Polygon = tuple[Ring, list[Ring]]  # (exterior, holes)


@dataclass
class Regions:
    """Polygons in level-0 px read from one GeoJSON file, and where they came from."""

    polygons: list[Polygon]
    path: Path
    sha256: str
    frame: str
    offset: tuple[int, int]  # level-0 px added to the file's coordinates
    warnings: list[str] = field(default_factory=list)

    def as_record(self) -> dict[str, Any]:
        """What the JSON result records: the file, its frame, and the polygons used (level-0 GeoJSON)."""
        return {
            "file": str(self.path), "sha256": self.sha256, "frame": self.frame, "offset": list(self.offset),
            "n_polygons": len(self.polygons),
            "geometry": {"type": "MultiPolygon", "coordinates": [
                [[list(p) for p in ring] for ring in (exterior, *holes)] for exterior, holes in self.polygons]},
        }

    def mask(self, shape: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
        """(height, width) bool: mask pixels whose centre lies inside a region (outside its holes)."""
        height, width = shape
        inside = np.zeros((height, width), dtype=bool)
        for exterior, holes in self.polygons:  # each polygon: fill its exterior, cut its holes, then union
            image = Image.new("1", (width, height), 0)
            draw = ImageDraw.Draw(image)
            draw.polygon(_to_mask(exterior, scale), fill=1)
            for hole in holes:
                draw.polygon(_to_mask(hole, scale), fill=0)
            inside |= np.asarray(image, dtype=bool)
        return inside


def _to_mask(ring: Ring, scale: tuple[float, float]) -> list[tuple[float, float]]:
    # Pillow fills pixel (i, j) when its centre (i + 0.5, j + 0.5) is inside: shift by half a pixel
    return [(x / scale[0] - 0.5, y / scale[1] - 0.5) for x, y in ring]


def bounds_offset(properties: dict[str, str]) -> tuple[int, int]:
    """(x, y) of OpenSlide's bounds in level-0 px; (0, 0) when the slide has none."""
    def value(key: str) -> int:
        try:
            return int(float(properties.get(key, 0) or 0))
        except ValueError:
            return 0
    return value("openslide.bounds-x"), value("openslide.bounds-y")


def find_roi_file(roi: str | os.PathLike, slide_path: str | os.PathLike) -> Path:
    """The ROI file for a slide: `roi` itself, or in a folder `roi`, the file named by the slide's stem."""
    roi = Path(roi)
    if not roi.exists():
        raise InputNotFoundError(f"--roi {roi}: no such file or folder")
    if roi.is_file():
        return roi
    stem = Path(slide_path).stem
    for suffix in ROI_SUFFIXES:
        candidate = roi / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise InputNotFoundError(
        f"--roi {roi}: no {stem}.geojson (or {stem}.json) for slide {slide_path}; name each region file "
        "after its slide"
    )


def _features(document: Any) -> list[dict]:
    if isinstance(document, list):
        return [f for item in document for f in _features(item)]
    if not isinstance(document, dict):
        return []
    kind = document.get("type")
    if kind == "FeatureCollection":
        return _features(document.get("features") or [])
    if kind == "Feature":
        return [document]
    if kind in AREA_TYPES or kind in ("Point", "MultiPoint", "LineString", "MultiLineString", "GeometryCollection"):
        return [{"type": "Feature", "geometry": document}]
    return []


def _geometries(geometry: Any) -> list[dict]:
    if not isinstance(geometry, dict):
        return []
    if geometry.get("type") == "GeometryCollection":
        return [g for part in geometry.get("geometries") or [] for g in _geometries(part)]
    return [geometry]


def _ring(points: Any, offset: tuple[int, int], source: str) -> Ring:
    try:
        ring = [(float(p[0]) + offset[0], float(p[1]) + offset[1]) for p in points]
    except (TypeError, ValueError, IndexError):
        raise InvalidInputError(f"{source}: a polygon ring is not a list of [x, y] numbers") from None
    if len(ring) < 3 or not np.isfinite(np.asarray(ring)).all():
        raise InvalidInputError(f"{source}: a polygon ring needs at least 3 finite [x, y] points")
    return ring


def _polygon(rings: Any, offset: tuple[int, int], source: str) -> Polygon:
    if not isinstance(rings, list) or not rings:
        raise InvalidInputError(f"{source}: a polygon has no rings")
    exterior, *holes = (_ring(r, offset, source) for r in rings)
    return exterior, holes


def geojson_polygons(document: Any, offset: tuple[int, int] = (0, 0),
                     source: str = "region") -> tuple[list[Polygon], set[str]]:
    """The (exterior, holes) polygons of a GeoJSON document (FeatureCollection, Feature, geometry or a
    list of them), shifted by `offset`, and the geometry types skipped for enclosing no area.
    InvalidInputError, naming `source`, for a malformed ring."""
    polygons: list[Polygon] = []
    skipped: set[str] = set()
    for feature in _features(document):
        for geometry in _geometries(feature.get("geometry")):
            kind = geometry.get("type")
            if kind == "Polygon":
                polygons.append(_polygon(geometry.get("coordinates"), offset, source))
            elif kind == "MultiPolygon":
                polygons.extend(_polygon(p, offset, source) for p in geometry.get("coordinates") or [])
            elif kind:
                skipped.add(str(kind))
    return polygons, skipped


def read_regions(path: str | os.PathLike, frame: str = "bounds", offset: tuple[int, int] = (0, 0)) -> Regions:
    """Polygons of a GeoJSON file in level-0 px. `offset`: the slide's bounds, added when frame="bounds"."""
    path = Path(path)
    if frame not in FRAMES:
        raise InvalidInputError(f"unknown GeoJSON frame {frame!r}; use one of {', '.join(FRAMES)}")
    try:
        raw = path.read_bytes()
        document = json.loads(raw)
    except OSError as exc:
        raise InputNotFoundError(f"--roi {path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise InvalidInputError(f"--roi {path}: not JSON ({exc}); export the annotations from QuPath as GeoJSON") from None
    shift = offset if frame == "bounds" else (0, 0)
    polygons, skipped = geojson_polygons(document, shift, f"--roi {path}")
    if not polygons:
        raise InvalidInputError(
            f"--roi {path}: no Polygon or MultiPolygon in it; draw the regions as areas in QuPath and export "
            "them as GeoJSON"
        )
    warnings = [f"--roi {path}: {', '.join(sorted(skipped))} geometries enclose no area and were skipped"] if skipped else []
    return Regions(polygons, path, hashlib.sha256(raw).hexdigest(), frame, tuple(int(v) for v in shift), warnings)


__all__ = ["FRAMES", "Regions", "bounds_offset", "find_roi_file", "geojson_polygons", "read_regions"]
