"""The attention overlay: RGBA Deep Zoom tiles on exactly the slide's Deep Zoom grid.

Per job and colouring (class, norm, vmin, vmax, cmap), the tiles' attention is coloured once into a
raster with one palette index per level-0 tile-grid cell (stride = the model's tile stride; cells
without a tile are transparent; 255 colour steps of the colour map). A Deep Zoom tile is then a nearest-neighbour gather from that raster at the
level-0 centres of its pixels: no per-tile colouring, so tiles are cheap and line up with the slide's
own tiles pixel for pixel. Colouring reuses the output set's heatmap: percentile rank (norm=rank,
the default, mil_runtime.outputs.heatmap.normalise) or linear between vmin and vmax (default: the
map's min and max); the rank's [0, 1] is also stretched by vmin/vmax when given.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mil_runtime.outputs.colormap import viridis_lut
from mil_runtime.outputs.heatmap import normalise
from mil_runtime.serve.errors import ApiError
from mil_runtime.serve.tiles import DeepZoomGrid

NORMS = ("rank", "linear")


def _lut_from(anchors: list[list[int]]) -> np.ndarray:
    anchors = np.asarray(anchors, dtype=np.float64)
    stops = np.linspace(0.0, 1.0, len(anchors))
    positions = np.linspace(0.0, 1.0, 256)
    return np.rint(np.stack([np.interp(positions, stops, anchors[:, c]) for c in range(3)], axis=1)).astype(np.uint8)


CMAPS = {
    "viridis": viridis_lut(),
    "magma": _lut_from([[0, 0, 4], [28, 16, 68], [79, 18, 123], [129, 37, 129], [181, 54, 122],
                        [229, 80, 100], [251, 135, 97], [254, 194, 135], [252, 253, 191]]),
    "hot": _lut_from([[11, 0, 0], [128, 0, 0], [255, 0, 0], [255, 128, 0], [255, 255, 0], [255, 255, 255]]),
    "gray": _lut_from([[0, 0, 0], [255, 255, 255]]),
}


@dataclass(frozen=True)
class Colouring:
    cls: str | None = None
    norm: str = "rank"
    vmin: float | None = None
    vmax: float | None = None
    cmap: str = "viridis"

    def check(self, classes: list[str]) -> "Colouring":
        if self.norm not in NORMS:
            raise ApiError(400, f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}", 6)
        if self.cmap not in CMAPS:
            raise ApiError(400, f"cmap must be one of {', '.join(CMAPS)}, got {self.cmap!r}", 6)
        if self.cls is not None and self.cls not in classes:
            have = ", ".join(classes) if classes else "none (this model has one attention map)"
            raise ApiError(400, f"class {self.cls!r} has no attention map; classes with maps: {have}", 6)
        for value in (self.vmin, self.vmax):
            if value is not None and not math.isfinite(value):
                raise ApiError(400, "vmin and vmax must be finite numbers", 6)
        if self.vmin is not None and self.vmax is not None and not self.vmin < self.vmax:
            raise ApiError(400, "vmin must be smaller than vmax", 6)
        return self

    def scale(self, attention: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Values in [0, 1] per tile, and the (low, high) the colours' ends stand for."""
        attention = np.asarray(attention, dtype=np.float64)
        if self.norm == "rank":
            base, low, high = normalise(attention), 0.0, 1.0
        else:
            base = attention
            low = float(attention.min()) if attention.size else 0.0
            high = float(attention.max()) if attention.size else 1.0
        low = self.vmin if self.vmin is not None else low
        high = self.vmax if self.vmax is not None else high
        span = high - low if high > low else 1.0
        return np.clip((base - low) / span, 0.0, 1.0), low, high


TRANSPARENT = 0  # palette index of "no tile here"
LEVELS = 255  # colour steps of the overlay: palette indices 1..255 (PNG palettes hold 256 entries)


def colour_positions(values: np.ndarray) -> np.ndarray:
    """Palette indices 1..255 of values in [0, 1] (index 0 is transparent)."""
    return 1 + np.rint(np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (LEVELS - 1)).astype(np.int64)


def palette(cmap: str) -> np.ndarray:
    """(256, 3) uint8: entry 0 unused (transparent), entry i the colour map at (i - 1) / 254."""
    lut = CMAPS[cmap]
    table = np.zeros((256, 3), dtype=np.uint8)
    table[1:] = lut[np.rint(np.arange(LEVELS) / (LEVELS - 1) * (len(lut) - 1)).astype(np.int64)]
    return table


class AttentionRaster:
    """One job's attention on the level-0 tile grid, coloured once; serves overlay tiles.

    The raster holds a palette index per grid cell (0 = no tile: transparent); a tile is two `take`s
    (rows, then columns) and a palette PNG with index 0 transparent, which browsers draw as RGBA.
    """

    def __init__(self, xy_level0: np.ndarray, stride: int, values: np.ndarray, cmap: str,
                 width: int, height: int) -> None:
        xy = np.asarray(xy_level0, dtype=np.int64).reshape(-1, 2)
        self.stride = int(stride)
        self.grid = DeepZoomGrid(int(width), int(height))
        self.cols = max(1, -(-int(width) // self.stride))
        self.rows = max(1, -(-int(height) // self.stride))
        index = np.zeros((self.rows + 1, self.cols + 1), dtype=np.uint8)  # last row/col: transparent sentinel
        gy, gx = xy[:, 1] // self.stride, xy[:, 0] // self.stride
        ok = (gy < self.rows) & (gx < self.cols)
        index[gy[ok], gx[ok]] = colour_positions(np.asarray(values)[ok])
        self.index = index
        self.palette = palette(cmap)
        self._palette_bytes = self.palette.tobytes()
        self.values = values
        self._empty: dict[tuple[int, int], bytes] = {}

    def cells(self, level: int, col: int, row: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Raster row and column indices of each pixel row / column of a Deep Zoom tile."""
        box = self.grid.tile_box(level, col, row)
        if box is None:
            return None
        x0, y0, w, h = box
        ds = self.grid.downsample(level)
        cx = ((x0 + np.arange(w) + 0.5) * ds // self.stride).astype(np.int64)
        cy = ((y0 + np.arange(h) + 0.5) * ds // self.stride).astype(np.int64)
        cx[cx >= self.cols] = self.cols
        cy[cy >= self.rows] = self.rows
        return cy, cx

    def tile_indices(self, level: int, col: int, row: int) -> np.ndarray | None:
        found = self.cells(level, col, row)
        if found is None:
            return None
        cy, cx = found
        return self.index.take(cy, axis=0).take(cx, axis=1)  # (h, w) palette indices

    def tile_pixels(self, level: int, col: int, row: int) -> np.ndarray | None:
        """(h, w, 4) uint8 RGBA of one overlay tile; None when the grid has no such tile."""
        indices = self.tile_indices(level, col, row)
        if indices is None:
            return None
        rgba = np.zeros((*indices.shape, 4), dtype=np.uint8)
        rgba[..., :3] = self.palette[indices]
        rgba[..., 3] = np.where(indices == TRANSPARENT, 0, 255)
        return rgba

    def tile_png(self, level: int, col: int, row: int) -> bytes | None:
        indices = self.tile_indices(level, col, row)
        if indices is None:
            return None
        if not indices.any():  # nothing here: one cached transparent PNG per tile size
            size = (indices.shape[1], indices.shape[0])
            if size not in self._empty:
                self._empty[size] = self._encode(indices)
            return self._empty[size]
        return self._encode(indices)

    def _encode(self, indices: np.ndarray) -> bytes:
        image = Image.fromarray(np.ascontiguousarray(indices), "P")
        image.putpalette(self._palette_bytes)
        buffer = io.BytesIO()
        image.save(buffer, "png", compress_level=1, transparency=TRANSPARENT)
        return buffer.getvalue()


def legend_png(colouring: Colouring, low: float, high: float, title: str) -> bytes:
    """A 280 x 44 colour bar with its ends' values and what they mean."""
    lut = CMAPS[colouring.cmap]
    width, bar = 280, 256
    image = Image.new("RGBA", (width, 44), (255, 255, 255, 230))
    strip = np.repeat(lut[None, :, :], 14, axis=0)
    image.paste(Image.fromarray(np.ascontiguousarray(strip), "RGB"), (12, 4))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    if colouring.norm == "rank":
        left, right = f"rank {low:.0%}", f"rank {high:.0%}"
    else:
        left, right = f"{low:.3g}", f"{high:.3g}"
    draw.text((12, 21), left, fill=(0, 0, 0, 255), font=font)
    draw.text((12 + bar - int(draw.textlength(right, font=font)), 21), right, fill=(0, 0, 0, 255), font=font)
    middle = title[:28]
    draw.text((12 + (bar - int(draw.textlength(middle, font=font))) // 2, 31), middle, fill=(60, 60, 60, 255), font=font)
    buffer = io.BytesIO()
    image.save(buffer, "png")
    return buffer.getvalue()
