"""Exporting per-class attention (`attention_by_class`, multi-branch models) through the one export path.

Uses the test-only ToyClassAttention (tests/class_attention_toy.py), not CLAM_MB, so the exporter's
side is tested on its own. Parity rule: |ort - eager| <= 1e-4 + 1e-4 * |eager| (DESIGN section 7).
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from class_attention_toy import TOY_NAME, ToyClassAttention, registered_toy, toy_model

from mil_export import export_onnx, validate_onnx
from mil_export.onnx_export import example_inputs, output_names
from mil_export.validate import PADDING_ERROR, format_table
from mil_runtime import contract
from mil_runtime.errors import ContractMismatchError, MilkitError, ModelFormatError
from mil_runtime.session import open_session
from mil_train.models import MILOutput, create_model

IN_DIM = 16
N_CLASSES = 3
CLASS_NAMES = ["normal", "tumor", "other"]
SIZES = (1, 2, 13, 49, 20_000)
ATOL = RTOL = 1e-4

STANDARD = list(contract.MIL_OUTPUTS)
WITH_CLASSES = [*contract.MIL_OUTPUTS, contract.ATTENTION_BY_CLASS]


def _within(ort: np.ndarray, eager: np.ndarray) -> float:
    """Largest violation of |a - b| <= atol + rtol * |b| (<= 0 when within), for the message."""
    return float((np.abs(ort - eager) - (ATOL + RTOL * np.abs(eager))).max())


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _props(path) -> dict[str, str]:
    return {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(eager toy model, path, session), exported once."""
    model = toy_model(IN_DIM, N_CLASSES, seed=0)
    path = export_onnx(model, tmp_path_factory.mktemp("toy") / "toy.onnx", class_names=CLASS_NAMES)
    return model, path, open_session(path, device="cpu")


def test_graph_has_attention_by_class_with_contract_axes(exported):
    _, path, session = exported
    graph = onnx.load(str(path), load_external_data=False).graph
    assert [v.name for v in graph.output] == WITH_CLASSES
    by_name = {v.name: _dims(v) for v in graph.output}
    assert by_name[contract.ATTENTION_BY_CLASS] == ["batch", N_CLASSES, "bag"]
    assert by_name[contract.ATTENTION] == ["batch", "bag"]
    assert session.inference.get_outputs()[3].shape == ["batch", N_CLASSES, "bag"]
    symbols = {d.dim_param for v in [*graph.input, *graph.output, *graph.value_info]
               for d in v.type.tensor_type.shape.dim if d.dim_param}
    assert {t for s in symbols for t in re.findall(r"[A-Za-z_]\w*", s)} <= {"batch", "bag", "edges"}


def test_metadata_lists_the_outputs(exported):
    _, path, session = exported
    assert json.loads(_props(path)["milkit.outputs"]) == WITH_CLASSES
    assert session.metadata.outputs == WITH_CLASSES and session.metadata.has_class_attention
    assert session.metadata.class_names == CLASS_NAMES


def test_validate_compares_attention_by_class_and_its_padding(exported):
    model, path, _ = exported
    rows = validate_onnx(path, model=model, sizes=SIZES)
    assert [(r.bag, r.padded) for r in rows] == [(n, p) for n in SIZES for p in (False, True)]
    for row in rows:
        assert contract.ATTENTION_BY_CLASS in row.errors
        assert row.max_error <= ATOL, row
        if row.padded:
            assert row.errors[PADDING_ERROR] <= ATOL, row
    assert contract.ATTENTION_BY_CLASS in format_table(rows).splitlines()[0]


def test_validate_rebuilds_the_model_by_name(exported):
    """Without a model, validate rebuilds it from milkit.model: here under the toy's test-only name."""
    _, path, _ = exported
    with registered_toy():
        rows = validate_onnx(path, sizes=(7,))
    assert all(row.max_error <= ATOL for row in rows)
    with pytest.raises(KeyError):  # the toy was removed from the registry again
        create_model(TOY_NAME, in_dim=IN_DIM)


def test_hostile_padding_does_not_reach_any_class_map(exported):
    """Padded rows of 1e30 and NaN: every class map of the padded bag equals the bag alone, 0 on padding."""
    model, _, session = exported
    n, lengths = 13, (13, 20, 17)
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(len(lengths), max(lengths), IN_DIM, generator=generator)
    feeds = {k: v.numpy() for k, v in example_inputs(model, lengths, features).items()}
    mask = feeds[contract.MASK]
    hostile = feeds[contract.FEATURES].copy()
    hostile[0, n:] = 1e30
    hostile[2][~mask[2]] = np.nan
    feeds[contract.FEATURES] = hostile
    padded = session.run(feeds)
    alone = session.run({contract.FEATURES: hostile[:1, :n], contract.MASK: mask[:1, :n]})
    by_class = padded[contract.ATTENTION_BY_CLASS]  # (batch, n_classes, bag)
    assert np.isfinite(by_class).all()
    np.testing.assert_allclose(by_class[0, :, :n], alone[contract.ATTENTION_BY_CLASS][0], rtol=RTOL, atol=ATOL)
    for b, length in enumerate(lengths):
        np.testing.assert_allclose(by_class[b, :, :length].sum(-1), 1.0, atol=1e-5)
        assert np.all(by_class[b, :, length:] == 0.0)
    with torch.inference_mode():  # eager on the same hostile feeds
        out = model(torch.from_numpy(hostile), torch.from_numpy(mask))
    eager = out.attention_by_class.numpy()
    assert _within(by_class, eager) <= 0, f"max |ort - eager| = {np.abs(by_class - eager).max():.3e}"
    # `attention` is the predicted class's row of attention_by_class
    predicted = padded[contract.LOGITS].argmax(-1)
    np.testing.assert_array_equal(padded[contract.ATTENTION], by_class[np.arange(len(lengths)), predicted])


def test_models_without_per_class_maps_keep_three_outputs(tmp_path):
    """A single-branch multi-class model, and a binary multi-branch one (one map: `attention`)."""
    torch.manual_seed(0)
    abmil = create_model("ABMIL", in_dim=IN_DIM, n_classes=3, att_dim=8)
    binary_toy = toy_model(IN_DIM, n_classes=1)
    assert output_names(abmil) == output_names(binary_toy) == STANDARD
    for name, model in {"abmil": abmil, "binary_toy": binary_toy}.items():
        path = export_onnx(model, tmp_path / f"{name}.onnx")
        assert [v.name for v in onnx.load(str(path)).graph.output] == STANDARD
        assert json.loads(_props(path)["milkit.outputs"]) == STANDARD  # written for every model now
        rows = validate_onnx(path, model=model, sizes=(5,))
        assert all(contract.ATTENTION_BY_CLASS not in row.errors and row.max_error <= ATOL for row in rows)


class Forgetful(ToyClassAttention):
    """Declares class_attention (same name and config as the toy) but returns no per-class maps."""

    def forward(self, X, mask=None, **inputs) -> MILOutput:
        out = super().forward(X, mask, **inputs)
        return MILOutput(logits=out.logits, attention=out.attention)


def test_a_class_attention_model_that_returns_no_maps_is_refused(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(MilkitError, match="attention_by_class"):
        export_onnx(Forgetful(in_dim=IN_DIM), tmp_path / "forgetful.onnx")
    assert not (tmp_path / "forgetful.onnx").exists()


def test_validate_refuses_an_eager_model_without_the_maps(exported):
    """The file has attention_by_class; a same-config eager model that returns none is a mismatch."""
    _, path, _ = exported
    torch.manual_seed(0)
    with pytest.raises(ContractMismatchError, match="attention_by_class"):
        validate_onnx(path, model=Forgetful(in_dim=IN_DIM).eval(), sizes=(3,))


def test_stripping_the_outputs_key_is_caught_by_the_runtime(exported, tmp_path):
    """An edited file whose metadata no longer lists attention_by_class disagrees with its graph."""
    from mil_runtime.model import load_model

    _, path, _ = exported
    proto = onnx.load(str(path))
    kept = [e for e in proto.metadata_props if e.key != "milkit.outputs"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    edited = tmp_path / "edited.onnx"
    onnx.save(proto, str(edited))
    with pytest.raises(ModelFormatError, match="milkit.outputs"):
        load_model(edited, device="cpu")
