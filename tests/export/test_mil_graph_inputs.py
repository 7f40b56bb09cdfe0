"""The exporter's graph and coords inputs: edge_index/edge_weight on a symbolic 'edges' axis, coords.

A small unregistered graph model stands in for the registered ones (it stays out of
the registry so that tests iterating over registered models never see it).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from mil_export import export_onnx, validate_onnx
from mil_runtime import contract
from mil_runtime.session import open_session
from mil_train.models import MILModel, MILOutput, masked_softmax

IN_DIM = 12


class ToyGraphMIL(MILModel):
    """Linear embedding + coords, one message-passing step over the edge list, attention pooling."""

    name = "ToyGraphMIL"
    uses_graph = True
    uses_coords = True

    def __init__(self, in_dim: int, n_classes: int = 1) -> None:
        super().__init__(n_classes=n_classes, in_dim=in_dim)
        self.embed = nn.Linear(in_dim, 8)
        self.position = nn.Linear(2, 8)
        self.score = nn.Linear(8, 1)
        self.head = nn.Linear(8, n_classes)

    @property
    def graph_rule(self):
        return {"rule": "grid8", "params": {"self_loops": True}}

    def forward(self, X, mask=None, *, edge_index=None, edge_weight=None, coords=None):
        batch, bag, _ = X.shape
        H = self.embed(X) + self.position(coords.float())  # (batch, bag, 8)
        nodes = H.reshape(batch * bag, -1)  # (batch * bag, 8)
        messages = nodes[edge_index[0]] * edge_weight[:, None]  # (edges, 8)
        targets = edge_index[1][:, None].expand(-1, nodes.shape[1])  # (edges, 8)
        H = torch.relu(torch.zeros_like(nodes).scatter_add(0, targets, messages)).reshape(batch, bag, -1)
        attention = masked_softmax(self.score(H).squeeze(-1), mask)  # (batch, bag)
        pooled = torch.bmm(attention.unsqueeze(1), H).squeeze(1)  # (batch, 8)
        return MILOutput(logits=self.head(pooled), attention=attention)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = ToyGraphMIL(IN_DIM, n_classes=2).eval()
    path = export_onnx(model, tmp_path_factory.mktemp("graph") / "toy.onnx")
    return model, path


def test_graph_and_coords_inputs_have_contract_axes(exported):
    _, path = exported
    graph = onnx.load(str(path)).graph
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert list(shapes) == [contract.FEATURES, contract.MASK, contract.EDGE_INDEX, contract.EDGE_WEIGHT, contract.COORDS]
    assert shapes[contract.EDGE_INDEX] == [2, "edges"]
    assert shapes[contract.EDGE_WEIGHT] == ["edges"]
    assert shapes[contract.COORDS] == ["batch", "bag", 2]
    session = open_session(path, device="cpu")
    assert session.metadata.inputs == list(shapes)
    assert session.metadata.graph == {"rule": "grid8", "params": {"self_loops": True}}
    assert [i.shape for i in session.inference.get_inputs()][2:4] == [[2, "edges"], ["edges"]]


def test_graph_model_matches_eager_alone_and_padded(exported):
    model, path = exported
    rows = validate_onnx(path, model=model, sizes=(1, 2, 7, 49, 1000))
    worst = {name: max(row.errors.get(name, 0.0) for row in rows) for name in rows[1].errors}
    assert max(worst.values()) <= 1e-5, worst


def test_edges_axis_really_varies(exported):
    """Different edge counts in one session: a frozen edges axis would make onnxruntime refuse."""
    _, path = exported
    session = open_session(path, device="cpu")
    for edges in (1, 5, 40):
        feeds = {
            "features": np.ones((1, 4, IN_DIM), np.float32),
            "mask": np.ones((1, 4), bool),
            "edge_index": np.zeros((2, edges), np.int64),
            "edge_weight": np.ones(edges, np.float32),
            "coords": np.zeros((1, 4, 2), np.int64),
        }
        assert session.run(feeds)["logits"].shape == (1, 2)
