"""ABMIL through the user-facing paths: checkpoint -> `mil-export model` -> `mil-export validate`,
encoder references, clean failures, and validation that can fail.

The contract itself (axes, ORT vs eager up to 50,000 instances, padding, attention) is checked in
test_mil_contract.py for binary/plain and multiclass/gated ABMIL; the other two combinations are
exported here.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from mil_export import export_checkpoint, export_onnx, validate_onnx
from mil_export.cli import main
from mil_export.onnx_export import read_metadata
from mil_runtime import contract
from mil_runtime.contract import EncoderRef, ModelMetadata, Tiling
from mil_runtime.errors import (
    ContractMismatchError,
    InputNotFoundError,
    InvalidInputError,
    MilkitError,
    ModelFormatError,
    OutputError,
)
from mil_train.checkpoint import save_checkpoint
from mil_train.models import ABMIL

IN_DIM = 16
CLASS_NAMES = ["benign", "tumour"]
TILING = {"tile_px": 256, "mpp": 0.5, "overlap": 0.0}


def _binary_gated(seed: int) -> ABMIL:
    torch.manual_seed(seed)
    return ABMIL(in_dim=IN_DIM, n_classes=1, gated=True, att_dim=32, embed_dims=[24])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("abmil")


@pytest.fixture(scope="module")
def checkpoint(folder):
    path = folder / "binary_gated.pt"
    save_checkpoint(_binary_gated(0), path, class_names=CLASS_NAMES, tiling=TILING, provenance={"epochs": 2})
    return path


@pytest.fixture(scope="module")
def cli_export(folder, checkpoint):
    """`mil-export model` on the checkpoint, run once: (click result, output path)."""
    out = folder / "binary_gated.onnx"
    result = CliRunner().invoke(main, ["model", str(checkpoint), "-o", str(out)])
    return result, out


def _fake_encoder(path, output_dim: int, tiling: Tiling | None = None):
    """A tiny ONNX file carrying encoder metadata: all export_checkpoint reads from an encoder."""
    tiles = helper.make_tensor_value_info("tiles", TensorProto.FLOAT, ["batch", output_dim])
    features = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", output_dim])
    graph = helper.make_graph([helper.make_node("Identity", ["tiles"], ["features"])], "encoder", [tiles], [features])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    meta = ModelMetadata(kind="encoder", model_name="toy-encoder", feature_dim=output_dim, inputs=["tiles"], tiling=tiling)
    onnx.helper.set_model_props(model, meta.to_props())
    onnx.save_model(model, str(path))
    return path


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


# --- mil-export model / validate on a checkpoint ---------------------------------------------------


def test_cli_model_exports_checkpoint_with_its_metadata(cli_export, checkpoint):
    result, out = cli_export
    assert result.exit_code == 0, result.output
    assert "[torch.onnx]" not in result.output  # the exporter's progress prints are silenced
    assert f"wrote {out}" in result.output
    meta = read_metadata(out)
    assert meta.model_name == "ABMIL"
    assert meta.model_config == _binary_gated(0).config
    assert meta.class_names == CLASS_NAMES
    assert meta.activation == "sigmoid"
    assert meta.tiling == Tiling(**TILING)
    assert meta.provenance == {"epochs": 2, "checkpoint": checkpoint.name}


def test_cli_validate_passes_at_every_size(cli_export, checkpoint):
    _, out = cli_export
    result = CliRunner().invoke(
        main, ["validate", str(out), "--sizes", "1,2,7,49,1000,50000", "--checkpoint", str(checkpoint)]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["bag", "padded", "logits", "probabilities", "attention"]
    assert [line.split()[:2] for line in lines[1:13]] == [
        [str(n), padded] for n in (1, 2, 7, 49, 1000, 50000) for padded in ("no", "yes")
    ]
    assert lines[13].startswith("OK: max error")


def test_cli_validate_fails_against_other_weights(cli_export, folder):
    """Validation can fail: the same architecture with different weights is far off."""
    _, out = cli_export
    other = save_checkpoint(_binary_gated(1), folder / "other.pt", class_names=CLASS_NAMES)
    result = CliRunner().invoke(main, ["validate", str(out), "--sizes", "7", "--checkpoint", str(other)])
    assert result.exit_code == 1
    assert "FAILED: max |a - b| / (1 + |b|)" in result.stderr


def test_validate_stops_at_the_declared_max_bag_size(folder, monkeypatch):
    """A full self-attention model declares the largest bag it is checked at; validate skips larger ones."""
    model = _binary_gated(2)
    path = export_onnx(model, folder / "limited.onnx")
    monkeypatch.setattr(ABMIL, "max_bag_size", 49)
    result = CliRunner().invoke(main, ["validate", str(path), "--sizes", "7,49,50"])
    assert result.exit_code == 0, result.output
    assert "skipping bag sizes 50: ABMIL declares max_bag_size 49" in result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()[1:5]] == ["7", "7", "49", "49"]
    assert validate_onnx(path, model, sizes=(7, 50))[-1].bag == 7


def test_validate_rule_is_relative_to_the_reference():
    from mil_export.validate import ValidationRow

    row = ValidationRow(1, False, {"logits": 2e-3}, scaled=2e-3 / (1 + 30.0))  # |b| = 30
    assert row.passes(1e-4) and not ValidationRow(1, False, {"logits": 2e-3}, scaled=2e-3).passes(1e-4)


def test_validate_rebuilt_from_file_matches_checkpoint_model(cli_export, checkpoint):
    _, out = cli_export
    from mil_train.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    from_file = validate_onnx(out, sizes=(7, 49))
    from_checkpoint = validate_onnx(out, model=model, sizes=(7, 49))
    for a, b in zip(from_file, from_checkpoint):
        assert a.errors == b.errors  # same weights, same inputs: identical errors
        assert a.max_error <= 1e-5


@pytest.mark.faults
@pytest.mark.parametrize(
    "args, code, message",
    [
        (["model", "{folder}/missing.pt", "-o", "{folder}/x.onnx"], 3, "checkpoint not found"),
        (["model", "{folder}/garbage.pt", "-o", "{folder}/x.onnx"], 4, "not a milkit checkpoint"),
        (["model", "{checkpoint}", "-o", "{folder}/no/such/x.onnx"], 7, "does not exist"),
        (["model", "{checkpoint}", "-o", "{folder}/x.onnx", "--class-names", "a,b,c"], 6, "3 class names"),
        (["model", "{checkpoint}", "-o", "{folder}/x.onnx", "--tile-px", "224"], 2, "--tile-px and --mpp"),
        (["validate", "{folder}/missing.onnx"], 3, "not found"),
        (["validate", "{folder}/garbage.pt"], 4, "not a readable ONNX model"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code(folder, checkpoint, args, code, message):
    (folder / "garbage.pt").write_bytes(b"not a checkpoint at all")
    before = _files(folder)
    args = [a.format(folder=folder, checkpoint=checkpoint) for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    if code != 2:  # click's own usage errors print a usage block
        assert len(result.stderr.strip().splitlines()) == 1
    assert _files(folder) == before  # nothing written, no temp files left


# --- export_checkpoint: encoder references and failures ---------------------------------------------


def test_export_checkpoint_records_the_encoder_file(tmp_path, checkpoint):
    encoder = _fake_encoder(tmp_path / "enc.onnx", IN_DIM, Tiling(224, 0.25))
    out = export_checkpoint(checkpoint, tmp_path / "m.onnx", encoder_onnx=encoder)
    meta = read_metadata(out)
    digest = hashlib.sha256(encoder.read_bytes()).hexdigest()
    assert meta.encoder == EncoderRef(name="toy-encoder", output_dim=IN_DIM, sha256=digest)
    assert meta.tiling == Tiling(**TILING)  # the checkpoint's tiling wins over the encoder's


def test_export_checkpoint_takes_tiling_from_encoder_when_checkpoint_has_none(tmp_path):
    plain = save_checkpoint(_binary_gated(0), tmp_path / "plain.pt")
    encoder = _fake_encoder(tmp_path / "enc.onnx", IN_DIM, Tiling(224, 0.25))
    meta = read_metadata(export_checkpoint(plain, tmp_path / "m.onnx", encoder_onnx=encoder))
    assert meta.tiling == Tiling(224, 0.25)
    assert meta.class_names == ["negative", "positive"]


def _fail_on_save(proto, path, *args, **kwargs):
    with open(path, "wb") as handle:  # half a file, then the disk fills up
        handle.write(b"\x08\x07partial")
    raise OSError(28, "No space left on device")


@pytest.mark.faults
@pytest.mark.parametrize(
    "case, error",
    [
        ("missing checkpoint", InputNotFoundError),
        ("not a checkpoint", ModelFormatError),
        ("encoder of another dim", ContractMismatchError),
        ("encoder is a MIL model", ContractMismatchError),
        ("missing encoder", InputNotFoundError),
        ("wrong class names", InvalidInputError),
    ],
)
def test_export_checkpoint_writes_nothing_when_it_fails(tmp_path, checkpoint, cli_export, case, error):
    out = tmp_path / "model.onnx"
    kwargs = {}
    source = checkpoint
    if case == "missing checkpoint":
        source = tmp_path / "nope.pt"
    elif case == "not a checkpoint":
        source = tmp_path / "bad.pt"
        torch.save({"format": "something-else"}, source)
    elif case == "encoder of another dim":
        kwargs["encoder_onnx"] = _fake_encoder(tmp_path / "enc.onnx", IN_DIM + 1)
    elif case == "encoder is a MIL model":
        kwargs["encoder_onnx"] = cli_export[1]
    elif case == "missing encoder":
        kwargs["encoder_onnx"] = tmp_path / "enc.onnx"
    elif case == "wrong class names":
        kwargs["class_names"] = ["only-one"]
    before = _files(tmp_path)
    with pytest.raises(error):
        export_checkpoint(source, out, **kwargs)
    assert not out.exists()
    assert _files(tmp_path) == before


@pytest.mark.faults
def test_failed_save_keeps_the_previous_file_and_no_temp(tmp_path, checkpoint, monkeypatch):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous export")
    monkeypatch.setattr(onnx, "save_model", _fail_on_save)
    with pytest.raises(OutputError):
        export_checkpoint(checkpoint, out)
    assert out.read_bytes() == b"previous export"
    assert _files(tmp_path) == ["model.onnx"]


# --- the remaining variant, and validation refusing what it cannot check ----------------------------


def test_multiclass_plain_attention_and_padding(tmp_path):
    torch.manual_seed(3)
    model = ABMIL(in_dim=IN_DIM, n_classes=4, gated=False, att_act="gelu").eval()
    path = export_onnx(model, tmp_path / "m.onnx", class_names=["a", "b", "c", "d"])
    rows = validate_onnx(path, model=model, sizes=(1, 2, 7, 49))
    assert max(row.max_error for row in rows) <= 1e-5
    assert all(row.errors["padded_vs_alone"] <= 1e-5 for row in rows if row.padded)
    assert read_metadata(path).class_names == ["a", "b", "c", "d"]


@pytest.mark.faults
def test_validate_refuses_a_file_whose_weights_cannot_be_found(cli_export, tmp_path):
    """An initializer renamed (as graph optimisers do) must fail clearly, not compare random weights."""
    _, out = cli_export
    proto = onnx.load(str(out))
    for tensor in proto.graph.initializer:
        if tensor.name == "model.classifier.weight":
            tensor.name = "val_99"
    for node in proto.graph.node:
        node.input[:] = ["val_99" if name == "model.classifier.weight" else name for name in node.input]
    renamed = tmp_path / "renamed.onnx"
    onnx.save_model(proto, str(renamed))
    with pytest.raises(ModelFormatError, match="classifier.weight"):
        validate_onnx(renamed, sizes=(3,))


def test_validate_refuses_a_model_of_another_config(cli_export):
    _, out = cli_export
    with pytest.raises(ContractMismatchError, match="checkpoint"):
        validate_onnx(out, model=ABMIL(in_dim=IN_DIM, n_classes=1), sizes=(3,))


def test_attention_of_exported_model_is_a_distribution(cli_export):
    """Independent of validate: run the file directly on a padded batch."""
    import onnxruntime as ort

    _, out = cli_export
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    lengths = np.array([5, 1, 11])
    mask = np.arange(11)[None, :] < lengths[:, None]
    features = np.random.default_rng(0).standard_normal((3, 11, IN_DIM), dtype=np.float32)
    logits, probabilities, attention = session.run(None, {"features": features, "mask": mask})
    assert logits.shape == probabilities.shape == (3, 1)
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-logits)), atol=1e-6)
    np.testing.assert_allclose(attention.sum(1), 1.0, atol=1e-6)
    assert np.all(attention[~mask] == 0)
    assert attention[1, 0] == pytest.approx(1.0)


class _BranchOnBagSize(ABMIL):
    """Breaks the export rules: a Python branch on the bag size freezes the bag axis."""

    name = "BranchOnBagSize"

    def forward(self, X, mask=None, **inputs):
        if X.shape[1] > 5:
            X = 2 * X
        return super().forward(X, mask)


def test_model_that_freezes_an_axis_is_refused_without_output(tmp_path):
    out = tmp_path / "frozen.onnx"
    with pytest.raises(MilkitError, match="could not export BranchOnBagSize with dynamic batch/bag axes"):
        export_onnx(_BranchOnBagSize(in_dim=IN_DIM), out)
    assert _files(tmp_path) == []
