"""Synthetic H&E-like whole-slide images with planted "lesions", for tests, benchmarks and the demo.

A slide is pink tissue (eosin) sprinkled with purple nuclei (haematoxylin) on a white background.
Lesions are discs in level-0 pixels where nuclei are denser, larger, darker and bluer and the stroma
is more purple, so a tile's lesion content is known exactly (`SyntheticSlide.lesion_fraction`).

The file is a tiled, JPEG-compressed pyramid written with tifffile:
- ``.svs``: Aperio layout (ImageDescription "Aperio Image Library ...|MPP = m"), the format most
  slide scanners ship; OpenSlide reports ``openslide.mpp-x`` from ``aperio.MPP``.
- ``.tif`` / ``.tiff``: generic tiled TIFF with X/YResolution in pixels per centimetre, which
  OpenSlide's generic-tiff reader turns into ``openslide.mpp-x``.

Needs tifffile and imagecodecs (milkit[dev]); the runtime itself never imports this module.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage, stats

from mil_runtime.errors import MilkitError

Lesion = tuple[int, int, int]  # (cy, cx, radius) in level-0 pixels

BACKGROUND_RGB = (242, 240, 243)
STROMA_RGB = (232, 168, 200)
LESION_STROMA_RGB = (200, 140, 196)
NUCLEUS_RGB = (128, 72, 158)
LESION_NUCLEUS_RGB = (62, 40, 128)

# Per-nucleus numbers at the slide's own resolution are set in microns, so a slide written at another
# mpp still looks like the same tissue.
NUCLEUS_RADIUS_UM = 3.5
LESION_NUCLEUS_RADIUS_UM = 4.8
NUCLEI_PER_MM2 = 1800.0
LESION_NUCLEI_PER_MM2 = 5400.0
MASK_SCALE = 16  # tissue mask is kept at 1/16 of level 0 (cheap to store, exact enough for fractions)


@dataclass
class SyntheticSlide:
    """What was written: where, at which mpp, the level-0 shape and the ground-truth geometry."""

    path: Path
    mpp: float
    shape: tuple[int, int]  # (height, width) at level 0
    lesions: list[Lesion] = field(default_factory=list)
    tissue_mask: np.ndarray | None = None  # bool (ceil(H/16), ceil(W/16)); None = no tissue
    level_downsamples: tuple[int, ...] = (1,)

    def lesion_fraction(self, y0: int, x0: int, size: int, samples: int = 16) -> float:
        """Fraction of the level-0 square [y0, y0+size) x [x0, x0+size) inside any lesion disc.

        Evaluated on a `samples` x `samples` grid of pixel centres: exact to 1/samples^2.
        """
        if not self.lesions:
            return 0.0
        offsets = (np.arange(samples) + 0.5) * (size / samples)
        ys, xs = np.meshgrid(y0 + offsets, x0 + offsets, indexing="ij")  # (samples, samples)
        inside = _in_lesions(ys, xs, self.lesions)
        return float(inside.mean())

    def lesion_fractions(self, coords_yx: np.ndarray, size: int) -> np.ndarray:
        """`lesion_fraction` for many tiles; coords_yx (N, 2) are level-0 top-left corners (y, x)."""
        coords_yx = np.asarray(coords_yx)
        return np.array([self.lesion_fraction(int(y), int(x), size) for y, x in coords_yx], dtype=np.float64)

    def tile_labels(self, xy_level0: np.ndarray, tile_level0: int) -> np.ndarray:
        """Ground truth of pipeline tiles (corners as (x, y), the pipeline's order): (N,) int64.

        1 = at least half the tile is lesion, 0 = no lesion at all, -1 = a sliver of lesion (ambiguous;
        left out of instance metrics, as partly covered tiles are in annotated benchmarks).
        """
        xy = np.asarray(xy_level0).reshape(-1, 2)
        fractions = self.lesion_fractions(xy[:, ::-1], tile_level0)  # (N,)
        return np.where(fractions >= 0.5, 1, np.where(fractions == 0.0, 0, -1)).astype(np.int64)

    def tissue_fraction(self, y0: int, x0: int, size: int) -> float:
        """Fraction of the level-0 square covered by tissue (from the 1/16-scale mask)."""
        if self.tissue_mask is None:
            return 0.0
        s = MASK_SCALE
        block = self.tissue_mask[y0 // s : -(-(y0 + size) // s), x0 // s : -(-(x0 + size) // s)]
        return float(block.mean()) if block.size else 0.0

    @property
    def is_lesion_slide(self) -> bool:
        return bool(self.lesions)


def rank_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U), ties counted half; labels 1 / 0, others ignored.

    NaN when either class is missing. No scikit-learn needed, so the demo can report it with the runtime alone.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = stats.rankdata(np.concatenate([pos, neg]))  # ties get their average rank
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def _in_lesions(ys: np.ndarray, xs: np.ndarray, lesions: list[Lesion]) -> np.ndarray:
    inside = np.zeros(np.broadcast(ys, xs).shape, dtype=bool)
    for cy, cx, r in lesions:
        inside |= (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
    return inside


# -- geometry --------------------------------------------------------------------------------------
def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth random field with unit spread, used for tissue outline and stain texture."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-6)


def _tissue_mask(rng: np.random.Generator, small_shape: tuple[int, int], tissue) -> np.ndarray:
    """Tissue at mask scale: a blob covering `tissue` (fraction of the area), kept off the border."""
    h, w = small_shape
    if isinstance(tissue, np.ndarray):
        from skimage.transform import resize

        return resize(tissue.astype(np.float32), small_shape, order=0) > 0.5
    if tissue == "full":
        return np.ones(small_shape, dtype=bool)
    fraction = float(tissue)
    if fraction <= 0:
        return np.zeros(small_shape, dtype=bool)
    field_ = _smooth_field(rng, small_shape, sigma=max(h, w) / 10)
    # A centred bump makes one main piece of tissue with a white margin, as on a real slide.
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    score = field_ - 2.0 * (yy**2 + xx**2)
    threshold = np.quantile(score, 1.0 - min(fraction, 1.0))
    return score >= threshold


def _random_lesions(rng: np.random.Generator, n: int, mask: np.ndarray, shape, mpp: float) -> list[Lesion]:
    """n lesion discs centred on tissue, radius 150-300 um (a few demo tiles across)."""
    ys, xs = np.nonzero(mask)
    if n and ys.size == 0:
        raise MilkitError("cannot plant lesions: the slide has no tissue; raise `tissue`")
    picks = rng.choice(ys.size, size=n, replace=ys.size < n) if n else []
    lesions = []
    for i in picks:
        radius = int(rng.uniform(150, 300) / mpp)
        radius = min(radius, min(shape) // 4)
        cy = int(min(max(ys[i] * MASK_SCALE + MASK_SCALE // 2, radius), shape[0] - radius))
        cx = int(min(max(xs[i] * MASK_SCALE + MASK_SCALE // 2, radius), shape[1] - radius))
        lesions.append((cy, cx, radius))
    return lesions


def _parse_lesions(lesions, rng, mask, shape, mpp) -> list[Lesion]:
    if lesions is None:
        return []
    if isinstance(lesions, (int, np.integer)):
        return _random_lesions(rng, int(lesions), mask, shape, mpp)
    if isinstance(lesions, str):
        match = re.fullmatch(r"\s*random\s+(\d+)\s*", lesions)
        if not match:
            raise ValueError(f"lesions={lesions!r}: use a list of (cy, cx, radius) or 'random N'")
        return _random_lesions(rng, int(match.group(1)), mask, shape, mpp)
    return [(int(cy), int(cx), int(r)) for cy, cx, r in lesions]


# -- painting --------------------------------------------------------------------------------------
def _upsample(small: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a mask-scale array to level 0 (cropped to shape)."""
    big = np.repeat(np.repeat(small, MASK_SCALE, axis=0), MASK_SCALE, axis=1)
    return big[: shape[0], : shape[1]]


def _disc_stamps(radius: float, rng: np.random.Generator, variants: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """Offsets (dy, dx) of a few elliptical nucleus shapes of about `radius` pixels."""
    r = int(np.ceil(radius * 1.3))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    stamps = []
    for _ in range(variants):
        angle = rng.uniform(0, np.pi)
        a, b = radius * rng.uniform(1.0, 1.3), radius * rng.uniform(0.7, 1.0)
        u = dy * np.cos(angle) + dx * np.sin(angle)
        v = -dy * np.sin(angle) + dx * np.cos(angle)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
        stamps.append((dy[inside], dx[inside]))
    return stamps


def _paint_nuclei(image, rng, centres, radius_px, rgb, darkness_spread=0.12) -> None:
    """Stamp nuclei at `centres` (k, 2) into image in place, each with its own shade."""
    if len(centres) == 0:
        return
    h, w = image.shape[:2]
    stamps = _disc_stamps(radius_px, rng)
    which = rng.integers(len(stamps), size=len(centres))
    shade = rng.uniform(1 - darkness_spread, 1 + darkness_spread, size=len(centres))
    base = np.asarray(rgb, dtype=np.float32)
    for k, (dy, dx) in enumerate(stamps):
        sel = which == k
        if not sel.any():
            continue
        ys = np.clip(centres[sel, 0, None] + dy[None, :], 0, h - 1)  # (nuclei, stamp_px)
        xs = np.clip(centres[sel, 1, None] + dx[None, :], 0, w - 1)  # (nuclei, stamp_px)
        colour = np.clip(base[None, :] * shade[sel, None], 0, 255).astype(np.uint8)  # (nuclei, 3)
        image[ys, xs] = np.broadcast_to(colour[:, None, :], ys.shape + (3,))


def _sample_points(rng, count: int, y0, x0, y1, x1) -> np.ndarray:
    ys = rng.integers(y0, max(y1, y0 + 1), size=count)
    xs = rng.integers(x0, max(x1, x0 + 1), size=count)
    return np.stack([ys, xs], axis=1)  # (count, 2)


def _render(shape, mpp, tissue_small, lesions, rng) -> np.ndarray:
    h, w = shape
    tissue = _upsample(tissue_small, shape)  # (H, W) bool
    lesion = _lesion_mask_full(shape, lesions) if lesions else None  # (H, W) bool, exact discs

    # Stain texture: a mask-scale field, upsampled, plus a small repeated grain patch for pixel noise.
    shade_small = _smooth_field(rng, tissue_small.shape, sigma=3.0)
    shade = 1.0 + 0.06 * _upsample(shade_small, shape)[..., None]  # (H, W, 1)
    grain = rng.normal(0, 6, size=(251, 251, 3)).astype(np.float32)
    grain = np.tile(grain, (-(-h // 251), -(-w // 251), 1))[:h, :w]  # (H, W, 3)

    stroma = np.asarray(STROMA_RGB, np.float32)
    image = np.empty((h, w, 3), dtype=np.float32)
    image[:] = np.asarray(BACKGROUND_RGB, np.float32)
    image[tissue] = stroma
    if lesion is not None:
        image[lesion] = np.asarray(LESION_STROMA_RGB, np.float32)
    image *= np.where(tissue[..., None], shade, 1.0)
    image += grain
    image = np.clip(image, 0, 255).astype(np.uint8)

    area_mm2 = h * w * (mpp / 1000.0) ** 2
    normal = _sample_points(rng, int(NUCLEI_PER_MM2 * area_mm2), 0, 0, h, w)
    normal = normal[tissue[normal[:, 0], normal[:, 1]]]
    if lesion is not None:
        normal = normal[~lesion[normal[:, 0], normal[:, 1]]]
    _paint_nuclei(image, rng, normal, NUCLEUS_RADIUS_UM / mpp, NUCLEUS_RGB)
    for cy, cx, r in lesions:
        n = int(LESION_NUCLEI_PER_MM2 * (2 * r * mpp / 1000.0) ** 2)
        pts = _sample_points(rng, n, max(cy - r, 0), max(cx - r, 0), min(cy + r, h), min(cx + r, w))
        pts = pts[(pts[:, 0] - cy) ** 2 + (pts[:, 1] - cx) ** 2 <= r * r]
        _paint_nuclei(image, rng, pts, LESION_NUCLEUS_RADIUS_UM / mpp, LESION_NUCLEUS_RGB)
    return image


def _lesion_mask_full(shape, lesions: list[Lesion]) -> np.ndarray:
    """Exact level-0 lesion discs, each drawn only inside its bounding box (cheap at any slide size)."""
    mask = np.zeros(shape, dtype=bool)
    for cy, cx, r in lesions:
        y0, y1 = max(cy - r, 0), min(cy + r + 1, shape[0])
        x0, x1 = max(cx - r, 0), min(cx + r + 1, shape[1])
        if y0 >= y1 or x0 >= x1:
            continue
        ys, xs = np.ogrid[y0:y1, x0:x1]
        mask[y0:y1, x0:x1] |= (ys + 0.5 - cy) ** 2 + (xs + 0.5 - cx) ** 2 <= r * r
    return mask


def _lesion_mask_small(small_shape, lesions: list[Lesion]) -> np.ndarray:
    centres = (np.arange(small_shape[0]) + 0.5) * MASK_SCALE, (np.arange(small_shape[1]) + 0.5) * MASK_SCALE
    ys, xs = np.meshgrid(*centres, indexing="ij")
    return _in_lesions(ys, xs, lesions)


# -- writing ---------------------------------------------------------------------------------------
def _pyramid(image: np.ndarray, levels: int, scale: int) -> list[np.ndarray]:
    """Level 0 plus levels-1 block-mean downsamples by `scale` each (stops before a level < 1 tile)."""
    out = [image]
    for _ in range(levels - 1):
        prev = out[-1]
        h, w = prev.shape[0] // scale, prev.shape[1] // scale
        if h < 1 or w < 1:
            break
        blocks = prev[: h * scale, : w * scale].reshape(h, scale, w, scale, 3)
        out.append(blocks.mean(axis=(1, 3), dtype=np.float32).round().astype(np.uint8))
    return out


def _write_tiff(path: Path, levels: list[np.ndarray], mpp: float, tile: int, quality: int) -> None:
    try:
        import tifffile
    except ImportError:
        raise MilkitError("writing synthetic slides needs tifffile and imagecodecs: pip install milkit[dev]") from None
    aperio = path.suffix.lower() == ".svs"
    h, w = levels[0].shape[:2]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=h * w * 3 > 2**31) as tif:
            for i, level in enumerate(levels):
                kwargs = dict(
                    tile=(tile, tile),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": quality},
                    metadata=None,
                    maxworkers=2,
                )
                lh, lw = level.shape[:2]
                if aperio:
                    kwargs["description"] = (
                        f"Aperio Image Library v12.0.0 (milkit synthetic)\r\n{w}x{h} -> {lw}x{lh} "
                        f"[0,0 {lw}x{lh}] ({tile}x{tile}) JPEG/RGB Q={quality}|AppMag = {10.0 / mpp:g}"
                        f"|MPP = {mpp:g}|Filename = {path.stem}"
                    )
                elif i > 0:
                    kwargs["subfiletype"] = 1  # reduced-resolution image: OpenSlide's generic-tiff level
                else:
                    kwargs["description"] = "milkit synthetic slide"
                    per_cm = 1e4 / mpp
                    kwargs["resolution"] = (per_cm, per_cm)
                    kwargs["resolutionunit"] = "CENTIMETER"
                tif.write(level, **kwargs)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_synthetic_slide(
    path: str | os.PathLike,
    *,
    height: int = 4096,
    width: int = 4096,
    mpp: float = 0.5,
    lesions=None,
    tissue: float | str | np.ndarray = 0.6,
    seed: int = 0,
    tile: int = 256,
    levels: int = 3,
    level_scale: int = 2,
    quality: int = 90,
) -> SyntheticSlide:
    """Write a synthetic H&E-like pyramidal slide and return its ground truth.

    Args:
        path: ``.svs`` (Aperio layout, default choice) or ``.tif``/``.tiff`` (generic TIFF).
        height, width: level-0 size in pixels.
        mpp: microns per pixel at level 0, reported by OpenSlide as ``openslide.mpp-x``.
        lesions: list of (cy, cx, radius) level-0 discs, an int n or "random n" for n random discs on
            tissue, or None for a clean slide. Lesions are always tissue.
        tissue: fraction of the slide area covered by tissue (0 = blank), "full", or a bool mask of any
            shape (resized to the slide).
        seed: everything random (outline, texture, nuclei, random lesions) follows from it.
        tile: TIFF tile size; levels: pyramid levels; level_scale: downsample between levels.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    shape = (int(height), int(width))
    small_shape = (-(-shape[0] // MASK_SCALE), -(-shape[1] // MASK_SCALE))
    tissue_small = _tissue_mask(rng, small_shape, tissue)
    lesion_list = _parse_lesions(lesions, rng, tissue_small, shape, mpp)
    if lesion_list:
        tissue_small = tissue_small | _lesion_mask_small(small_shape, lesion_list)
    image = _render(shape, mpp, tissue_small, lesion_list, rng)
    pyramid = _pyramid(image, levels, level_scale)
    _write_tiff(path, pyramid, mpp, tile, quality)
    return SyntheticSlide(
        path=path,
        mpp=float(mpp),
        shape=shape,
        lesions=lesion_list,
        tissue_mask=tissue_small if tissue_small.any() else None,
        level_downsamples=tuple(level_scale**i for i in range(len(pyramid))),
    )


def write_blank_slide(path: str | os.PathLike, *, height: int = 2048, width: int = 2048, mpp: float = 0.5,
                      seed: int = 0, **kwargs) -> SyntheticSlide:
    """A slide with background only (no tissue, no lesions): what a no-tissue error test needs."""
    return write_synthetic_slide(path, height=height, width=width, mpp=mpp, lesions=None, tissue=0.0,
                                 seed=seed, **kwargs)
