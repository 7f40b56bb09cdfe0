"""`TorchmilFolderDataset`: bags stored one file per bag in torchmil's processed-folder layout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tensordict import TensorDict
from torch.utils.data import Dataset

from mil_train.data.bag import make_bag
from mil_train.data.dataset import GraphSpec, graph_spec, with_graph
from mil_train.data.readers import ARRAY_SUFFIXES, load_array


class TorchmilFolderDataset(Dataset):
    """Bags read from disk on access, laid out as

        root/features/<bag>.npy|.h5     (N, D) instance features
        root/labels/<bag>.npy|.h5       bag label; a size-1 array becomes a scalar
        root/inst_labels/<bag>.npy|.h5  optional (N,) instance labels
        root/coords/<bag>.npy|.h5       optional (N, 2) tile positions

    An .h5 file holds a dataset named like its folder ("features", "labels", ...) or exactly one
    dataset. Coords are (y, x) grid units unless told otherwise by `coords_order` ("xy" swaps the
    columns) and `patch_size` (pixel coords are divided by it, as torchmil's WSI dataset does).

    Args:
        root: the folder holding features/ and labels/.
        bag_names: the bags to use, in order; default every file in features/, sorted by name.
        graph_rule: None, a rule name or a model's `graph_rule` dict: build edge_index / edge_weight
            from coords for each bag read.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        bag_names: list[str] | None = None,
        graph_rule: GraphSpec = None,
        *,
        patch_size: int | None = None,
        coords_order: str = "yx",
    ) -> None:
        self.root = Path(root)
        for folder in ("features", "labels"):
            if not (self.root / folder).is_dir():
                raise FileNotFoundError(f"{self.root / folder} is missing; a torchmil folder has features/ and labels/")
        if coords_order not in ("yx", "xy"):
            raise ValueError(f"coords_order must be 'yx' or 'xy', got {coords_order!r}")
        graph_spec(graph_rule)
        self.graph_rule = graph_rule
        self.patch_size = patch_size
        self.coords_order = coords_order
        self.bag_names = list(bag_names) if bag_names is not None else self._names_on_disk()
        for name in self.bag_names:  # fail at construction, not in the middle of an epoch
            self._file("features", name, required=True)
            self._file("labels", name, required=True)

    def _names_on_disk(self) -> list[str]:
        files = [p for p in (self.root / "features").iterdir() if p.suffix in ARRAY_SUFFIXES]
        return sorted({p.stem for p in files})

    def _file(self, folder: str, name: str, required: bool = False) -> Path | None:
        for suffix in ARRAY_SUFFIXES:
            path = self.root / folder / f"{name}{suffix}"
            if path.is_file():
                return path
        if required:
            raise FileNotFoundError(f"bag {name!r}: no {folder}/{name}.npy or .h5 under {self.root}")
        return None

    def _read(self, folder: str, name: str) -> np.ndarray | None:
        path = self._file(folder, name)
        return None if path is None else load_array(path, key=folder)

    def _grid_coords(self, coords: np.ndarray | None) -> np.ndarray | None:
        if coords is None:
            return None
        coords = coords[:, ::-1] if self.coords_order == "xy" else coords
        if self.patch_size:
            coords = np.floor_divide(coords, self.patch_size)
        return np.ascontiguousarray(coords)

    def __len__(self) -> int:
        return len(self.bag_names)

    def __getitem__(self, index: int) -> TensorDict:
        name = self.bag_names[index]
        label = self._read("labels", name)
        label = label.reshape(()) if label.size == 1 else label
        y_inst = self._read("inst_labels", name)
        bag = make_bag(
            self._read("features", name).astype(np.float32, copy=False),
            label,
            y_inst=None if y_inst is None else y_inst.reshape(-1),
            coords=self._grid_coords(self._read("coords", name)),
        )
        return with_graph(bag, self.graph_rule)
