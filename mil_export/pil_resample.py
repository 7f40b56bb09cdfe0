"""PIL's uint8 resize, then torchvision's center crop, as traceable torch ops (so they export into a graph).

What torchvision's `Resize(resize_px, interpolation)` + `CenterCrop(crop_px)` do to a PIL RGB image, and so
what TRIDENT and the model cards feed their encoders:
  * the short side becomes `resize_px`, the long side `int(resize_px * long / short)` (aspect kept);
  * PIL resamples in two separable passes, horizontal then vertical, each over the filter's support
    stretched by the scale when downscaling (antialiasing), with coefficients normalised to sum 1 and
    quantised to 22 fractional bits; after each pass the sum is rounded half up and clamped to 0..255;
  * the crop starts at `round((size - crop_px) / 2)` (Python's round: half to even) on each axis.

Here each pass is one matrix product with a (crop_px, in) coefficient matrix built from the symbolic
input size, evaluated for the cropped output rows only. Coefficients and sums are float64: the integer
coefficients times uint8 pixels stay far below 2**53, so every sum is exact whatever order the matrix
product adds in, and the result reproduces PIL's integer arithmetic.

Measured against Pillow 13 through torchvision 0.29 (`Resize(r, interpolation)` + `CenterCrop(224)` on the
PIL image), on 8 tiles of CMU-1-Small-Region.svs and 8 uniform-noise images per case (1,204,224 values each),
bilinear and bicubic: 224->224, 256->224, 512->224 and 224->256 + crop 224 differ in 0 values; non-square
tiles and the exported graph under onnxruntime likewise (tests/export/test_encoder_graph.py). The first
format's float resize (F.interpolate, antialias, no rounding) differed after rounding in 7-21% of the values
at 256->224 and 512->224 bilinear, by at most 1 grey level.

Cost: dense products, crop_px * (H * W + crop_px * H) multiply-adds per channel (67 M per 224 px tile),
well under 1% of a ViT-B's. When the sizes are plain ints (eager, or a fixed tile size) an identity pass
is skipped.
"""

from __future__ import annotations

import torch

FILTER_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}  # PIL's supports, in source pixels at scale 1
INTERPOLATIONS = tuple(FILTER_SUPPORT)
BICUBIC_A = -0.5  # PIL's cubic convolution parameter (torch's non-antialiased bicubic uses -0.75)
PRECISION_BITS = 22  # PIL's fixed-point coefficients for 8-bit images: 32 - 8 - 2
_ONE = float(1 << PRECISION_BITS)
_HALF = float(1 << (PRECISION_BITS - 1))


def _kernel(x: torch.Tensor, interpolation: str) -> torch.Tensor:
    """PIL's filter at distance x (source pixels, already divided by the downscale factor)."""
    x = x.abs()
    if interpolation == "bilinear":
        return torch.where(x < 1.0, 1.0 - x, torch.zeros_like(x))
    a = BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def coefficients(
    n_in: int | torch.SymInt, out_size: torch.Tensor, first: torch.Tensor, count: int, interpolation: str
) -> torch.Tensor:
    """(count, n_in) float64 integer coefficients (scaled by 2**22) of output pixels first .. first+count-1.

    `out_size` (the full resized length) and `first` (the crop offset) are float64 scalars, so they may
    depend on the symbolic tile size; the arithmetic follows PIL's precompute_coeffs step for step.
    """
    source = torch.arange(n_in, dtype=torch.float64)  # (n_in,)
    n_in_f = torch.full((), n_in, dtype=torch.float64)
    scale = n_in_f / out_size
    filterscale = torch.clamp(scale, min=1.0)  # upscaling keeps the filter at its own width
    support = FILTER_SUPPORT[interpolation] * filterscale
    inverse = 1.0 / filterscale  # PIL multiplies by the reciprocal; dividing would round differently
    output = first + torch.arange(count, dtype=torch.float64)  # (count,)
    center = ((output + 0.5) * scale)[:, None]  # (count, 1)
    low = torch.clamp(torch.trunc(center - support + 0.5), min=0.0)  # PIL's window, C int truncation
    high = torch.minimum(torch.trunc(center + support + 0.5), n_in_f)
    inside = (source >= low) & (source < high)  # (count, n_in)
    weight = torch.where(inside, _kernel((source - center + 0.5) * inverse, interpolation), 0.0)
    total = weight.sum(dim=1, keepdim=True)  # (count, 1)
    weight = torch.where(total != 0.0, weight / total, weight)
    scaled = weight * _ONE
    return torch.trunc(torch.where(scaled < 0, scaled - 0.5, scaled + 0.5))  # round half away from zero


def round_to_uint8(sums: torch.Tensor) -> torch.Tensor:
    """PIL's clip8: (sum + 2**21) >> 22, clamped to 0..255, still float64."""
    return torch.clamp(torch.floor((sums + _HALF) / _ONE), 0.0, 255.0)


def _resized_length(side: torch.Tensor, short: torch.Tensor, resize_px: int) -> torch.Tensor:
    """torchvision's Resize(int): the short side becomes resize_px, the other int(resize_px * side / short)."""
    return torch.floor(resize_px * side / short)


def _crop_start(length: torch.Tensor, crop_px: int) -> torch.Tensor:
    """torchvision's CenterCrop offset: int(round((length - crop_px) / 2.0)); torch.round is half to even too."""
    return torch.round((length - crop_px) / 2.0)


def _is_identity(n_in: int | torch.SymInt, resize_px: int, crop_px: int, short: int | torch.SymInt) -> bool:
    """True only for plain-int sizes where the pass provably maps every pixel to itself."""
    if not all(isinstance(v, int) for v in (n_in, short)):
        return False
    return n_in == short == resize_px == crop_px


def resize_crop(tiles: torch.Tensor, resize_px: int, crop_px: int, interpolation: str) -> torch.Tensor:
    """uint8 (batch, H, W, 3) -> float64 (batch, 3, crop_px, crop_px) holding PIL's uint8 values."""
    if interpolation not in FILTER_SUPPORT:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    height, width = tiles.shape[1], tiles.shape[2]
    x = tiles.permute(0, 3, 1, 2).to(torch.float64)  # (batch, 3, H, W)
    h = torch.full((), height, dtype=torch.float64)
    w = torch.full((), width, dtype=torch.float64)
    short = torch.minimum(h, w)
    short_int = min(height, width) if isinstance(height, int) and isinstance(width, int) else height
    if not _is_identity(width, resize_px, crop_px, short_int):  # horizontal pass first, as PIL does
        out_w = _resized_length(w, short, resize_px)
        cols = coefficients(width, out_w, _crop_start(out_w, crop_px), crop_px, interpolation)  # (crop, W)
        x = round_to_uint8(x @ cols.T)  # (batch, 3, H, crop)
    if not _is_identity(height, resize_px, crop_px, short_int):
        out_h = _resized_length(h, short, resize_px)
        rows = coefficients(height, out_h, _crop_start(out_h, crop_px), crop_px, interpolation)  # (crop, H)
        x = round_to_uint8(rows @ x)  # (batch, 3, crop, crop)
    return x
