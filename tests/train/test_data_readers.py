"""Readers: torchmil folders (.npy and .h5), CLAM/TRIDENT .h5 coords -> grid, the MUSK1 CSV."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mil_runtime.features_io import read_feature_file, write_feature_file
from mil_train.data import TorchmilFolderDataset, build_graph, level0_stride, read_clam_h5, read_mil_csv

_spec = importlib.util.spec_from_file_location("_milkit_root_conftest", Path(__file__).parents[1] / "conftest.py")
_root_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_root_conftest)
shared_file = _root_conftest.shared_file  # skips when ../shared/data lacks the file; import-mode proof

BAGS = {  # name: (n instances, bag label)
    "slide_b": (4, 1),
    "slide_a": (3, 0),
}


def write_array(path, array, key):
    if path.suffix == ".npy":
        np.save(path, array)
    else:
        with h5py.File(path, "w") as h5:
            h5.create_dataset(key, data=array)


def make_folder(root, suffix, with_coords=True):
    rng = np.random.default_rng(0)
    truth = {}
    for folder in ("features", "labels", "inst_labels", "coords"):
        (root / folder).mkdir(parents=True)
    for name, (n, label) in BAGS.items():
        X = rng.standard_normal((n, 5)).astype(np.float32)
        y_inst = np.arange(n) % 2 * label
        coords = np.stack([np.arange(n), np.arange(n) * 2], axis=1)  # (y, x)
        write_array(root / "features" / f"{name}{suffix}", X, "features")
        write_array(root / "labels" / f"{name}{suffix}", np.array([label]), "labels")
        write_array(root / "inst_labels" / f"{name}{suffix}", y_inst, "inst_labels")
        if with_coords:
            write_array(root / "coords" / f"{name}{suffix}", coords, "coords")
        truth[name] = (X, label, y_inst, coords)
    return truth


@pytest.mark.parametrize("suffix", [".npy", ".h5"])
def test_torchmil_folder(tmp_path, suffix):
    truth = make_folder(tmp_path, suffix)
    dataset = TorchmilFolderDataset(tmp_path, graph_rule="grid8")
    assert dataset.bag_names == ["slide_a", "slide_b"]  # sorted
    for index, name in enumerate(dataset.bag_names):
        X, label, y_inst, coords = truth[name]
        bag = dataset[index]
        np.testing.assert_array_equal(bag["X"].numpy(), X)
        assert bag["Y"].shape == () and bag["Y"].item() == label
        np.testing.assert_array_equal(bag["y_inst"].numpy(), y_inst)
        np.testing.assert_array_equal(bag["coords"].numpy(), coords)
        edge_index, _ = build_graph(torch.from_numpy(coords))
        assert torch.equal(bag["edge_index"], edge_index)


def test_torchmil_folder_options_and_refusals(tmp_path):
    truth = make_folder(tmp_path, ".npy")
    dataset = TorchmilFolderDataset(tmp_path, bag_names=["slide_b"], coords_order="xy", patch_size=2)
    bag = dataset[0]
    assert len(dataset) == 1 and "edge_index" not in bag.keys()
    np.testing.assert_array_equal(bag["coords"].numpy(), truth["slide_b"][3][:, ::-1] // 2)
    with pytest.raises(FileNotFoundError, match="slide_c"):
        TorchmilFolderDataset(tmp_path, bag_names=["slide_c"])
    np.save(tmp_path / "features" / "slide_a.npy", np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="unpickling"):
        TorchmilFolderDataset(tmp_path)[0]
    with pytest.raises(FileNotFoundError, match="labels"):
        TorchmilFolderDataset(tmp_path / "features")


def write_clam(path, coords_xy, **attrs):
    with h5py.File(path, "w") as h5:
        h5.create_dataset("features", data=np.arange(len(coords_xy) * 3, dtype=np.float32).reshape(-1, 3))
        dataset = h5.create_dataset("coords", data=np.asarray(coords_xy, dtype=np.int64))
        for key, value in attrs.items():
            dataset.attrs[key] = value


# level-0 (x, y) of three tiles with a 512 px stride, the grid starting at an arbitrary origin
CLAM_XY = [[1024 + 100, 512 + 7], [1536 + 100, 512 + 7], [1024 + 100, 1536 + 7]]
CLAM_GRID_YX = [[1, 2], [1, 3], [3, 2]]  # (y, x) = (px_y // 512, px_x // 512)


@pytest.mark.parametrize(
    "attrs",
    [
        {"patch_size": 256, "patch_level": 1, "downsample": np.array([2.0, 2.0])},  # CLAM at level 1
        {"patch_size_level0": 512, "patch_size": 224, "patch_level": 0},  # milkit / TRIDENT: level0 wins
        {"patch_size": 512, "patch_level": 0},  # level-0 read, no downsample stored
        {},  # nothing stored: inferred from the smallest coordinate gap
    ],
)
def test_clam_coords_to_grid(tmp_path, attrs):
    path = tmp_path / "slide.h5"
    write_clam(path, CLAM_XY, **attrs)
    bag = read_clam_h5(path, label=1.0)
    assert bag["X"].shape == (3, 3) and bag["Y"].item() == 1.0
    assert bag["coords"].tolist() == CLAM_GRID_YX
    assert torch.isnan(read_clam_h5(path)["Y"])  # no label: unknown


def test_clam_matches_runtime_feature_files(tmp_path):
    """A file the runtime writes reads back to the grid the runtime itself computes."""
    rng = np.random.default_rng(4)
    coords_px = rng.choice(40, size=(30, 2), replace=True) * 448 + 3
    coords_px = np.unique(coords_px, axis=0)
    path = write_feature_file(tmp_path / "f.h5", rng.random((len(coords_px), 8)), coords_px, 448, mpp=0.5)
    bag = read_clam_h5(path)
    np.testing.assert_array_equal(bag["coords"].numpy(), read_feature_file(path).grid_coords())
    np.testing.assert_allclose(bag["X"].numpy(), read_feature_file(path).features)


def test_overlapping_tiles_use_the_coordinate_gap():
    coords_px = np.array([[0, 0], [256, 0], [512, 0]])  # 512 px tiles read every 256 px
    assert level0_stride(coords_px, {"patch_size_level0": 512}) == 256
    assert level0_stride(np.array([[10, 20]]), {}) == 1  # a single tile: nothing to infer from


def test_musk1_counts():
    bags = read_mil_csv(shared_file("mil/musk1.csv"))
    assert len(bags) == 92
    assert sum(bag["X"].shape[0] for bag in bags) == 476
    assert {bag["X"].shape[1] for bag in bags} == {166}
    assert sum(int(bag["Y"]) for bag in bags) == 47
    for bag in bags:  # MUSK instance labels equal their bag's label
        assert bag["Y"].dtype == torch.float32
        assert set(bag["y_inst"].tolist()) == {int(bag["Y"])}


def test_mil_csv_order_and_minus_one_labels(tmp_path):
    path = tmp_path / "toy.csv"
    path.write_text("-1,7,0.1,0.2\n1,3,1.0,2.0\n-1,7,0.3,0.4\n-1,3,3.0,4.0\n")
    first, second = read_mil_csv(path)  # bag 7 appears first
    np.testing.assert_allclose(first["X"].numpy(), [[0.1, 0.2], [0.3, 0.4]], rtol=1e-6)
    assert first["Y"].item() == 0.0 and first["y_inst"].tolist() == [0, 0]
    assert second["Y"].item() == 1.0 and second["y_inst"].tolist() == [1, 0]


def test_clam_reader_uses_the_runtime_stride_of_overlapping_tiles(tmp_path):
    coords_px = np.array([[0, 0], [128, 0], [256, 384], [640, 128]])  # 256 px tiles every 128 px
    path = write_feature_file(tmp_path / "o.h5", np.ones((4, 3)), coords_px, 256, stride_level0=128)
    np.testing.assert_array_equal(read_clam_h5(path)["coords"].numpy(), [[0, 0], [0, 1], [3, 2], [1, 5]])
    np.testing.assert_array_equal(read_clam_h5(path)["coords"].numpy(), read_feature_file(path).grid_coords())
