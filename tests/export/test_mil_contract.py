"""The ONNX contract in depth for ABMIL's variants (every registered model gets the same checks at
its test widths in tests/models/test_registry_models.py, by being registered).

Each case is exported once per module; onnxruntime (CPU) is compared with eager PyTorch at bag sizes 1, 2, a
prime, a square, 1000 and 50,000, alone and padded inside a batch of three bags of different lengths.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch

from mil_export import export_onnx, validate_onnx
from mil_export.onnx_export import example_inputs, input_names
from mil_runtime import contract
from mil_runtime.contract import ModelMetadata
from mil_runtime.session import open_session
from mil_train.models import create_model

IN_DIM = 32
SIZES = (1, 2, 7, 49, 1000, 50_000)
TOLERANCE = 1e-5

# Binary + plain and multiclass + gated cover both axes of ABMIL's variants within the test budget;
# test_mil_abmil.py exports the other two combinations through the checkpoint path.
CASES = [
    pytest.param(("ABMIL", {"n_classes": 1, "gated": False}), id="ABMIL-binary-plain"),
    pytest.param(("ABMIL", {"n_classes": 3, "gated": True, "embed_dims": [24], "att_dim": 16}), id="ABMIL-3class-gated"),
]


@pytest.fixture(scope="module", params=CASES)
def exported(request, tmp_path_factory):
    """(eager model, path, session) for one case, exported once."""
    name, config = request.param
    torch.manual_seed(0)
    model = create_model(name, in_dim=IN_DIM, **config).eval()
    path = tmp_path_factory.mktemp("export") / f"{name}.onnx"
    provenance = {"dataset": "synthetic", "epochs": 0}
    export_onnx(model, path, tiling={"tile_px": 224, "mpp": 0.5}, provenance=provenance)
    return model, path, open_session(path, device="cpu")


def _feeds_and_eager(model, lengths, seed):
    """Contract inputs for a padded batch (padding filled with large noise) and eager outputs."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(len(lengths), max(lengths), IN_DIM, generator=generator)  # (batch, bag, D)
    inputs = example_inputs(model, lengths, features)
    noise = 5 * torch.randn(features.shape, generator=generator) + 3  # padding content must not matter
    mask = inputs[contract.MASK]
    inputs[contract.FEATURES] = torch.where(mask[..., None], features, noise)  # (batch, bag, D)
    with torch.inference_mode():
        optional = {k: v for k, v in inputs.items() if k in contract.MIL_OPTIONAL_INPUTS}
        out = model(inputs[contract.FEATURES], mask, **optional)
        eager = {"logits": out.logits, "probabilities": model.probabilities(out.logits), "attention": out.attention}
    feeds = {name: value.numpy() for name, value in inputs.items()}
    return feeds, {name: value.numpy() for name, value in eager.items()}


@pytest.fixture(scope="module")
def runs(exported):
    """Per size: onnxruntime and eager outputs for the bag alone and padded (it is bag 1 of 3)."""
    model, _, session = exported
    results = {}
    for n in SIZES:
        alone_feeds, alone_eager = _feeds_and_eager(model, (n,), seed=n)
        padded_lengths = (n + 4, n, n + 9)
        padded_feeds, padded_eager = _feeds_and_eager(model, padded_lengths, seed=n)
        padded_feeds[contract.FEATURES][1, :n] = alone_feeds[contract.FEATURES][0]  # the same bag, padded
        with torch.inference_mode():  # eager on exactly the padded feeds
            tensors = {name: torch.from_numpy(value) for name, value in padded_feeds.items()}
            optional = {k: v for k, v in tensors.items() if k in contract.MIL_OPTIONAL_INPUTS}
            out = model(tensors[contract.FEATURES], tensors[contract.MASK], **optional)
            padded_eager = {
                "logits": out.logits.numpy(),
                "probabilities": model.probabilities(out.logits).numpy(),
                "attention": out.attention.numpy(),
            }
        results[n] = {
            "alone": (session.run(alone_feeds), alone_eager, (n,)),
            "padded": (session.run(padded_feeds), padded_eager, padded_lengths),
        }
    return results


def test_inputs_and_outputs_have_symbolic_contract_axes(exported):
    model, path, session = exported
    graph = onnx.load(str(path), load_external_data=False).graph

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    by_name = {v.name: dims(v) for v in [*graph.input, *graph.output]}
    assert [v.name for v in graph.input] == input_names(model)
    assert [v.name for v in graph.output] == list(contract.MIL_OUTPUTS)
    assert by_name[contract.FEATURES] == ["batch", "bag", IN_DIM]
    assert by_name[contract.MASK] == ["batch", "bag"]
    assert by_name[contract.LOGITS] == by_name[contract.PROBABILITIES] == ["batch", model.n_classes]
    assert by_name[contract.ATTENTION] == ["batch", "bag"]
    # onnxruntime sees the same names
    assert [i.shape for i in session.inference.get_inputs()][:2] == [["batch", "bag", IN_DIM], ["batch", "bag"]]
    assert session.inference.get_outputs()[2].shape == ["batch", "bag"]
    # no exporter symbol (s31, s64, ...) is left anywhere, value_info included
    symbols = {d.dim_param for v in [*graph.input, *graph.output, *graph.value_info]
               for d in v.type.tensor_type.shape.dim if d.dim_param}
    tokens = {t for s in symbols for t in re.findall(r"[A-Za-z_]\w*", s)}
    assert tokens <= {"batch", "bag", "edges"}


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("layout", ["alone", "padded"])
def test_onnxruntime_matches_eager(runs, n, layout):
    ort_out, eager_out, _ = runs[n][layout]
    for name in contract.MIL_OUTPUTS:
        assert ort_out[name].shape == eager_out[name].shape
        error = np.abs(ort_out[name] - eager_out[name]).max()
        assert error <= TOLERANCE, f"{name}: max |ort - eager| = {error:.3e} at bag {n} ({layout})"


@pytest.mark.parametrize("n", SIZES)
def test_padded_bag_equals_bag_alone(runs, n):
    alone, _, _ = runs[n]["alone"]
    padded, _, _ = runs[n]["padded"]
    for name in (contract.LOGITS, contract.PROBABILITIES):
        np.testing.assert_allclose(padded[name][1], alone[name][0], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(padded[contract.ATTENTION][1, :n], alone[contract.ATTENTION][0], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("n", SIZES)
def test_attention_sums_to_one_and_is_zero_on_padding(runs, n):
    ort_out, _, lengths = runs[n]["padded"]
    attention = ort_out[contract.ATTENTION].astype(np.float64)  # (batch, bag)
    for b, length in enumerate(lengths):
        assert attention[b, :length].sum() == pytest.approx(1.0, abs=1e-5)
        assert np.all(attention[b, :length] >= 0)
        assert np.all(attention[b, length:] == 0.0)


def test_probabilities_are_the_activation_of_logits(runs, exported):
    model, _, _ = exported
    ort_out, _, _ = runs[49]["padded"]
    logits = ort_out[contract.LOGITS].astype(np.float64)
    if model.n_classes == 1:
        expected = 1 / (1 + np.exp(-logits))
    else:
        expected = np.exp(logits - logits.max(1, keepdims=True))
        expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(ort_out[contract.PROBABILITIES], expected, rtol=0, atol=1e-6)


def test_metadata_round_trips(exported):
    model, path, session = exported
    props = session.inference.get_modelmeta().custom_metadata_map
    meta = ModelMetadata.from_props(props, source=str(path))
    assert meta.kind == "mil"
    assert meta.model_name == model.name
    assert meta.model_config == model.config
    assert meta.feature_dim == IN_DIM
    assert meta.inputs == input_names(model)
    assert meta.n_classes == model.n_classes
    assert meta.class_names == contract.default_class_names(model.n_classes)
    assert meta.activation == ("sigmoid" if model.n_classes == 1 else "softmax")
    assert meta.graph == model.graph_rule and meta.encoder is None
    assert (meta.tiling.tile_px, meta.tiling.mpp, meta.tiling.overlap) == (224, 0.5, 0.0)
    assert meta.provenance == {"dataset": "synthetic", "epochs": 0}
    from mil_runtime._version import __version__

    assert meta.version == __version__
    # the registry can rebuild the same architecture from the stored config
    rebuilt = create_model(meta.model_name, **meta.model_config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_validate_onnx_rebuilds_the_model_from_the_file(exported):
    """validate_onnx without a model: weights come from the initializers; all sizes pass."""
    _, path, _ = exported
    rows = validate_onnx(path, sizes=(1, 7, 1000))
    assert [(r.bag, r.padded) for r in rows] == [(1, False), (1, True), (7, False), (7, True), (1000, False), (1000, True)]
    for row in rows:
        assert set(contract.MIL_OUTPUTS) <= set(row.errors)
        assert row.max_error <= TOLERANCE, row
