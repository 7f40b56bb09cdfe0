"""The tile grid, defined in microns: which level-0 squares become tiles, and how they are read.

A model trained on 224 px tiles at 0.5 um/px sees 112 um of tissue per tile; on a 0.228 um/px scan
that is round(224 * 0.5 / 0.228) = 491 level-0 pixels. Tiles are read from the coarsest pyramid level
that is still at least as fine as the target (never upsampled), then resized once to `tile_px`.
Grid coordinates are (row, col) = (y, x) level-0 pixels // stride, the bag `coords` of the contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mil_runtime.errors import InvalidInputError, NoTissueError

LEVEL_TOLERANCE = 0.02  # a level 2% coarser than the target still counts as "fine enough"
# Most candidate tiles one slide may be cut into. A 100k x 100k px scan at 0.25 um/px with 224 px tiles
# at 0.5 um/px is about 50,000; a grid past this limit comes from a wrong --mpp or tiling and would
# take hours and gigabytes (a 1 px tile grid), so it is refused before any tile is read.
MAX_TILES = 2_000_000


@dataclass(frozen=True)
class GridPlan:
    """How a slide is cut into tiles for one model."""

    tile_px: int  # side of the tile the encoder sees
    target_mpp: float  # um/px the model was trained at
    slide_mpp: float  # um/px of level 0
    tile_level0: int  # tile side in level-0 pixels
    stride_level0: int  # distance between tile corners in level-0 pixels
    level: int  # pyramid level read from
    downsample: float  # that level's downsample
    read_px: int  # side of the region read at `level`, resized to tile_px

    def positions(self, dimensions: tuple[int, int]) -> np.ndarray:
        """Top-left corners (N, 2) as (x, y) level-0 px of every whole tile, row-major."""
        width, height = dimensions
        xs = np.arange(0, width - self.tile_level0 + 1, self.stride_level0, dtype=np.int64)
        ys = np.arange(0, height - self.tile_level0 + 1, self.stride_level0, dtype=np.int64)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")  # (rows, cols)
        return np.stack([xx.ravel(), yy.ravel()], axis=1)  # (rows * cols, 2)

    def grid_coords(self, xy_level0: np.ndarray) -> np.ndarray:
        """(N, 2) int64 (y, x) grid units = level-0 px // stride."""
        xy = np.asarray(xy_level0, dtype=np.int64).reshape(-1, 2)
        return np.stack([xy[:, 1] // self.stride_level0, xy[:, 0] // self.stride_level0], axis=1)

    def as_dict(self) -> dict:
        return {
            "tile_px": self.tile_px, "target_mpp": self.target_mpp, "slide_mpp": self.slide_mpp,
            "tile_level0": self.tile_level0, "stride_level0": self.stride_level0, "level": self.level,
            "downsample": self.downsample, "read_px": self.read_px,
        }


def pick_level(level_downsamples: tuple[float, ...], wanted_downsample: float,
               tolerance: float = LEVEL_TOLERANCE) -> int:
    """Index of the coarsest level whose downsample is <= `wanted_downsample` (within `tolerance`)."""
    fine_enough = [i for i, d in enumerate(level_downsamples) if d <= wanted_downsample * (1.0 + tolerance)]
    if not fine_enough:
        return 0  # every level is coarser than wanted (target finer than the scan): read level 0
    return max(fine_enough, key=lambda i: level_downsamples[i])


def plan_grid(
    dimensions: tuple[int, int],
    level_downsamples: tuple[float, ...],
    slide_mpp: float,
    tile_px: int,
    target_mpp: float,
    overlap: float = 0.0,
    source: str = "slide",
) -> GridPlan:
    """Plan the grid; raise NoTissueError when the slide is smaller than one tile and InvalidInputError
    when it would hold more than MAX_TILES tiles."""
    if tile_px < 1 or target_mpp <= 0:
        raise InvalidInputError(f"model tiling is invalid (tile_px={tile_px}, mpp={target_mpp}); re-export it")
    if not 0.0 <= overlap < 1.0:
        raise InvalidInputError(f"tile overlap must be in [0, 1), got {overlap}")
    ratio = target_mpp / slide_mpp  # level-0 pixels per model pixel
    tile_level0 = max(1, round(tile_px * ratio))
    stride_level0 = max(1, round(tile_level0 * (1.0 - overlap)))
    level = pick_level(level_downsamples, ratio)
    downsample = float(level_downsamples[level])
    read_px = max(1, round(tile_level0 / downsample))
    width, height = dimensions
    if width < tile_level0 or height < tile_level0:
        raise NoTissueError(
            f"{source} is {width}x{height} px, smaller than one tile ({tile_level0}x{tile_level0} level-0 px "
            f"= {tile_px} px at {target_mpp} um/px with {slide_mpp:.4g} um/px); use a larger image or check --mpp"
        )
    n_tiles = ((width - tile_level0) // stride_level0 + 1) * ((height - tile_level0) // stride_level0 + 1)
    if n_tiles > MAX_TILES:
        raise InvalidInputError(
            f"{source} would be cut into {n_tiles:,} tiles of {tile_level0} level-0 px ({tile_px} px at "
            f"{target_mpp} um/px on a {slide_mpp:.4g} um/px scan), more than the {MAX_TILES:,} allowed; "
            "check --mpp and the slide's resolution"
        )
    return GridPlan(tile_px, float(target_mpp), float(slide_mpp), tile_level0, stride_level0, level,
                    downsample, read_px)
