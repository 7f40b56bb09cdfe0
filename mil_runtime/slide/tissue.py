"""Tissue detection on a low-resolution thumbnail: saturation, Otsu, clean-up in physical units.

Stained tissue is coloured and glass is grey/white, so the HSV saturation separates them better than
brightness (which also picks up dust, shadows and out-of-focus glass). Near-black pixels have a
meaningless saturation (noise on (1, 0, 3) is "fully saturated"), so they count as background;
that also keeps a fluorescence slide's black background out, while its bright stained nuclei stay in.
On a DAPI slide (blue nuclei on black) this keeps the regions where nuclei are dense at ~4 um/px and
drops sparse ones: usable, but the method is meant for brightfield (H&E, IHC) slides.

Otsu always finds *some* threshold, even on a blank slide, so the threshold has a floor: a tile of
white glass with JPEG noise stays background instead of becoming "tissue". Object and hole sizes are
given in um^2 and converted to thumbnail pixels, so the clean-up means the same at any scan resolution.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from skimage import morphology
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

from mil_runtime.slide.open import Slide, rgba_to_rgb

MASK_MPP = 4.0  # microns per thumbnail pixel: fine enough for tiles of ~100 um, small for any slide
MAX_SIDE = 4096  # thumbnail side cap; huge slides get a coarser mask instead of a huge one
MIN_SATURATION = 0.07  # floor under Otsu: saturation of glass + JPEG noise stays below it
MIN_VALUE = 0.08  # HSV value below which a pixel is "black": its saturation is noise
MIN_OBJECT_UM2 = 5_000.0  # tissue fragments smaller than ~70 x 70 um are dropped (dust, debris)
MAX_HOLE_UM2 = 20_000.0  # holes smaller than ~140 x 140 um inside tissue are filled
TISSUE_THRESHOLD = 0.25  # default minimum tissue fraction of a kept tile


@dataclass
class TissueMask:
    """A boolean tissue mask over a thumbnail of the slide, and how it maps onto level 0."""

    mask: np.ndarray  # (height, width) bool, True = tissue
    thumbnail: np.ndarray  # (height, width, 3) uint8 RGB, the image the mask was computed on
    mpp: float  # microns per mask pixel (mean of both axes)
    scale: tuple[float, float]  # level-0 pixels per mask pixel along (x, y)
    threshold: float  # the saturation threshold used

    @property
    def fraction(self) -> float:
        """Fraction of the thumbnail that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def tile_fractions(self, xy_level0: np.ndarray, size_level0: int) -> np.ndarray:
        """Tissue fraction (N,) of square tiles with top-left corners `xy_level0` (N, 2) as (x, y)."""
        return tile_fractions(self.mask, self.scale, xy_level0, size_level0)


def thumbnail_size(dimensions: tuple[int, int], slide_mpp: float, mask_mpp: float, max_side: int) -> tuple[int, int]:
    """(width, height) of a thumbnail at `mask_mpp` um/px, shrunk further if a side exceeds `max_side`."""
    width, height = dimensions
    downsample = max(mask_mpp / slide_mpp, max(width, height) / max_side, 1.0)
    return max(1, round(width / downsample)), max(1, round(height / downsample))


def read_thumbnail(slide: Slide, size: tuple[int, int]) -> np.ndarray:
    """RGB (height, width, 3) of the whole slide at exactly `size`, from the coarsest level still finer."""
    downsample = slide.dimensions[0] / size[0]
    fine_enough = [i for i, d in enumerate(slide.level_downsamples) if d <= downsample * 1.01]
    level = max(fine_enough, key=lambda i: slide.level_downsamples[i]) if fine_enough else 0
    image = slide.read_rgba((0, 0), level, slide.level_dimensions[level])
    if image.size != size:  # Pillow resizes RGBA with premultiplied alpha, so edges do not darken
        image = image.resize(size, Image.Resampling.BOX)
    return rgba_to_rgb(np.asarray(image))  # (height, width, 3)


def saturation_mask(rgb: np.ndarray, min_saturation: float = MIN_SATURATION,
                    min_value: float = MIN_VALUE) -> tuple[np.ndarray, float]:
    """Pixels whose saturation is above Otsu's threshold (floored): (mask (H, W) bool, threshold)."""
    hsv = rgb2hsv(rgb)  # (H, W, 3) floats in [0, 1]
    saturation = np.where(hsv[..., 2] >= min_value, hsv[..., 1], 0.0)  # (H, W)
    if saturation.max() - saturation.min() < 1e-6:  # a uniform image has no tissue/background split
        return np.zeros(saturation.shape, dtype=bool), float(min_saturation)
    threshold = max(float(threshold_otsu(saturation)), min_saturation)
    return saturation > threshold, threshold


def _size_kwarg(function) -> str:
    # scikit-image 0.26 renamed min_size/area_threshold to max_size (removing objects <= max_size).
    return "max_size" if "max_size" in inspect.signature(function).parameters else ""


def clean_mask(mask: np.ndarray, mpp: float, min_object_um2: float, max_hole_um2: float) -> np.ndarray:
    """Drop tissue objects smaller than `min_object_um2` and fill holes smaller than `max_hole_um2`."""
    pixel_um2 = mpp * mpp
    min_object_px = max(1, math.ceil(min_object_um2 / pixel_um2))
    max_hole_px = max(1, math.floor(max_hole_um2 / pixel_um2))
    if _size_kwarg(morphology.remove_small_objects):
        mask = morphology.remove_small_objects(mask, max_size=min_object_px - 1)
        return morphology.remove_small_holes(mask, max_size=max_hole_px)
    mask = morphology.remove_small_objects(mask, min_size=min_object_px)
    return morphology.remove_small_holes(mask, area_threshold=max_hole_px + 1)


def segment_tissue(rgb: np.ndarray, mpp: float, min_object_um2: float = MIN_OBJECT_UM2,
                   max_hole_um2: float = MAX_HOLE_UM2) -> tuple[np.ndarray, float]:
    """Tissue mask (H, W) bool of an RGB image at `mpp` um/px, and the saturation threshold used."""
    mask, threshold = saturation_mask(rgb)
    return clean_mask(mask, mpp, min_object_um2, max_hole_um2), threshold


def detect_tissue(
    slide: Slide,
    slide_mpp: float,
    *,
    mask_mpp: float = MASK_MPP,
    max_side: int = MAX_SIDE,
    min_object_um2: float = MIN_OBJECT_UM2,
    max_hole_um2: float = MAX_HOLE_UM2,
) -> TissueMask:
    """Thumbnail the slide at about `mask_mpp` um/px and segment tissue on it."""
    size = thumbnail_size(slide.dimensions, slide_mpp, mask_mpp, max_side)
    thumbnail = read_thumbnail(slide, size)  # (height, width, 3)
    scale = (slide.dimensions[0] / size[0], slide.dimensions[1] / size[1])
    mpp = slide_mpp * (scale[0] + scale[1]) / 2.0
    mask, threshold = segment_tissue(thumbnail, mpp, min_object_um2, max_hole_um2)
    return TissueMask(mask=mask, thumbnail=thumbnail, mpp=mpp, scale=scale, threshold=threshold)


def tile_fractions(mask: np.ndarray, scale: tuple[float, float], xy_level0: np.ndarray,
                   size_level0: int) -> np.ndarray:
    """Mean of `mask` over each tile's footprint (N,), with an integral image: O(1) per tile.

    A tile covers the mask pixels its level-0 square overlaps (floor of the start, ceil of the end),
    so a tile smaller than a mask pixel still reads the one pixel under it.
    """
    xy = np.asarray(xy_level0, dtype=np.float64).reshape(-1, 2)  # (N, 2) as (x, y)
    height, width = mask.shape
    integral = np.zeros((height + 1, width + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    x0 = np.clip(np.floor(xy[:, 0] / scale[0]), 0, width - 1).astype(np.int64)  # (N,)
    y0 = np.clip(np.floor(xy[:, 1] / scale[1]), 0, height - 1).astype(np.int64)
    x1 = np.clip(np.ceil((xy[:, 0] + size_level0) / scale[0]), x0 + 1, width).astype(np.int64)
    y1 = np.clip(np.ceil((xy[:, 1] + size_level0) / scale[1]), y0 + 1, height).astype(np.int64)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]  # (N,)
    return inside / ((y1 - y0) * (x1 - x0))
