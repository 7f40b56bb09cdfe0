"""Feature files in the CLAM / TRIDENT layout (.h5).

Datasets:
  features  (N, D) float32        one row per tile (a leading batch axis of 1, (1, N, D), is accepted)
  coords    (N, 2) int64          level-0 pixel (x, y) of each tile's top-left corner, as CLAM stores them
Attributes of `coords`:
  patch_size          tile side in pixels at the level it was read from
  patch_level         pyramid level the tiles were read from
  patch_size_level0   tile side in level-0 pixels
  stride_level0       distance between tile corners in level-0 pixels (milkit; = patch_size_level0
                      without overlap, which is all CLAM/TRIDENT files have)
  mpp                 level-0 microns per pixel
Attributes of the file root (optional, written by milkit):
  encoder, encoder_sha256   the encoder that produced the features

The model's grid coordinates are `coords_px // stride_level0`, reordered to row-major (y, x)
(DESIGN.md section 2).

Refused with InvalidInputError (exit 6): a non-numeric, non-finite or negative mpp (0 reads as
unknown), tile sizes / strides / levels that are not whole numbers > 0 (level >= 0), complex features,
and values that overflow float32.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mil_runtime.atomic import atomic_path
from mil_runtime.errors import InputNotFoundError, InvalidInputError


@dataclass
class FeatureFile:
    """The contents of one feature file. `coords_px` is None when the file stores no coords."""

    features: np.ndarray  # (N, D) float32
    coords_px: np.ndarray | None  # (N, 2) int64, level-0 (x, y) top-left corners
    tile_px_level0: int | None  # tile side in level-0 pixels
    mpp: float | None  # level-0 microns per pixel
    encoder: str | None = None
    encoder_sha256: str | None = None
    path: Path | None = None
    encoder_weights_sha256: str | None = None  # the weights the encoder was exported from
    stride_level0: int | None = None  # grid stride in level-0 pixels; None: the tile side

    @property
    def n_instances(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def grid_coords(self) -> np.ndarray:
        """(N, 2) int64 grid units, row-major (y, x): level-0 pixels // tile stride."""
        if self.coords_px is None:
            raise InvalidInputError(f"{self.path}: no `coords` dataset; the model needs tile positions")
        stride = self.stride_level0 or self.tile_px_level0
        if not stride:
            raise InvalidInputError(
                f"{self.path}: the tile size in level-0 pixels is unknown (no patch_size_level0 attribute "
                "on `coords`); re-extract the features or add the attribute"
            )
        return (self.coords_px[:, ::-1] // stride).astype(np.int64)  # (N, 2) (y, x)


def _plain(value: Any) -> Any:
    """h5py attributes come back as numpy scalars or bytes; turn them into plain Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _whole_number(attrs: dict[str, Any], key: str, path: Path, minimum: int = 1) -> int | None:
    """Attribute `key` of `coords` as an int >= minimum; None when absent; refused when it is text,
    fractional, non-finite or too small."""
    value = attrs.get(key)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number != int(number) or number < minimum:
        raise InvalidInputError(
            f"{path}: the `coords` attribute {key} is {value!r}, expected a whole number >= {minimum}; "
            "fix or drop the attribute, or re-extract the features"
        )
    return int(number)


def _mpp(value: Any, path: Path) -> float | None:
    """A recorded mpp as a positive float; None when absent or 0 (unknown); refused when it is text,
    negative or non-finite."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise InvalidInputError(
            f"{path}: the mpp attribute is {value!r}, expected a positive number of microns per pixel; "
            "fix or drop the attribute"
        )
    return number or None


def _as_float32(features: np.ndarray, path: Path) -> np.ndarray:
    """(N, D) float32; values too large for float32 are refused instead of becoming Inf.

    One reduction over the cast array; the overflowing rows are located only when it trips (NaN/Inf
    already in the file are left to the model's check, which names their rows).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.ascontiguousarray(features, dtype=np.float32)  # (N, D)
        total = cast.sum(dtype=np.float64) if features.dtype.itemsize > 4 else 0.0  # Inf - Inf: NaN
    if not np.isfinite(total):
        overflow = (np.isfinite(features) & ~np.isfinite(cast)).any(axis=1)  # (N,)
        if overflow.any():
            rows = np.flatnonzero(overflow)
            raise InvalidInputError(
                f"{path}: `features` hold values beyond float32's range (+-3.4e38) in {rows.size} row(s), "
                f"first row {int(rows[0])}; re-encode the slide or rescale the features"
            )
    return cast


def _read_features(h5: h5py.File, path: Path) -> np.ndarray:
    if "features" not in h5 or not isinstance(h5["features"], h5py.Dataset):
        raise InvalidInputError(
            f"{path}: no `features` dataset (found: {', '.join(sorted(h5.keys())) or 'nothing'}); "
            "expected a CLAM/TRIDENT feature file"
        )
    features = h5["features"][()]
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]  # (N, D): some extractors keep a batch axis of one
    if features.ndim != 2:
        raise InvalidInputError(f"{path}: `features` has shape {features.shape}, expected (N, D)")
    if not np.issubdtype(features.dtype, np.number) or np.issubdtype(features.dtype, np.complexfloating):
        raise InvalidInputError(f"{path}: `features` has dtype {features.dtype}, expected real floats")
    return _as_float32(features, path)  # (N, D)


def _read_coords(h5: h5py.File, path: Path, n: int) -> tuple[np.ndarray | None, dict[str, Any]]:
    if "coords" not in h5:
        return None, {}
    dataset = h5["coords"]
    coords = dataset[()]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != n:
        raise InvalidInputError(
            f"{path}: `coords` has shape {coords.shape}, expected ({n}, 2) to match `features`"
        )
    if not np.issubdtype(coords.dtype, np.integer):
        if not np.all(np.isfinite(coords)) or not np.all(coords == np.round(coords)):
            raise InvalidInputError(f"{path}: `coords` must be integer pixel positions")
    attrs = {key: _plain(value) for key, value in dataset.attrs.items()}
    return coords.astype(np.int64), attrs  # (N, 2) (x, y)


def _stride_from_coords(coords_px: np.ndarray) -> int | None:
    """Smallest positive gap between distinct x or y positions: the tile stride of a regular grid."""
    gaps = []
    for axis in (0, 1):
        values = np.unique(coords_px[:, axis])
        if values.size > 1:
            gaps.append(int(np.diff(values).min()))
    return min(gaps) if gaps else None


def _tile_px_level0(attrs: dict[str, Any], coords_px: np.ndarray | None, path: Path) -> int | None:
    size_level0 = _whole_number(attrs, "patch_size_level0", path)
    patch_size = _whole_number(attrs, "patch_size", path)
    level = _whole_number(attrs, "patch_level", path, minimum=0)
    if size_level0:
        return size_level0
    if patch_size and not level:
        return patch_size
    if coords_px is not None:  # read at a coarser level without the level-0 size: infer from the grid
        return _stride_from_coords(coords_px)
    return None


def read_feature_file(path: str | os.PathLike) -> FeatureFile:
    """Read a CLAM/TRIDENT .h5 feature file.

    Raises InputNotFoundError when `path` does not exist and InvalidInputError when it is not HDF5,
    has no `features` (N, D) dataset, or `coords` do not match the features.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: input not found" + ("" if not path.exists() else " (not a file)"))
    if not h5py.is_hdf5(path):
        raise InvalidInputError(f"{path}: not an HDF5 file; pass a CLAM/TRIDENT .h5 feature file")
    try:
        with h5py.File(path, "r") as h5:
            features = _read_features(h5, path)
            coords_px, coord_attrs = _read_coords(h5, path, features.shape[0])
            root = {key: _plain(value) for key, value in h5.attrs.items()}
    except OSError as exc:  # corrupt or truncated HDF5
        raise InvalidInputError(f"{path}: cannot read the HDF5 file ({str(exc)[:200]})") from None
    mpp = coord_attrs.get("mpp", root.get("mpp"))
    return FeatureFile(
        features=features,
        coords_px=coords_px,
        tile_px_level0=_tile_px_level0(coord_attrs, coords_px, path),
        stride_level0=_whole_number(coord_attrs, "stride_level0", path),
        mpp=_mpp(mpp, path),
        encoder=root.get("encoder") or None,
        encoder_sha256=root.get("encoder_sha256") or None,
        path=path,
        encoder_weights_sha256=root.get("encoder_weights_sha256") or None,
    )


def write_feature_file(
    path: str | os.PathLike,
    features: np.ndarray,
    coords_px: np.ndarray,
    tile_px_level0: int,
    *,
    mpp: float | None = None,
    patch_size: int | None = None,
    patch_level: int = 0,
    encoder: str | None = None,
    encoder_sha256: str | None = None,
    stride_level0: int | None = None,
    encoder_weights_sha256: str | None = None,
) -> Path:
    """Write features (N, D) and level-0 (x, y) coords (N, 2) in the CLAM/TRIDENT layout, atomically.

    `patch_size` is the tile side at `patch_level` (defaults to `tile_px_level0`, i.e. read at level 0);
    `stride_level0` the distance between tiles (defaults to `tile_px_level0`: no overlap).
    """
    path = Path(path)
    features = np.asarray(features, dtype=np.float32)  # (N, D)
    coords_px = np.asarray(coords_px, dtype=np.int64)  # (N, 2)
    if features.ndim != 2 or coords_px.shape != (features.shape[0], 2):
        raise ValueError(f"features {features.shape} and coords {coords_px.shape} must be (N, D) and (N, 2)")
    with atomic_path(path) as temp:
        with h5py.File(temp, "w") as h5:
            h5.create_dataset("features", data=features)
            coords = h5.create_dataset("coords", data=coords_px)
            coords.attrs["patch_size"] = int(patch_size or tile_px_level0)
            coords.attrs["patch_level"] = int(patch_level)
            coords.attrs["patch_size_level0"] = int(tile_px_level0)
            coords.attrs["stride_level0"] = int(stride_level0 or tile_px_level0)
            if mpp is not None:
                coords.attrs["mpp"] = float(mpp)
            if encoder:
                h5.attrs["encoder"] = encoder
            if encoder_sha256:
                h5.attrs["encoder_sha256"] = encoder_sha256
            if encoder_weights_sha256:
                h5.attrs["encoder_weights_sha256"] = encoder_weights_sha256
    return path
