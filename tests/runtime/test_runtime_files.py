"""Atomic writing and CLAM/TRIDENT feature files, against hand-built files and hand-computed grids."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mil_runtime.atomic import atomic_output_dir, atomic_path, atomic_write, ensure_writable_dir
from mil_runtime.errors import InputNotFoundError, InvalidInputError, OutputError
from mil_runtime.features_io import read_feature_file, write_feature_file


class Boom(Exception):
    pass


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(Boom):
        with atomic_write(target) as handle:
            handle.write("half")
            raise Boom
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # temporary removed
    with atomic_write(target, "wb") as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_atomic_path_and_output_dir_are_all_or_nothing(tmp_path):
    with pytest.raises(Boom):
        with atomic_path(tmp_path / "a.bin") as temp:
            temp.write_bytes(b"x")
            raise Boom
    out = tmp_path / "out"
    with pytest.raises(Boom):
        with atomic_output_dir(out) as staged:
            staged.path("a.json").write_text("{}")
            staged.path("b.png").write_bytes(b"png")
            raise Boom
    assert list(out.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_output_dir(out) as staged:
        staged.path("a.json").write_text("{}")
        staged.path("b.png").write_bytes(b"png")
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.png"]


def test_ensure_writable_dir(tmp_path):
    assert ensure_writable_dir(tmp_path / "new" / "deeper").is_dir()
    regular = tmp_path / "file"
    regular.write_text("")
    for bad in (regular, regular / "below"):
        with pytest.raises(OutputError, match=r"cannot write to .*; choose another --out"):
            ensure_writable_dir(bad)


def test_feature_file_round_trip_and_grid(tmp_path):
    features = np.arange(12, dtype=np.float32).reshape(3, 4)
    coords = np.array([[0, 0], [512, 0], [256, 768]])  # (x, y) level-0 px, stride 256
    path = write_feature_file(tmp_path / "f.h5", features, coords, 256, mpp=0.25, encoder="enc", encoder_sha256="00",
                              encoder_weights_sha256="11")
    read = read_feature_file(path)
    np.testing.assert_array_equal(read.features, features)
    np.testing.assert_array_equal(read.coords_px, coords)
    assert (read.tile_px_level0, read.mpp, read.encoder, read.encoder_sha256) == (256, 0.25, "enc", "00")
    assert read.encoder_weights_sha256 == "11"
    np.testing.assert_array_equal(read.grid_coords(), [[0, 0], [0, 2], [3, 1]])  # (y, x)
    with h5py.File(path) as h5:  # the CLAM/TRIDENT attribute names
        assert dict(h5["coords"].attrs) == {"patch_size": 256, "patch_level": 0, "patch_size_level0": 256,
                                           "stride_level0": 256, "mpp": 0.25}


def test_overlapping_tiles_use_the_stride_not_the_tile_side(tmp_path):
    """256 px tiles every 128 px (50% overlap): grid units are level-0 px // 128."""
    coords = np.array([[0, 0], [128, 0], [256, 384]])  # (x, y)
    path = write_feature_file(tmp_path / "o.h5", np.zeros((3, 2)), coords, 256, stride_level0=128)
    read = read_feature_file(path)
    assert (read.tile_px_level0, read.stride_level0) == (256, 128)
    np.testing.assert_array_equal(read.grid_coords(), [[0, 0], [0, 1], [3, 2]])  # (y, x)


def test_clam_file_without_level0_size(tmp_path):
    """CLAM at level 1 stores patch_size at that level only: the stride is inferred from the coords."""
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as h5:
        h5["features"] = np.ones((1, 3, 8), dtype=np.float16)  # with a batch axis, half precision
        coords = h5.create_dataset("coords", data=np.array([[1024, 0], [0, 512], [512, 512]], dtype=np.int32))
        coords.attrs["patch_size"] = 256
        coords.attrs["patch_level"] = 1
    read = read_feature_file(path)
    assert read.features.shape == (3, 8) and read.features.dtype == np.float32
    assert read.tile_px_level0 == 512 and read.mpp is None and read.encoder is None
    np.testing.assert_array_equal(read.grid_coords(), [[0, 2], [1, 0], [1, 1]])


@pytest.mark.faults
def test_feature_file_refusals(tmp_path):
    with pytest.raises(InputNotFoundError):
        read_feature_file(tmp_path / "absent.h5")
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(InvalidInputError, match="not an HDF5"):
        read_feature_file(text)
    cases = {
        "nofeatures.h5": ({"coords": np.zeros((2, 2))}, "no `features` dataset"),
        "flat.h5": ({"features": np.zeros(5)}, r"expected \(N, D\)"),
        "mismatch.h5": ({"features": np.zeros((3, 4)), "coords": np.zeros((2, 2), dtype=int)}, r"expected \(3, 2\)"),
    }
    for name, (datasets, words) in cases.items():
        with h5py.File(tmp_path / name, "w") as h5:
            for key, value in datasets.items():
                h5[key] = value
        with pytest.raises(InvalidInputError, match=words):
            read_feature_file(tmp_path / name)


def test_feature_file_from_other_encoder_weights_is_refused(tmp_path):
    """A model that records its encoder's weights refuses features made by the same encoder name from other weights."""
    from types import SimpleNamespace

    from mil_runtime.cli import check_recorded_encoder
    from mil_runtime.contract import EncoderRef
    from mil_runtime.errors import ContractMismatchError

    features, coords = np.zeros((2, 4), dtype=np.float32), np.array([[0, 0], [256, 0]])
    runner = SimpleNamespace(metadata=SimpleNamespace(encoder=EncoderRef("uni_v1", 4, None, weights_sha256="aa" * 32)))
    same = read_feature_file(write_feature_file(tmp_path / "same.h5", features, coords, 256, encoder="uni_v1",
                                                encoder_weights_sha256="aa" * 32))
    check_recorded_encoder(same, runner)
    other = read_feature_file(write_feature_file(tmp_path / "other.h5", features, coords, 256, encoder="uni_v1",
                                                 encoder_weights_sha256="bb" * 32))
    with pytest.raises(ContractMismatchError, match="other weights"):
        check_recorded_encoder(other, runner)
    unrecorded = read_feature_file(write_feature_file(tmp_path / "plain.h5", features, coords, 256, encoder="uni_v1"))
    check_recorded_encoder(unrecorded, runner)  # TRIDENT files record no weights: checked by name and dim only
