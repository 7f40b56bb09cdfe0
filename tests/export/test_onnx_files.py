"""save_graph writes a graph one initializer at a time: the file must parse as the very model it came from."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from mil_export.onnx_files import save_graph, tensor_bytes
from mil_runtime.session import file_identity, sha256_file

DIM = 300


def _hand_model() -> onnx.ModelProto:
    """features = mean colour (batch, 3) @ weights (3, DIM) + bias: one large, one mid and one tiny tensor."""
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Cast", ["tiles"], ["pixels"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["pixels", "axes"], ["colour"], keepdims=0),  # (batch, 3)
             helper.make_node("MatMul", ["colour", "weights"], ["product"]),  # (batch, DIM)
             helper.make_node("Add", ["product", "bias"], ["features"])]  # (batch, DIM)
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("tiles", TensorProto.UINT8, ["batch", "h", "w", 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", DIM])],
        initializer=[numpy_helper.from_array(rng.standard_normal((3, DIM)).astype(np.float32), "weights"),
                     numpy_helper.from_array(rng.standard_normal(DIM).astype(np.float16).astype(np.float32),
                                             "bias"),
                     numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.metadata_props.add(key="k", value="v")
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def test_a_single_file_parses_as_the_model_written(tmp_path):
    model = _hand_model()
    expected = _copy(model)
    save_graph(model, tmp_path / "g.onnx", external=False)
    assert onnx.load(str(tmp_path / "g.onnx")) == expected  # field by field, initializers in their order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx"]


def test_an_onnx_ir_model_with_external_data_round_trips_with_its_edits(tmp_path):
    model = _hand_model()
    expected = _copy(model)
    graph = ir.from_proto(_copy(model))
    assert tensor_bytes(graph) == tensor_bytes(model) == 4 * (3 * DIM + DIM) + 8 * 2

    def edit(head: onnx.ModelProto) -> None:
        head.metadata_props.add(key="added", value="later")

    assert save_graph(graph, tmp_path / "g.onnx", external=True, edit=edit) == ["g.onnx.data"]
    path = tmp_path / "g.onnx"
    light = onnx.load(str(path), load_external_data=False)
    locations = {t.name: {e.key: e.value for e in t.external_data}.get("location") for t in light.graph.initializer}
    assert locations == {"weights": "g.onnx.data", "bias": "g.onnx.data", "axes": None}  # 16 bytes stay inline
    assert {p.key: p.value for p in light.metadata_props} == {"k": "v", "added": "later"}
    loaded = onnx.load(str(path))
    for want, got in zip(expected.graph.initializer, loaded.graph.initializer, strict=True):
        assert want.name == got.name
        np.testing.assert_array_equal(numpy_helper.to_array(got), numpy_helper.to_array(want))
    assert file_identity(path, ["g.onnx.data"]) != sha256_file(path)


def test_placeholders_are_written_from_the_lifted_tensors(tmp_path):
    model = _hand_model()
    expected = _copy(model)
    weights = model.graph.initializer[0]
    lifted = {"weights": ir.from_proto(TensorProto.FromString(weights.SerializeToString()))}
    weights.ClearField("raw_data")  # the placeholder vit_fusion.light_proto leaves: name, type and shape only
    assert tensor_bytes(model, lifted) == tensor_bytes(expected)
    save_graph(model, tmp_path / "g.onnx", external=False, lifted=lifted)
    assert onnx.load(str(tmp_path / "g.onnx")) == expected
