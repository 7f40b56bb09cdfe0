"""Opening a slide with OpenSlide, with every OpenSlide failure turned into one milkit error.

OpenSlide opens some broken files happily and only fails on the first pixel read (a corrupt JPEG
tile: "Bogus marker length"). `open_slide` therefore probes a small region and the thumbnail level
straight away, so such a slide stops before any work is done instead of half-way through tiling.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from mil_runtime.errors import InputNotFoundError, SlideReadError
from mil_runtime.slide.dicom import is_dicom_input, resolve_dicom_input

PROBE_PX = 16  # side of the region read at open time to catch undecodable tiles early


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's (un-premultiplied) RGBA onto white: transparent = outside the scan."""
    alpha = rgba[..., 3:4]  # (..., 1)
    if alpha.min() == 255:  # the common case: fully scanned region, nothing to blend
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16)  # (..., 3)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


class Slide:
    """An open whole-slide image: level geometry, properties, and RGB reads that raise SlideReadError."""

    def __init__(self, path: Path, handle: openslide.OpenSlide):
        self.path = path
        self._handle = handle

    # -- geometry ------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        return self._handle.dimensions

    @property
    def level_count(self) -> int:
        return self._handle.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._handle.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._handle.level_downsamples

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._handle.properties)

    # -- pixels --------------------------------------------------------------------------------
    def read_rgba(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """OpenSlide's RGBA image of a region; `location` is (x, y) in level-0 pixels."""
        try:
            return self._handle.read_region(location, level, size)
        except openslide.OpenSlideError as exc:
            raise SlideReadError(
                f"{self.path}: OpenSlide cannot read the region at (x={location[0]}, y={location[1]}) "
                f"level {level} ({_first_line(exc)}); the file is damaged, re-export or re-scan it"
            ) from None

    def read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (height, width, 3) of a region, transparent parts white."""
        return rgba_to_rgb(np.asarray(self.read_rgba(location, level, size)))  # (h, w, 3)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def probe(self) -> None:
        """Read a small region at level 0 and the top-left of the smallest level; raise if either fails."""
        width, height = self.dimensions
        self.read_rgb((0, 0), 0, (min(PROBE_PX, width), min(PROBE_PX, height)))
        last = self.level_count - 1
        lw, lh = self.level_dimensions[last]
        self.read_rgb((0, 0), last, (min(PROBE_PX, lw), min(PROBE_PX, lh)))


def open_handle(path: str | os.PathLike) -> openslide.OpenSlide:
    """A raw OpenSlide handle, with open failures mapped to InputNotFoundError / SlideReadError.

    A DICOM slide (its series folder, or any .dcm of the series: mil_runtime.slide.dicom) opens
    through its level-0 instance; OpenSlide finds the series' other files beside it.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"slide not found: {path}")
    if path.is_dir() or is_dicom_input(path):
        target = resolve_dicom_input(path)  # SlideReadError for a folder / file that holds no slide
    elif not path.is_file():
        raise SlideReadError(f"{path} is not a file; give the path of a whole-slide image file")
    else:
        target = path
    if target != path:
        try:
            return openslide.OpenSlide(str(target))
        except (openslide.OpenSlideError, OSError, Image.DecompressionBombError) as exc:
            raise SlideReadError(  # DICOM: the series resolved, but OpenSlide refuses it (codec, layout)
                f"OpenSlide cannot open the DICOM slide {path} through {target.name} ({_first_line(exc)}); "
                "export it as TILED_FULL JPEG / JPEG 2000 frames, or convert it to a pyramidal TIFF"
            ) from None
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideReadError(
            f"{path} is not a slide format OpenSlide reads (Aperio .svs, Hamamatsu .ndpi, tiled TIFF, ...); "
            "convert it to a pyramidal TIFF"
        ) from None
    except (openslide.OpenSlideError, OSError, Image.DecompressionBombError) as exc:
        raise SlideReadError(
            f"OpenSlide cannot open {path} ({_first_line(exc)}); the file is damaged or uses an "
            "unsupported encoding: re-export it as a standard pyramidal TIFF"
        ) from None


def open_slide(path: str | os.PathLike, probe: bool = True) -> Slide:
    """Open a slide, check it decodes (unless `probe=False`), and return it."""
    path = Path(path)
    slide = Slide(path, open_handle(path))
    if probe:
        try:
            slide.probe()
        except BaseException:
            slide.close()
            raise
    return slide
