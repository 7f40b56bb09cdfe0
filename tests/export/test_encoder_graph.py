"""The encoder graph: in-graph preprocessing == torchvision on PIL, external data + file identity, fp16,
attention fusion, and `mil-export encoder`'s options.

Truth here is independent of milkit: torchvision's Resize/CenterCrop/ToTensor/Normalize on PIL images, a
hand-computed resize, the eager PyTorch model, and onnx's own parser.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from mil_export.encoders import Preprocessing, TileEncoder, build_encoder, export_encoder
from mil_export.pil_resample import resize_crop
from mil_runtime.contract import EncoderRef, ModelMetadata
from mil_runtime.encoder import check_encoder_matches, load_encoder
from mil_runtime.errors import ContractMismatchError, ModelFormatError
from mil_runtime.session import file_identity, read_metadata_props, sha256_file

SLIDE = Path(__file__).resolve().parents[1] / "data" / "CMU-1-Small-Region.svs"
PARITY_RTOL = 1e-4  # onnxruntime vs eager, relative L2 (DESIGN.md section 7)
# (tile side, resize_px, crop_px): identity, the two downscales TRIDENT's encoders see, an upscale + crop
RESIZE_CASES = [(224, 224, 224), (256, 256, 224), (256, 224, 224), (512, 224, 224), (224, 256, 224)]


def _torchvision(image: np.ndarray, resize_px: int, crop_px: int, interpolation: str) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (crop, crop, 3) as TRIDENT / the model cards preprocess a PIL tile."""
    from torchvision import transforms

    mode = {"bilinear": transforms.InterpolationMode.BILINEAR, "bicubic": transforms.InterpolationMode.BICUBIC}
    steps = transforms.Compose([transforms.Resize(resize_px, interpolation=mode[interpolation]),
                                transforms.CenterCrop(crop_px)])
    return np.asarray(steps(Image.fromarray(image)))


def _in_graph(tiles: np.ndarray, resize_px: int, crop_px: int, interpolation: str) -> np.ndarray:
    out = resize_crop(torch.from_numpy(tiles), resize_px, crop_px, interpolation)  # (batch, 3, crop, crop)
    return out.numpy().transpose(0, 2, 3, 1)  # (batch, crop, crop, 3)


@pytest.fixture(scope="module")
def slide_tiles():
    """Two 512 px tissue regions of the real slide (H&E), read at level 0."""
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(SLIDE)) as slide:
        return np.stack([np.asarray(slide.read_region((x, y), 0, (512, 512)).convert("RGB"))
                         for x, y in [(600, 700), (1200, 1500)]])  # (2, 512, 512, 3)


def _random_tiles(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


# -- preprocessing == torchvision on PIL ---------------------------------------------------------------


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("side, resize_px, crop_px", RESIZE_CASES)
def test_resize_crop_equals_torchvision_on_pil(slide_tiles, side, resize_px, crop_px, interpolation):
    """Every pixel equals PIL's, on real tissue and on noise (noise has the most pixels near a rounding edge)."""
    real = np.stack([np.asarray(Image.fromarray(t).resize((side, side), Image.Resampling.NEAREST))
                     for t in slide_tiles])  # (2, side, side, 3): real texture at the case's tile size
    for tiles in (real, _random_tiles(2, side, side, seed=side)):
        expected = np.stack([_torchvision(t, resize_px, crop_px, interpolation) for t in tiles])
        got = _in_graph(tiles, resize_px, crop_px, interpolation)
        assert got.shape == expected.shape == (2, crop_px, crop_px, 3)
        assert np.count_nonzero(got != expected) == 0, f"max difference {np.abs(got - expected).max()}"


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("height, width", [(200, 317), (317, 200), (225, 224)])
def test_non_square_tiles_keep_aspect_then_crop(height, width, interpolation):
    tiles = _random_tiles(2, height, width, seed=height)
    expected = np.stack([_torchvision(t, 256, 224, interpolation) for t in tiles])
    np.testing.assert_array_equal(_in_graph(tiles, 256, 224, interpolation), expected)


def test_resize_matches_a_hand_computed_case():
    """4 -> 2 px bilinear: scale 2, support 2 source pixels; output 0 weighs pixels 0, 1, 2 by 3/7, 3/7, 1/7."""
    row = np.array([0, 70, 140, 210], dtype=np.uint8)
    tile = np.broadcast_to(row[None, :, None], (4, 4, 3)).copy()[None]  # (1, 4, 4, 3), constant columns
    # (0*3 + 70*3 + 140*1) / 7 = 50 and (70*1 + 140*3 + 210*3) / 7 = 160
    np.testing.assert_array_equal(_in_graph(tile, 2, 2, "bilinear")[0, :, :, 0], [[50, 160], [50, 160]])


def test_preprocessing_is_validated():
    with pytest.raises(ValueError, match="at least input_px"):
        Preprocessing(224, 200)
    with pytest.raises(ValueError, match="interpolation"):
        Preprocessing(224, interpolation="lanczos")
    prep = Preprocessing(224, 256, "bicubic", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    with pytest.raises(ValueError, match="input_px"):
        TileEncoder(nn.Identity(), 3, 200, preprocessing=prep)
    with pytest.raises(ValueError, match="mean"):
        TileEncoder(nn.Identity(), 3, 224, (0.5, 0.5, 0.5), preprocessing=prep)
    encoder = TileEncoder(nn.Identity(), 3, 224, preprocessing=prep)
    assert encoder.preprocessing is prep and encoder.input_px == 224
    assert prep.to_config()["resize_px"] == 256 and prep.to_config()["crop_px"] == 224


# -- slow: one exported graph, ONNX == PIL pipeline, with its weights in external data ---------------------


class CenterTap(nn.Module):
    """A 9x9 convolution whose only non-zero tap is the centre identity: returns its input exactly, and has
    enough weight bytes (2.9 kB) to go to an external data file at a threshold of 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 9, padding=4, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :, 4, 4] = torch.eye(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (batch, 3, px, px)


PREP = Preprocessing(32, 40, "bicubic", mean=(0.7, 0.57, 0.7), std=(0.21, 0.23, 0.18))


@pytest.fixture(scope="module")
def external_graph(tmp_path_factory):
    encoder = TileEncoder(CenterTap(), 3 * 32 * 32, 32, preprocessing=PREP).eval()
    folder = tmp_path_factory.mktemp("external")
    path = export_encoder(encoder, folder / "center.onnx", name="center_tap", external_data_threshold=0)
    return encoder, path


def _torchvision_tensor(image: np.ndarray) -> np.ndarray:
    from torchvision import transforms

    steps = transforms.Compose([
        transforms.Resize(PREP.resize_px, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(PREP.input_px), transforms.ToTensor(), transforms.Normalize(PREP.mean, PREP.std),
    ])
    return steps(Image.fromarray(image)).numpy().reshape(-1)  # (3 * 32 * 32,)


@pytest.mark.slow
def test_graph_equals_torchvision_on_pil_for_any_tile_size(external_graph, slide_tiles):
    _, path = external_graph
    runner = load_encoder(path, device="cpu")
    real = slide_tiles[:2, :48, :64]  # (2, 48, 64, 3): non-square, downscaled then cropped
    for tiles in (real, _random_tiles(2, 40, 40), _random_tiles(2, 32, 32), _random_tiles(1, 100, 37)):
        expected = np.stack([_torchvision_tensor(t) for t in tiles])
        np.testing.assert_allclose(runner.encode(tiles), expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_export_writes_external_data_beside_the_graph(external_graph):
    _, path = external_graph
    assert sorted(p.name for p in path.parent.iterdir()) == ["center.onnx", "center.onnx.data"]  # no temp left
    config = load_encoder(path, device="cpu").metadata.model_config
    assert config["external_data"] == ["center.onnx.data"] and config["precision"] == "fp32"
    assert load_encoder(path, device="cpu").sha256 == file_identity(path) != sha256_file(path)


# a hand-built encoder graph (mean colour x weights) written by save_graph: the file handling without an export
HAND_DIM = 512


@pytest.fixture(scope="module")
def hand_graph(tmp_path_factory):
    from onnx import TensorProto, helper, numpy_helper

    from mil_export.onnx_files import needs_external_data, save_graph

    weights = np.random.default_rng(3).standard_normal((3, HAND_DIM)).astype(np.float32)  # 6 kB
    nodes = [helper.make_node("Cast", ["tiles"], ["pixels"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["pixels", "axes"], ["colour"], keepdims=0),  # (batch, 3)
             helper.make_node("MatMul", ["colour", "weights"], ["features"])]  # (batch, HAND_DIM)
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("tiles", TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", HAND_DIM])],
        initializer=[numpy_helper.from_array(weights, "weights"),
                     numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    meta = ModelMetadata(kind="encoder", model_name="hand", feature_dim=HAND_DIM, inputs=["tiles"],
                         model_config={"external_data": ["hand.onnx.data"]})
    for key, value in meta.to_props().items():
        proto.metadata_props.add(key=key, value=value)
    assert needs_external_data(proto, threshold=4096) and not needs_external_data(proto, threshold=8192)
    folder = tmp_path_factory.mktemp("hand")
    assert save_graph(proto, folder / "hand.onnx", external=True) == ["hand.onnx.data"]
    return folder / "hand.onnx", weights


def test_external_data_is_written_beside_the_graph(hand_graph):
    path, weights = hand_graph
    assert sorted(p.name for p in path.parent.iterdir()) == ["hand.onnx", "hand.onnx.data"]  # no temp left
    graph = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for tensor in graph.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    assert locations == {"hand.onnx.data"} and path.stat().st_size < weights.nbytes
    onnx.checker.check_model(str(path), full_check=True)
    tiles = _random_tiles(2, 5, 7)
    expected = tiles.reshape(2, -1, 3).mean(axis=1, dtype=np.float64) @ weights  # (2, HAND_DIM)
    np.testing.assert_allclose(load_encoder(path, device="cpu").encode(tiles), expected, rtol=1e-5, atol=1e-4)


def test_metadata_props_are_read_without_onnx(hand_graph):
    path, _ = hand_graph
    expected = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert read_metadata_props(path) == expected and "milkit.model" in expected


def test_identity_covers_the_data_file(hand_graph, tmp_path):
    path, _ = hand_graph
    runner = load_encoder(path, device="cpu")
    assert runner.sha256 == file_identity(path) != sha256_file(path)
    recorded = ModelMetadata(kind="mil", model_name="ABMIL", feature_dim=HAND_DIM, inputs=["features", "mask"],
                             n_classes=1, activation="sigmoid", encoder=EncoderRef("hand", HAND_DIM, runner.sha256))
    check_encoder_matches(recorded, runner)

    copy = tmp_path / "copy"
    shutil.copytree(path.parent, copy)
    data = bytearray((copy / "hand.onnx.data").read_bytes())
    data[-4:] = np.float32(0.5).tobytes()  # other weights, same graph file
    (copy / "hand.onnx.data").write_bytes(bytes(data))
    other = load_encoder(copy / "hand.onnx", device="cpu")
    assert sha256_file(copy / "hand.onnx") == sha256_file(path)  # the .onnx alone cannot tell them apart
    with pytest.raises(ContractMismatchError, match="not the same file"):
        check_encoder_matches(recorded, other)

    (copy / "hand.onnx.data").unlink()
    with pytest.raises(ModelFormatError):
        load_encoder(copy / "hand.onnx", device="cpu")


# -- ViT fusion rewrite (eager: the swapped layout computes the same) -----------------------------------------


def _small_vit(init_values=0.5):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0, init_values=init_values)
    return vit.eval()


def test_fusable_layout_computes_the_same_and_is_undone():
    from mil_export import vit_fusion

    vit = _small_vit()
    x = torch.randn(3, 3, 32, 32)
    originals = [block.attn for block in vit.blocks]
    with torch.no_grad():
        expected = vit(x)
        with vit_fusion.fusable_layout(vit) as swapped:
            assert swapped == 2 and all(isinstance(b.attn, vit_fusion.FusableAttention) for b in vit.blocks)
            rewritten = vit(x)
        after = vit(x)
    torch.testing.assert_close(rewritten, expected, rtol=1e-5, atol=1e-5)
    assert [block.attn for block in vit.blocks] == originals and "forward" not in vars(vit.blocks[0])
    assert torch.equal(after, expected)
    assert vit_fusion.vit_shape(vit) == (4, 64) and not vit_fusion.is_fusable_vit(nn.Conv2d(3, 3, 1))


# -- slow: exports of ViTs (fusion, fp16) and the command line ---------------------------------------------------


def _build(name, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-init warning is expected here
        return build_encoder(name, **kwargs)[0]


def _relative_l2(got, expected):
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def _eager(encoder, tiles):
    with torch.no_grad():
        return encoder(torch.from_numpy(tiles)).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["uni_v1", "virchow2", "phikon"])
def test_fused_vit_matches_eager(tmp_path, slide_tiles, name):
    """Every block's attention fuses (LayerScale folded, register tokens kept), and the graph still matches."""
    encoder = _build(name, depth=2)
    fused = load_encoder(export_encoder(encoder, tmp_path / "fused.onnx", name=name), device="cpu")
    plain = load_encoder(export_encoder(encoder, tmp_path / "plain.onnx", name=name, fuse=False), device="cpu")
    fusion = fused.metadata.model_config["fusion"]
    assert fusion["applied"] and fusion["attention_blocks"] == 2 and fusion["fused"]["Attention"] == 2
    assert fusion["ops_after"]["Softmax"] == 0 < fusion["ops_before"]["Softmax"]
    assert plain.metadata.model_config["fusion"] == {"applied": False}
    side = encoder.preprocessing.resized_px
    tiles = np.stack([np.asarray(Image.fromarray(t).resize((side, side))) for t in slide_tiles[:2]])
    expected = _eager(encoder, tiles)
    for runner in (fused, plain):
        assert _relative_l2(runner.encode(tiles), expected) <= PARITY_RTOL


@pytest.mark.slow
def test_fp16_network_runs_on_cpu_and_stays_close(tmp_path, slide_tiles):
    encoder = _build("uni_v1", depth=2)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    path = export_encoder(encoder, tmp_path / "half.onnx", name="uni_v1", precision="fp16")
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # fp32 model untouched
    graph = onnx.load(str(path))
    (tiles_input,), (features,) = graph.graph.input, graph.graph.output
    assert tiles_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert features.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    big = [t for t in graph.graph.initializer if np.prod(t.dims) >= 1024]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)  # the weights really are fp16
    runner = load_encoder(path, device="cpu")
    assert runner.metadata.model_config["precision"] == "fp16"
    tiles = slide_tiles[:, :224, :224]
    got, expected = runner.encode(tiles), _eager(encoder, tiles)
    assert got.dtype == np.float32
    assert 1e-5 < _relative_l2(got, expected) < 1e-2  # fp16 rounding shows, and stays small


def _cli(*args):
    from mil_export.cli import main

    return CliRunner().invoke(main, ["encoder", *map(str, args)])


def test_cli_help_lists_the_options():
    result = _cli("--help")
    assert result.exit_code == 0
    for option in ("--precision", "--no-fuse", "--check", "--weights", "-o"):
        assert option in result.output


@pytest.mark.slow
def test_cli_precision_fuse_and_check(tmp_path):
    out = tmp_path / "uni.onnx"
    result = _cli("uni_v1", "--depth", 1, "-o", out, "--check", SLIDE)
    assert result.exit_code == 0, result.output
    assert "check passed" in result.output and file_identity(out) in result.output
    assert load_encoder(out, device="cpu").metadata.model_config["fusion"]["fused"]["Attention"] == 1

    half = tmp_path / "uni16.onnx"
    result = _cli("uni_v1", "--depth", 1, "-o", half, "--precision", "fp16", "--no-fuse", "--check", SLIDE,
                  "--check-tolerance", "1e-7")  # fp16 cannot meet 1e-7: the check must fail, in one line
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--check failed" in errors[0]
    config = load_encoder(half, device="cpu").metadata.model_config
    assert config["precision"] == "fp16" and config["fusion"] == {"applied": False}


@pytest.mark.slow
def test_cli_exports_a_small_timm_vit(tmp_path):
    out = tmp_path / "vit.onnx"
    result = _cli("timm:vit_tiny_patch16_224", "-o", out)
    assert result.exit_code == 0, result.output
    config = load_encoder(out, device="cpu").metadata.model_config
    assert config["fusion"]["fused"]["Attention"] == 12 and config["precision"] == "fp32"


@pytest.mark.slow
def test_a_failed_fusion_writes_the_unfused_graph(tmp_path, monkeypatch):
    from mil_export import vit_fusion

    def broken(proto, *args):
        del proto.graph.node[:3]  # the optimizer edits the graph in place before it fails
        raise ValueError("message too large")

    monkeypatch.setattr(vit_fusion, "fuse", broken)
    encoder = TileEncoder(_small_vit(), 64, 32)
    with pytest.warns(UserWarning, match="fusion failed"):
        path = export_encoder(encoder, tmp_path / "vit.onnx", name="vit")
    runner = load_encoder(path, device="cpu")
    assert runner.metadata.model_config["fusion"] == {"applied": False, "attention_blocks": 2, "error": "ValueError"}
    tiles = _random_tiles(2, 32, 32)
    assert _relative_l2(runner.encode(tiles), _eager(encoder, tiles)) <= PARITY_RTOL


def test_cli_check_needs_a_foundation_encoder(tmp_path):
    result = _cli("tiny_cnn", "-o", tmp_path / "x.onnx", "--check", SLIDE)
    assert result.exit_code == 1 and "only the foundation encoders" in result.output
    assert not (tmp_path / "x.onnx").exists()  # refused before exporting
