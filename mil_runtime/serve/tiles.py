"""Slide Deep Zoom through OpenSlide's DeepZoomGenerator: 254 px tiles, overlap 1, JPEG.

One DeepZoomGenerator per slide file, kept in a small LRU of open slides (OpenSlide handles are
thread-safe, so the tile routes run in the thread pool side by side). Tiles carry a strong ETag made
of the file's identity (size, mtime) and the tile's address, and Cache-Control; a conditional request
gets 304. An optional LRU of encoded tiles (`cache_mb`, 0 = off) serves repeated tiles without decoding.
The grid is `limit_bounds=False`: level L covers the whole level-0 image, downsampled by 2^(levels-1-L),
which is also the grid the attention overlay (mil_runtime.serve.overlay) is drawn on.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

TILE_SIZE = 254
OVERLAP = 1
JPEG_QUALITY = 75
MAX_OPEN_SLIDES = 32


@dataclass(frozen=True)
class DeepZoomGrid:
    """The Deep Zoom pyramid of a width x height level-0 image (DeepZoomGenerator's, limit_bounds=False)."""

    width: int
    height: int
    tile_size: int = TILE_SIZE
    overlap: int = OVERLAP

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        size = (self.width, self.height)
        dims = [size]
        while size[0] > 1 or size[1] > 1:
            size = (max(1, math.ceil(size[0] / 2)), max(1, math.ceil(size[1] / 2)))
            dims.append(size)
        return dims[::-1]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def downsample(self, level: int) -> int:
        """Level-0 pixels per pixel of Deep Zoom level `level`."""
        return 2 ** (self.level_count - 1 - level)

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int] | None:
        """(x0, y0, width, height) of a tile in its level's pixels, overlap included; None if no such tile."""
        if not 0 <= level < self.level_count:
            return None
        width, height = self.level_dimensions[level]
        cols, rows = math.ceil(width / self.tile_size), math.ceil(height / self.tile_size)
        if not (0 <= col < cols and 0 <= row < rows):
            return None

        def span(t: int, limit: int, dim: int) -> tuple[int, int]:
            tl = self.overlap * int(t > 0)
            br = self.overlap * int(t != limit - 1)
            return self.tile_size * t - tl, min(self.tile_size, dim - self.tile_size * t) + tl + br

        x0, w = span(col, cols, width)
        y0, h = span(row, rows, height)
        return x0, y0, w, h

    def dzi(self, fmt: str) -> str:
        return ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{fmt}" '
                f'Overlap="{self.overlap}" TileSize="{self.tile_size}"><Size Height="{self.height}" '
                f'Width="{self.width}"/></Image>')


@dataclass
class OpenedSlide:
    path: Path
    slide: object  # openslide.OpenSlide
    generator: object  # openslide.deepzoom.DeepZoomGenerator
    identity: str  # size:mtime_ns of the file OpenSlide opened, the ETag's base
    source: Path  # that file: `path` itself, or a DICOM series' level-0 instance

    @property
    def grid(self) -> DeepZoomGrid:
        width, height = self.slide.dimensions
        return DeepZoomGrid(width, height)


class BytesLRU:
    """A thread-safe LRU of bytes values bounded by their total size."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit, self.size = int(limit_bytes), 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        if self.limit <= 0:
            return None
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key, value: bytes) -> None:
        if self.limit <= 0 or len(value) > self.limit:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self.size -= len(old) if old is not None else 0
            self._items[key] = value
            self.size += len(value)
            while self.size > self.limit:
                _, dropped = self._items.popitem(last=False)
                self.size -= len(dropped)


def _identity(path: Path) -> str | None:
    """size:mtime_ns of a file, None when it is gone."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}"


class SlideTiles:
    """Open slides (LRU) and their Deep Zoom tiles."""

    def __init__(self, cache_mb: float = 64) -> None:
        self._open: OrderedDict[Path, OpenedSlide] = OrderedDict()
        self._lock = threading.Lock()
        self.cache = BytesLRU(int(cache_mb * 2**20))

    def open(self, path: Path) -> OpenedSlide:
        from openslide import OpenSlide, OpenSlideError, OpenSlideUnsupportedFormatError
        from openslide.deepzoom import DeepZoomGenerator

        from mil_runtime.errors import SlideReadError
        from mil_runtime.slide.dicom import resolve_dicom_input

        with self._lock:
            found = self._open.get(path)
        if found is not None and _identity(found.source) == found.identity:  # one stat a tile, even for DICOM
            with self._lock:
                self._open.move_to_end(path)
            return found
        # A DICOM series (its folder, or any .dcm of it) opens as its level-0 instance, as mil-infer opens it
        source = resolve_dicom_input(path) if path.is_dir() or path.suffix.lower() == ".dcm" else path
        identity = _identity(source)
        try:
            slide = OpenSlide(str(source))
        except (OpenSlideError, OpenSlideUnsupportedFormatError, OSError) as exc:
            raise SlideReadError(f"{path.name}: OpenSlide cannot open it ({' '.join(str(exc).split())[:200]})") from None
        opened = OpenedSlide(path, slide, DeepZoomGenerator(slide, TILE_SIZE, OVERLAP, limit_bounds=False), identity,
                             source)
        with self._lock:
            self._open[path] = opened
            while len(self._open) > MAX_OPEN_SLIDES:
                self._open.popitem(last=False)  # closed when the last request using it lets go
        return opened

    def dzi(self, path: Path) -> str:
        return self.open(path).generator.get_dzi("jpeg")

    def etag(self, opened: OpenedSlide, level: int, col: int, row: int) -> str:
        digest = hashlib.sha1(f"{opened.identity}:{level}:{col}:{row}:q{JPEG_QUALITY}".encode()).hexdigest()[:20]
        return f'"{digest}"'

    def tile(self, path: Path, level: int, col: int, row: int) -> tuple[bytes, str] | None:
        """(JPEG bytes, ETag) of one tile; None when the slide has no such tile."""
        opened = self.open(path)
        if opened.grid.tile_box(level, col, row) is None:
            return None
        etag = self.etag(opened, level, col, row)
        key = (str(path), opened.identity, level, col, row)
        data = self.cache.get(key)
        if data is None:
            image = opened.generator.get_tile(level, (col, row))
            buffer = io.BytesIO()
            image.save(buffer, "jpeg", quality=JPEG_QUALITY)
            data = buffer.getvalue()
            self.cache.put(key, data)
        return data, etag
