"""Tile encoders: exported graph vs eager PyTorch, metadata, weights files, runtime loading and matching."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from mil_export.encoders import TileEncoder, TinyCNN, build_encoder, export_encoder
from mil_runtime.contract import EncoderRef, ModelMetadata
from mil_runtime.encoder import (
    check_encoder_matches,
    encoder_filename,
    find_encoder,
    load_encoder,
    sha256_file,
)
from mil_runtime.errors import (
    ContractMismatchError,
    InputNotFoundError,
    InvalidInputError,
    MilkitError,
    ModelFormatError,
    OutputError,
)

PARITY_ATOL = 1e-4


def _build(name, weights=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-init warning is expected here
        return build_encoder(name, weights, **kwargs)


def _export(tmp_path_factory, name, **kwargs):
    encoder, info = _build(name)
    path = tmp_path_factory.mktemp(name.replace(":", "_")) / encoder_filename(name)
    export_encoder(encoder, path, name=name, provenance=info, **kwargs)
    return encoder, path


def _tiles(batch, height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)


def _eager(encoder, tiles):
    with torch.no_grad():
        return encoder(torch.from_numpy(tiles)).numpy()  # (batch, D)


def _onnx_direct(path, tiles):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["features"], {"tiles": tiles})[0]


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    return _export(tmp_path_factory, "resnet50_trunc")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _export(tmp_path_factory, "tiny_cnn")


@pytest.fixture(scope="module")
def tiny_runner(tiny):
    return load_encoder(tiny[1], device="cpu")


# -- parity: onnxruntime vs eager -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("batch, side", [(1, 224), (64, 224), (2, 256)])
def test_resnet50_trunc_matches_eager(resnet, batch, side):
    encoder, path = resnet
    tiles = _tiles(batch, side, side, seed=batch)
    expected = _eager(encoder, tiles)
    got = load_encoder(path, device="cpu").encode(tiles)
    assert got.shape == (batch, 1024) and got.dtype == np.float32
    assert np.abs(expected).max() > 1.0  # features of real magnitude: the tolerance is not vacuous
    np.testing.assert_allclose(got, expected, rtol=0, atol=PARITY_ATOL)


@pytest.mark.parametrize("batch, height, width", [(1, 96, 96), (64, 96, 96), (3, 256, 256), (2, 50, 70)])
def test_tiny_cnn_matches_eager(tiny, tiny_runner, batch, height, width):
    encoder, _ = tiny
    tiles = _tiles(batch, height, width, seed=height)
    expected = _eager(encoder, tiles)
    got = tiny_runner.encode(tiles)
    assert got.shape == (batch, 64)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, rtol=0, atol=PARITY_ATOL)


@pytest.mark.slow
def test_timm_encoder_exports_and_matches(tmp_path_factory):
    pytest.importorskip("timm")
    encoder, path = _export(tmp_path_factory, "timm:test_vit")
    runner = load_encoder(path, device="cpu")
    assert runner.name == "timm:test_vit" and runner.output_dim == encoder.output_dim
    assert runner.metadata.model_config["input_px"] == encoder.input_px
    for tiles in (_tiles(3, encoder.input_px, encoder.input_px), _tiles(1, 200, 300)):
        np.testing.assert_allclose(runner.encode(tiles), _eager(encoder, tiles), rtol=0, atol=PARITY_ATOL)


def test_resize_is_exact_identity_at_input_size():
    """With tiles at the network size the in-graph resize must change nothing (an identity backbone shows it)."""
    encoder = TileEncoder(torch.nn.Identity(), 3 * 8 * 8, input_px=8, mean=(0, 0, 0), std=(1, 1, 1))
    tiles = _tiles(2, 8, 8)
    expected = tiles.transpose(0, 3, 1, 2).reshape(2, -1).astype(np.float32) / 255.0
    np.testing.assert_array_equal(_eager(encoder, tiles), expected)


def test_normalisation_uses_mean_and_std():
    encoder = TileEncoder(torch.nn.Identity(), 3, input_px=1, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    tiles = np.array([[[[255, 0, 102]]]], dtype=np.uint8)  # (1, 1, 1, 3)
    np.testing.assert_allclose(_eager(encoder, tiles), [[1.0, -1.0, 0.2]], atol=1e-6)


# -- the graph and its metadata --------------------------------------------------------------------


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_axes_are_symbolic_and_named(resnet, tiny):
    for _, path in (resnet, tiny):
        model = onnx.load(str(path), load_external_data=False)
        (tiles,), (features,) = model.graph.input, model.graph.output
        assert tiles.name == "tiles" and features.name == "features"
        assert tiles.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert features.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert _dims(tiles) == ["batch", "height", "width", 3]
        assert _dims(features)[0] == "batch"


def test_metadata_round_trip(tiny, tiny_runner):
    encoder, path = tiny
    meta = tiny_runner.metadata
    assert (meta.kind, meta.model_name, meta.feature_dim, meta.inputs) == ("encoder", "tiny_cnn", 64, ["tiles"])
    config = meta.model_config
    assert config["input_px"] == encoder.input_px == 96 and config["tile_px"] is None
    np.testing.assert_allclose(config["mean"], encoder.mean.flatten().numpy(), atol=1e-6)
    np.testing.assert_allclose(config["std"], encoder.std.flatten().numpy(), atol=1e-6)
    assert config["antialias"] is True and config["resize"] == "bilinear"
    assert meta.tiling is None and meta.version
    assert meta.provenance["random_init"] is True and meta.provenance["weights"] is None
    assert tiny_runner.device == "cpu" and tiny_runner.sha256 == sha256_file(path)


def test_fixed_tile_px_export(tmp_path):
    encoder, info = _build("tiny_cnn", input_px=64)
    with pytest.raises(OutputError, match="does not exist"):
        export_encoder(encoder, tmp_path / "missing" / "x.onnx", name="tiny_cnn")
    path = export_encoder(encoder, tmp_path / "fixed.onnx", name="tiny_cnn", tile_px=128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx"]  # atomic: no temp file left behind
    assert _dims(onnx.load(str(path)).graph.input[0]) == ["batch", 128, 128, 3]
    runner = load_encoder(path, device="cpu")
    assert runner.tile_px == 128 and runner.input_px == 64
    tiles = _tiles(2, 128, 128)
    np.testing.assert_allclose(runner.encode(tiles), _eager(encoder, tiles), rtol=0, atol=PARITY_ATOL)
    with pytest.raises(InvalidInputError, match="128x128"):
        runner.encode(_tiles(1, 64, 64))


# -- weights files ------------------------------------------------------------------------------------


def test_weights_file_is_loaded_and_exported(tmp_path):
    torch.manual_seed(123)
    trained = TinyCNN()  # stands in for trained weights: a different init than the registry's seed
    weights = tmp_path / "tiny.pth"
    torch.save(trained.state_dict(), weights)
    encoder, info = build_encoder("tiny_cnn", weights)
    for key, value in trained.state_dict().items():
        assert torch.equal(encoder.backbone.state_dict()[key], value)
    assert info["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert info["random_init"] is False

    path = export_encoder(encoder, tmp_path / "tiny_cnn.onnx", name="tiny_cnn", provenance=info)
    tiles = _tiles(4, 96, 96)
    rebuilt, _ = build_encoder("tiny_cnn", weights)  # eager model from the same file, built afresh
    got = load_encoder(path, device="cpu").encode(tiles)
    np.testing.assert_allclose(got, _eager(rebuilt, tiles), rtol=0, atol=PARITY_ATOL)
    assert np.abs(got - _eager(_build("tiny_cnn")[0], tiles)).max() > 1e-3  # the weights were really used
    assert load_encoder(path).metadata.provenance["weights"] == "tiny.pth"


def test_wrapped_and_prefixed_state_dicts_are_accepted(tmp_path):
    torch.manual_seed(7)
    trained = TinyCNN()
    weights = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, weights)
    encoder, _ = build_encoder("tiny_cnn", weights)
    assert torch.equal(encoder.backbone.features[0].weight, trained.features[0].weight)


def test_full_torchvision_resnet50_state_dict_is_accepted(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(1)
    full = resnet50(weights=None).eval()
    weights = tmp_path / "resnet50.pth"
    torch.save(full.state_dict(), weights)  # includes layer4 and fc, which the trunk drops
    encoder, _ = build_encoder("resnet50_trunc", weights)

    captured = {}
    full.layer3.register_forward_hook(lambda module, args, out: captured.setdefault("layer3", out))
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        full(images)
        expected = captured["layer3"].mean(dim=(2, 3))  # (2, 1024): layer3 output, globally averaged
        got = encoder.backbone(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.faults
def test_bad_weights_are_refused(tmp_path):
    with pytest.raises(InputNotFoundError):
        build_encoder("tiny_cnn", tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ModelFormatError, match="state_dict"):
        build_encoder("tiny_cnn", garbage)
    other = tmp_path / "tiny.pth"
    torch.save(TinyCNN().state_dict(), other)
    with pytest.raises(ModelFormatError, match="does not fit encoder 'resnet50_trunc'"):
        build_encoder("resnet50_trunc", other)


def test_unknown_encoder_name():
    with pytest.raises(MilkitError, match="tiny_cnn"):
        build_encoder("resnet51")


def test_random_init_warns_and_is_reproducible():
    with pytest.warns(UserWarning, match="meaningless"):
        first, _ = build_encoder("tiny_cnn")
    second, _ = _build("tiny_cnn")
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


# -- runtime --------------------------------------------------------------------------------------------


def test_runner_equals_onnxruntime_directly(tiny, tiny_runner):
    tiles = _tiles(5, 120, 120)
    np.testing.assert_array_equal(tiny_runner.encode(tiles), _onnx_direct(tiny[1], tiles))


@pytest.mark.faults
@pytest.mark.parametrize(
    "tiles, message",
    [
        (np.zeros((1, 96, 96, 3), np.float32), "uint8"),
        (np.zeros((96, 96, 3), np.uint8), r"tiles\[None\]"),
        (np.zeros((1, 96, 96, 4), np.uint8), r"\(batch, H, W, 3\)"),
        (np.zeros((0, 96, 96, 3), np.uint8), "at least one"),
        ([[0, 0, 0]], "numpy array"),
    ],
)
def test_encode_refuses_bad_tiles(tiny_runner, tiles, message):
    with pytest.raises(InvalidInputError, match=message):
        tiny_runner.encode(tiles)


def test_encode_accepts_non_contiguous_tiles(tiny_runner):
    tiles = _tiles(2, 96, 192)[:, :, ::2]  # (2, 96, 96, 3), strided view
    np.testing.assert_array_equal(tiny_runner.encode(tiles), tiny_runner.encode(tiles.copy()))


def _mil_metadata(feature_dim=64, encoder=None):
    return ModelMetadata(kind="mil", model_name="ABMIL", feature_dim=feature_dim, inputs=["features", "mask"],
                         n_classes=1, activation="sigmoid", encoder=encoder)


@pytest.mark.faults
def test_load_encoder_refuses_a_mil_model(tiny, tmp_path):
    model = onnx.load(str(tiny[1]))
    del model.metadata_props[:]
    for key, value in _mil_metadata().to_props().items():
        model.metadata_props.add(key=key, value=value)
    path = tmp_path / "abmil.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelFormatError, match="not a tile encoder"):
        load_encoder(path)


def test_check_encoder_matches(tiny_runner):
    sha = tiny_runner.sha256
    check_encoder_matches(_mil_metadata(64, EncoderRef("tiny_cnn", 64, sha)), tiny_runner)
    check_encoder_matches(_mil_metadata(64, EncoderRef("tiny_cnn", 64, None)), tiny_runner)
    check_encoder_matches(_mil_metadata(64, None), tiny_runner)
    refused = {
        "expects encoder 'resnet50_trunc'": _mil_metadata(64, EncoderRef("resnet50_trunc", 64, sha)),
        "1024-d": _mil_metadata(1024, EncoderRef("tiny_cnn", 1024, sha)),
        "sha256": _mil_metadata(64, EncoderRef("tiny_cnn", 64, "0" * 64)),
        "32-d": _mil_metadata(32, None),
    }
    for message, meta in refused.items():
        with pytest.raises(ContractMismatchError, match=message) as caught:
            check_encoder_matches(meta, tiny_runner)
        assert "--encoder" in str(caught.value)


def test_find_encoder_rule(tmp_path):
    model = tmp_path / "abmil.onnx"
    meta = _mil_metadata(64, EncoderRef("timm:vit_x", 64))
    with pytest.raises(InputNotFoundError, match="--encoder") as caught:
        find_encoder(model, meta)
    assert "timm_vit_x.onnx" in str(caught.value)

    (tmp_path / "encoder.onnx").write_bytes(b"x")
    assert find_encoder(model, meta) == tmp_path / "encoder.onnx"  # the generic fallback
    (tmp_path / "timm_vit_x.onnx").write_bytes(b"x")
    assert find_encoder(model, meta) == tmp_path / "timm_vit_x.onnx"  # the recorded name wins
    assert find_encoder(model, _mil_metadata(64, None)) == tmp_path / "encoder.onnx"
    (tmp_path / "abmil.encoder.onnx").write_bytes(b"x")  # the model's own encoder, as mil-export writes it
    assert find_encoder(model, meta) == tmp_path / "abmil.encoder.onnx"

    explicit = tmp_path / "elsewhere" / "mine.onnx"
    with pytest.raises(InputNotFoundError, match="mine.onnx"):
        find_encoder(model, meta, explicit=explicit)
    explicit.parent.mkdir()
    explicit.write_bytes(b"x")
    assert find_encoder(model, meta, explicit=explicit) == explicit


def test_encoder_filename():
    assert encoder_filename("resnet50_trunc") == "resnet50_trunc.onnx"
    assert encoder_filename("timm:hf-hub/uni") == "timm_hf-hub_uni.onnx"


def test_sha256_file_streams_across_chunks(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 3 * (1 << 20) + 17, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


# -- command line -----------------------------------------------------------------------------------------


def _cli():
    from mil_export.cli import main

    return main


def test_cli_exports_tiny_cnn(tmp_path, tiny):
    out = tmp_path / "x.onnx"
    result = CliRunner().invoke(_cli(), ["encoder", "tiny_cnn", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "64-d" in result.output and sha256_file(out) in result.output
    # export is reproducible byte for byte, so a sha256 recorded in a MIL model stays valid on re-export
    assert sha256_file(out) == sha256_file(tiny[1])
    runner = load_encoder(out, device="cpu")
    assert runner.name == "tiny_cnn" and runner.output_dim == 64


@pytest.mark.faults
def test_cli_errors_are_one_line_with_exit_codes(tmp_path):
    result = CliRunner().invoke(_cli(), ["encoder", "tiny_cnn", "--weights", str(tmp_path / "no.pth"), "-o",
                                         str(tmp_path / "x.onnx")])
    assert result.exit_code == InputNotFoundError.exit_code
    assert [line for line in result.output.splitlines() if "error:" in line] == [
        f"mil-export: error: weights file not found: {tmp_path / 'no.pth'}"
    ]
    result = CliRunner().invoke(_cli(), ["encoder", "resnet51", "-o", str(tmp_path / "y.onnx")])
    assert result.exit_code == MilkitError.exit_code and "unknown encoder" in result.output
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()



def test_model_records_the_encoder_weights_and_identity_with_external_data(tmp_path):
    """mil-export model --encoder records the encoder's weights sha256 and the identity the runtime computes
    (graph + external data); an encoder from other weights, or other data under the same graph, is refused."""
    from mil_export.onnx_export import encoder_reference

    weights = tmp_path / "tiny.pth"
    torch.save(TinyCNN().state_dict(), weights)
    encoder, info = build_encoder("tiny_cnn", weights)
    path = export_encoder(encoder, tmp_path / "tiny_cnn.onnx", name="tiny_cnn", provenance=info,
                          external_data_threshold=0)
    data = tmp_path / "tiny_cnn.onnx.data"
    assert data.is_file()
    ref, _ = encoder_reference(path, 64)
    assert ref.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    runner = load_encoder(path)
    assert ref.sha256 == runner.sha256 != hashlib.sha256(path.read_bytes()).hexdigest()
    meta = _mil_metadata(64, ref)
    assert ModelMetadata.from_props(meta.to_props()).encoder == ref  # survives the file's metadata
    check_encoder_matches(meta, runner)
    other = _mil_metadata(64, EncoderRef("tiny_cnn", 64, None, weights_sha256="f" * 64))
    with pytest.raises(ContractMismatchError, match="other weights"):
        check_encoder_matches(other, runner)
    assert "weights_sha256" not in _mil_metadata(64, EncoderRef("tiny_cnn", 64)).to_props()["milkit.encoder"]
    changed = bytearray(data.read_bytes())
    changed[-1] ^= 0xFF  # other weights in the data file under the same graph file
    data.write_bytes(bytes(changed))
    with pytest.raises(ContractMismatchError, match="sha256"):
        check_encoder_matches(_mil_metadata(64, EncoderRef("tiny_cnn", 64, ref.sha256)), load_encoder(path))
