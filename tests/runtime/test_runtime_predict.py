"""MILRunner against eager PyTorch, and the refusals it makes before onnxruntime runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mil_runtime import errors
from mil_runtime.model import load_model

from runtime_fixtures import FEATURE_DIM

TOL = 1e-5


def eager(model, features: np.ndarray):
    """(logits (C,), probabilities (C,), attention (N,)) of the eager model on one bag."""
    with torch.no_grad():
        out = model(torch.from_numpy(features)[None])
        return (
            out.logits[0].numpy(),
            model.probabilities(out.logits)[0].numpy(),
            out.attention[0].numpy(),
        )


@pytest.mark.parametrize("which", ["binary_model", "multiclass_model"])
@pytest.mark.parametrize("n", [1, 7, 97])
def test_predict_matches_eager(request, which, n):
    model, path = request.getfixturevalue(which)
    runner = load_model(path, device="cpu")
    features = np.random.default_rng(n).standard_normal((n, FEATURE_DIM)).astype(np.float32)
    logits, probabilities, attention = eager(model, features)
    prediction = runner.predict(features)
    np.testing.assert_allclose(prediction.logits, logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(prediction.probabilities, probabilities, atol=TOL, rtol=0)
    np.testing.assert_allclose(prediction.attention, attention, atol=TOL, rtol=0)
    assert prediction.attention.shape == (n,)
    assert prediction.attention.sum() == pytest.approx(1.0, abs=1e-5)


def test_binary_reports_both_classes(binary_model):
    model, path = binary_model
    runner = load_model(path)
    features = np.random.default_rng(3).standard_normal((11, FEATURE_DIM)).astype(np.float32)
    p = float(eager(model, features)[1][0])
    prediction = runner.predict(features)
    assert runner.class_names == ["negative", "positive"]
    np.testing.assert_allclose(prediction.class_probabilities, [1 - p, p], atol=TOL)
    assert prediction.predicted_name == ("positive" if p >= 0.5 else "negative")
    assert prediction.probability == pytest.approx(max(p, 1 - p), abs=TOL)


def test_multiclass_names_and_argmax(multiclass_model):
    model, path = multiclass_model
    runner = load_model(path)
    features = np.random.default_rng(4).standard_normal((13, FEATURE_DIM)).astype(np.float32)
    probabilities = eager(model, features)[1]
    prediction = runner.predict(features)
    assert prediction.class_names == ["normal", "tumor", "other"]
    assert prediction.predicted_index == int(np.argmax(probabilities))
    assert prediction.probabilities_by_name()["tumor"] == pytest.approx(float(probabilities[1]), abs=TOL)


def test_predict_batch_pads_and_matches_each_bag(multiclass_model):
    model, path = multiclass_model
    runner = load_model(path)
    rng = np.random.default_rng(5)
    bags = [rng.standard_normal((n, FEATURE_DIM)).astype(np.float32) for n in (4, 17, 1)]
    for bag, prediction in zip(bags, runner.predict_batch(bags)):
        logits, _, attention = eager(model, bag)
        np.testing.assert_allclose(prediction.logits, logits, atol=TOL, rtol=0)
        np.testing.assert_allclose(prediction.attention, attention, atol=TOL, rtol=0)
        assert prediction.attention.shape == (len(bag),)


def test_one_bag_goes_to_the_session_without_a_copy(binary_model, monkeypatch):
    """predict feeds a single float32 bag to onnxruntime as a view of the caller's array (no padded copy)."""
    runner = load_model(binary_model[1])
    features = np.random.default_rng(0).standard_normal((7, FEATURE_DIM)).astype(np.float32)
    seen = {}
    real_run = runner._run

    def spy(feeds):
        seen.update(feeds)
        return real_run(feeds)

    monkeypatch.setattr(runner, "_run", spy)
    alone = runner.predict(features)
    assert np.shares_memory(seen["features"], features) and seen["mask"].all()
    batched = runner.predict_batch([features, features[:3]])[0]  # a padded copy, the same answer
    np.testing.assert_allclose(alone.logits, batched.logits, rtol=0, atol=1e-5)


def test_huge_finite_features_that_overflow_the_check_sum_still_pass(binary_model):
    """The finiteness check is one float32 sum; rows of 3e38 overflow it, the row scan then finds no
    NaN or Inf, and the bag is predicted."""
    runner = load_model(binary_model[1])
    features = np.full((4, FEATURE_DIM), 3e38, dtype=np.float32)
    with np.errstate(over="ignore"):
        assert not np.isfinite(features.sum())
    runner.predict(features)  # no InvalidInputError


@pytest.mark.faults
def test_refusals_name_the_problem(binary_model):
    runner = load_model(binary_model[1])
    good = np.zeros((5, FEATURE_DIM), dtype=np.float32)
    with pytest.raises(errors.ContractMismatchError, match="8-d features but the model expects 16-d"):
        runner.predict(np.zeros((5, 8), dtype=np.float32))
    with pytest.raises(errors.InvalidInputError, match="empty"):
        runner.predict(np.zeros((0, FEATURE_DIM), dtype=np.float32))
    bad = good.copy()
    bad[[1, 3], 0] = np.nan
    bad[4, 2] = np.inf
    with pytest.raises(errors.InvalidInputError, match=r"NaN in 2 rows and Inf in 1 row of 5"):
        runner.predict(bad)
    with pytest.raises(errors.InvalidInputError, match=r"expected \(N, D\)"):
        runner.predict(good[None])


@pytest.mark.faults
def test_encoder_file_is_refused_as_model(tmp_path):
    """A milkit encoder passed as --model is named as such."""
    import onnx
    from onnx import TensorProto, helper

    from mil_runtime.contract import ModelMetadata

    graph = helper.make_graph(
        [helper.make_node("Identity", ["tiles"], ["features"])],
        "encoder",
        [helper.make_tensor_value_info("tiles", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    meta = ModelMetadata(kind="encoder", model_name="toy", feature_dim=4, inputs=["tiles"])
    for key, value in meta.to_props().items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(tmp_path / "enc.onnx"))
    with pytest.raises(errors.ModelFormatError, match="encoder"):
        load_model(tmp_path / "enc.onnx")


def test_graph_model_needs_coords(binary_model):
    """A model whose metadata asks for a graph refuses a bag without coords (checked before running)."""
    runner = load_model(binary_model[1])
    runner.metadata.graph = {"rule": "grid8", "params": {}}  # pretend: only the coords check runs
    with pytest.raises(errors.ContractMismatchError, match="coordinates"):
        runner.predict(np.zeros((3, FEATURE_DIM), dtype=np.float32))


def test_graph_feeds_offset_each_bag_into_the_flattened_node_space(binary_model):
    """Edges of bag b index nodes b * N_max + i (DESIGN.md section 2), built by the named rule."""
    from mil_runtime.graphs import build_graph

    runner = load_model(binary_model[1])
    runner.metadata.inputs = ["features", "mask", "edge_index", "edge_weight", "coords"]
    runner.metadata.graph = {"rule": "grid8", "params": {}}
    coords = [np.array([[0, 0], [0, 1], [1, 1]]), np.array([[5, 5], [5, 6]])]  # (y, x) grid units
    mask = np.array([[True, True, True], [True, True, False]])
    feeds = runner._feeds(np.zeros((2, 3, FEATURE_DIM), dtype=np.float32), mask, coords)
    first, first_w = build_graph(coords[0], "grid8")
    second, second_w = build_graph(coords[1], "grid8")
    np.testing.assert_array_equal(feeds["edge_index"], np.concatenate([first, second + 3], axis=1))
    np.testing.assert_allclose(feeds["edge_weight"], np.concatenate([first_w, second_w]))
    assert feeds["edge_index"].dtype == np.int64 and feeds["edge_weight"].dtype == np.float32
    np.testing.assert_array_equal(feeds["coords"][1], [[5, 5], [5, 6], [0, 0]])  # padded with zeros
    # the 3-node L-shape is fully connected under grid8: 3 undirected edges, both directions
    assert first.shape == (2, 6)
