"""make_bag: shapes, dtypes, defaults and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mil_train.data import make_bag


def test_defaults_and_dtypes():
    bag = make_bag(np.ones((5, 3), dtype=np.float64), 1)
    assert bag.batch_size == torch.Size([])
    assert bag["X"].dtype == torch.float32 and bag["X"].shape == (5, 3)
    assert bag["Y"].shape == ()
    assert bag["y_inst"].dtype == torch.int64 and bag["y_inst"].tolist() == [-1] * 5
    assert "coords" not in bag.keys() and "edge_index" not in bag.keys()


def test_optional_entries():
    bag = make_bag(
        torch.zeros(3, 2),
        torch.tensor([0.0, 1.0, 0.0]),
        y_inst=[0, 1, 0],
        coords=np.array([[0, 0], [0, 1], [4, 4]], dtype=np.int32),
        edge_index=[[0, 1], [1, 0]],
    )
    assert bag["Y"].shape == (3,)
    assert bag["coords"].dtype == torch.int64
    assert bag["edge_index"].tolist() == [[0, 1], [1, 0]]
    assert bag["edge_weight"].tolist() == [1.0, 1.0]  # ones when no weights are given


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"X": np.zeros(4)}, "X must be"),
        ({"X": np.zeros((0, 3))}, "no instances"),
        ({"X": np.zeros((4, 3), dtype=np.int64)}, "floating point"),
        ({"Y": np.zeros((2, 2))}, "Y must be"),
        ({"y_inst": [0, 1]}, r"y_inst must have shape \(4,\)"),
        ({"coords": np.zeros((4, 3))}, r"coords must have shape \(4, 2\)"),
        ({"coords": np.full((4, 2), 0.5)}, "whole grid units"),
        ({"edge_index": [[0, 4], [4, 0]]}, "outside 0..3"),
        ({"edge_index": [0, 1]}, r"edge_index must have shape \(2, E\)"),
        ({"edge_index": [[0, 1], [1, 0]], "edge_weight": [1.0]}, r"edge_weight must have shape \(2,\)"),
        ({"edge_weight": [1.0]}, "without edge_index"),
    ],
)
def test_refusals(kwargs, message):
    args = {"X": np.zeros((4, 3), dtype=np.float32), "Y": 0.0, **kwargs}
    X, Y = args.pop("X"), args.pop("Y")
    with pytest.raises(ValueError, match=message):
        make_bag(X, Y, **args)
