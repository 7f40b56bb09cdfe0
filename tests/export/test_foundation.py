"""Foundation-model encoders (issue 15): registry specs, weights files, and milkit == the published pipeline.

Truth here is independent of mil_export.foundation: the published numbers (dims, token counts, parameter
counts) are written out, and "TRIDENT-style" extraction rebuilds each model from the kwargs of its model
card / TRIDENT's loader written out below, loads the weights file strictly with `torch.load`, runs
torchvision's transforms on PIL images and the published token selection. Models are built at reduced
depth (same block types and widths, the released key layout) with random weights.

Tolerance: relative L2 of the features <= 1e-4 (onnxruntime against eager fp32).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mil_export.encoders import build_encoder, export_encoder
from mil_export.foundation import FOUNDATION, build_foundation, build_trunk, foundation_names
from mil_export.reference import check_encoder, graph_features, reference_features, slide_tiles
from mil_export.weights import load_weights
from mil_runtime.errors import ModelFormatError

SLIDE = Path(__file__).resolve().parents[1] / "data" / "CMU-1-Small-Region.svs"
REL_L2 = 1e-4
# blocks per entry in the slow parity tests: two where a second block is cheap (indices beyond 0 in the
# key layout and Phikon's renames), one for the ViT-H/g widths (each of their blocks is 30-50 M parameters)
TEST_DEPTH = {"uni_v1": 2, "phikon": 2, "uni_v2": 1, "virchow2": 1, "gigapath": 1, "hoptimus0": 1}
PARITY_TILES = 4

# published facts, from the issue / model cards: feature dim, and tokens at 224 px (class + registers + patches)
PUBLISHED = {
    "uni_v1": dict(dim=1024, tokens=1 + 14 * 14, params=303e6),
    "uni_v2": dict(dim=1536, tokens=1 + 8 + 16 * 16, params=681e6),
    "virchow2": dict(dim=2560, tokens=1 + 4 + 16 * 16, params=632e6),
    "gigapath": dict(dim=1536, tokens=1 + 14 * 14, params=1.13e9),
    "hoptimus0": dict(dim=1536, tokens=1 + 4 + 16 * 16, params=1.13e9),
    "phikon": dict(dim=768, tokens=1 + 14 * 14, params=86e6),
}


def _build(name, weights=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-init warning is expected here
        return build_encoder(name, weights, **kwargs)[0]


def _rel_l2(got, expected):
    return np.linalg.norm(got - expected, axis=1) / np.linalg.norm(expected, axis=1)  # (batch,)


# -- TRIDENT-style extraction, written from the published configurations --------------------------


def _trident_model(name, depth):
    """The model as TRIDENT's load.py / the model card builds it, `depth` blocks."""
    import timm
    from timm.layers import SwiGLUPacked

    swiglu = dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
    if name == "phikon":
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(num_hidden_layers=depth, attn_implementation="eager")  # ViT-B/16 defaults
        return ViTModel(config, add_pooling_layer=False)
    arch, kwargs = {
        "uni_v1": ("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                                                  dynamic_img_size=True)),
        "uni_v2": ("vit_giant_patch14_224", dict(img_size=224, patch_size=14, num_heads=24, init_values=1e-5,
                                                  embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0,
                                                  no_embed_class=True, reg_tokens=8, dynamic_img_size=True,
                                                  **swiglu)),
        "virchow2": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4,
                                                   mlp_ratio=5.3375, global_pool="", dynamic_img_size=True,
                                                   **swiglu)),
        "gigapath": ("vit_giant_patch14_dinov2", dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536,
                                                       num_heads=24, mlp_ratio=5.33334, num_classes=0,
                                                       dynamic_img_size=True)),
        "hoptimus0": ("vit_giant_patch14_reg4_dinov2", dict(num_classes=0, img_size=224, global_pool="token",
                                                             init_values=1e-5, dynamic_img_size=True)),
    }[name]
    return timm.create_model(arch, pretrained=False, depth=depth, **kwargs)


def _trident_transform(name):
    from torchvision import transforms as T

    imagenet = T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    bicubic = T.InterpolationMode.BICUBIC
    return T.Compose({
        "uni_v1": [T.Resize(224), T.CenterCrop(224), T.ToTensor(), imagenet],
        "uni_v2": [T.Resize(224), T.CenterCrop(224), T.ToTensor(), imagenet],
        "virchow2": [T.Resize(224, interpolation=bicubic), T.ToTensor(), imagenet],
        "gigapath": [T.Resize(256, interpolation=bicubic), T.CenterCrop(224), T.ToTensor(), imagenet],
        "hoptimus0": [T.Resize(224), T.ToTensor(),
                      T.Normalize(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517))],
        "phikon": [T.Resize((224, 224), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                   T.ToTensor(), imagenet],
    }[name])


def _trident_forward(name, model, x):
    if name == "phikon":
        return model(pixel_values=x).last_hidden_state[:, 0, :]
    out = model(x)
    if name == "virchow2":
        return torch.cat([out[:, 0], out[:, 5:].mean(1)], dim=-1)
    return out


def _trident_features(name, weights, images, depth):
    model = _trident_model(name, depth)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    batch = torch.stack([_trident_transform(name)(image) for image in images])  # (batch, 3, 224, 224)
    with torch.no_grad():
        return _trident_forward(name, model.eval(), batch).numpy()  # (batch, D)


def _trained_state(trunk, seed=1):
    """The trunk's weights moved off the registry's seeded init: stands in for released weights."""
    generator = torch.Generator().manual_seed(seed)
    return {key: (value + 0.01 * torch.randn(value.shape, generator=generator)).contiguous()
            for key, value in trunk.state_dict().items()}


# -- specs (quick) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def depth_one_shapes():
    """Every entry at depth 1 on the meta device: shapes only, nothing allocated or computed."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return {name: build_foundation(name, depth=1)[0] for name in foundation_names()}


@pytest.fixture(scope="module")
def uni_depth_one():
    return _build("uni_v1", depth=1)


def test_registry_has_tridents_names():
    assert set(foundation_names()) >= set(PUBLISHED)
    for name in PUBLISHED:
        spec = FOUNDATION[name]
        assert spec.sources and spec.licence and spec.weights_url.startswith("https://huggingface.co/")
        assert spec.paper_tile_px > 0 and 0 < spec.paper_mpp <= 2


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_depth_one_build_has_published_dims_and_tokens(depth_one_shapes, name):
    encoder = depth_one_shapes[name]
    with torch.device("meta"):
        tokens = encoder.backbone.tokens(torch.zeros(2, 3, 224, 224))  # (batch, tokens, width)
        features = encoder.backbone.head(tokens)  # (batch, D)
    assert tokens.shape[1] == PUBLISHED[name]["tokens"]
    assert tuple(features.shape) == (2, PUBLISHED[name]["dim"]) == (2, encoder.output_dim)


def test_random_init_is_not_near_identity(uni_depth_one):
    """timm's init (LayerScale 1e-5, class token 1e-6) would make the blocks all but invisible."""
    backbone = uni_depth_one.backbone
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_blocks = backbone(x)  # (1, 1024)
        blocks, backbone.trunk.blocks = backbone.trunk.blocks, torch.nn.Sequential()
        try:
            without_blocks = backbone(x)  # (1, 1024): patch embedding + norm only
        finally:
            backbone.trunk.blocks = blocks
    assert _rel_l2(with_blocks.numpy(), without_blocks.numpy()).min() > 0.1


def test_full_size_parameter_counts_match_the_papers():
    for name, facts in PUBLISHED.items():
        with torch.device("meta"):  # shapes only: nothing allocated
            trunk = build_trunk(FOUNDATION[name])
        count = sum(p.numel() for p in trunk.parameters())
        assert abs(count - facts["params"]) / facts["params"] < 0.01, (name, count)


def test_input_px_must_be_a_multiple_of_the_patch():
    from mil_runtime.errors import MilkitError

    with pytest.raises(MilkitError, match="multiple of its patch size 14"):
        _build("virchow2", depth=1, input_px=230)


# -- weights files (quick) -------------------------------------------------------------------------


@pytest.mark.faults
def test_wrong_shape_file_is_refused_naming_the_key(uni_depth_one, tmp_path):
    from safetensors.torch import save_file

    encoder = uni_depth_one
    state = encoder.backbone.trunk.state_dict()
    bad = dict(state, pos_embed=torch.zeros(1, 257, 1024))  # a 256 px grid instead of 224's
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelFormatError) as caught:
        load_weights(encoder.backbone, tmp_path / "bad.safetensors", set(), "uni_v1")
    message = str(caught.value)
    assert "'pos_embed'" in message and "(1, 257, 1024)" in message and "(1, 197, 1024)" in message
    assert "\n" not in message

    missing = {k: v for k, v in state.items() if k != "blocks.0.ls1.gamma"}
    torch.save(missing, tmp_path / "missing.bin")
    with pytest.raises(ModelFormatError, match=r"missing key 'blocks\.0\.ls1\.gamma' \(expected shape \(1024,\)\)"):
        load_weights(encoder.backbone, tmp_path / "missing.bin", set(), "uni_v1")

    torch.save(dict(state, **{"head.weight": torch.zeros(2, 1024)}), tmp_path / "extra.pth")
    with pytest.raises(ModelFormatError, match=r"unexpected key 'head\.weight'$|unexpected key 'head\.weight';"):
        load_weights(encoder.backbone, tmp_path / "extra.pth", set(), "uni_v1")


@pytest.mark.faults
def test_another_entrys_weights_are_refused(depth_one_shapes, tmp_path):
    shapes = depth_one_shapes["hoptimus0"].backbone.trunk.state_dict()
    torch.save({key: torch.zeros(value.shape) for key, value in shapes.items()}, tmp_path / "hoptimus0.bin")
    with pytest.raises(ModelFormatError, match=r"does not fit encoder 'uni_v2': key 'reg_token' has shape "
                                               r"\(1, 4, 1536\), expected \(1, 8, 1536\)"):
        load_weights(depth_one_shapes["uni_v2"].backbone, tmp_path / "hoptimus0.bin", set(), "uni_v2")


def test_round_trip_safetensors_and_bin(uni_depth_one, tmp_path):
    from safetensors.torch import save_file

    trained = _trained_state(uni_depth_one.backbone.trunk)
    save_file(trained, str(tmp_path / "model.safetensors"))
    torch.save(trained, tmp_path / "pytorch_model.bin")
    for file in ("model.safetensors", "pytorch_model.bin"):
        loaded = _build("uni_v1", tmp_path / file, depth=1).backbone.trunk.state_dict()
        assert loaded.keys() == trained.keys()
        assert all(torch.equal(loaded[k], trained[k]) for k in trained), file


def test_phikon_transformers4_layout_loads(tmp_path):
    """Released Phikon files carry transformers 4 names (encoder.layer.N.attention.attention.query ...)."""
    trained = _trained_state(_build("phikon", depth=1).backbone.trunk)
    legacy = {}
    for key, value in trained.items():  # the old names, written out independently of the loader
        old = key.replace("layers.", "encoder.layer.")
        for new_part, old_part in (("attention.q_proj", "attention.attention.query"),
                                   ("attention.k_proj", "attention.attention.key"),
                                   ("attention.v_proj", "attention.attention.value"),
                                   ("attention.o_proj", "attention.output.dense"),
                                   ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
            old = old.replace(new_part, old_part)
        legacy[f"vit.{old}"] = value  # as a ViTForImageClassification would save it
    legacy["vit.pooler.dense.weight"] = torch.zeros(768, 768)  # add_pooling_layer=False drops it
    assert "vit.encoder.layer.0.attention.attention.query.weight" in legacy
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    loaded = _build("phikon", tmp_path / "pytorch_model.bin", depth=1).backbone.trunk.state_dict()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)


# -- milkit graph == reference == TRIDENT-style, on real tiles (slow: one export each) -------------


@pytest.fixture(scope="module", params=sorted(PUBLISHED))
def exported(request, tmp_path_factory):
    """(name, weights .bin, onnx path): random 'released' weights saved, loaded from .safetensors, exported."""
    from safetensors.torch import save_file

    name = request.param
    folder = tmp_path_factory.mktemp(name)
    trained = _trained_state(_build(name, depth=TEST_DEPTH[name]).backbone.trunk)
    save_file(trained, str(folder / "model.safetensors"))
    torch.save(trained, folder / "pytorch_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # weights given: no random-init warning may come
        encoder, info = build_encoder(name, folder / "model.safetensors", depth=TEST_DEPTH[name])
    path = export_encoder(encoder, folder / f"{name}.onnx", name=name, provenance=info)
    return name, folder / "pytorch_model.bin", path, encoder


@pytest.mark.slow
def test_graph_equals_reference_and_trident_style_on_real_tiles(exported):
    name, weights, path, encoder = exported
    _, images = slide_tiles(SLIDE, FOUNDATION[name].paper_tile_px, PARITY_TILES)
    assert images[0].size == (FOUNDATION[name].paper_tile_px,) * 2
    graph = graph_features(path, images)  # (tiles, D) onnxruntime on uint8 tiles
    reference = reference_features(name, encoder, images)  # torchvision on PIL + eager fp32
    # the model rebuilt from the published kwargs, the weights from the .bin: this also shows that the graph
    # holds the file's weights (the seeded init differs from them by 1% noise on every tensor)
    trident = _trident_features(name, weights, images, TEST_DEPTH[name])
    errors = {"graph-reference": _rel_l2(graph, reference).max(), "graph-trident": _rel_l2(graph, trident).max(),
              "reference-trident": _rel_l2(reference, trident).max()}
    print(f"\n{name} depth {TEST_DEPTH[name]} tiles {images[0].size[0]} px: "
          + ", ".join(f"{key} {value:.2e}" for key, value in errors.items()))
    assert graph.shape == (PARITY_TILES, PUBLISHED[name]["dim"])
    assert errors["graph-reference"] <= REL_L2 and errors["graph-trident"] <= REL_L2
    assert errors["reference-trident"] <= 1e-5  # same eager model, same transforms


@pytest.mark.slow
def test_graph_records_the_registry_name_and_the_weights_sha256(exported):
    import hashlib

    import onnx

    from mil_runtime.contract import ModelMetadata

    name, _, path, _ = exported
    proto = onnx.load(str(path), load_external_data=False)
    meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props}, source=str(path))
    safetensors_file = path.parent / "model.safetensors"
    assert meta.model_name == name and meta.feature_dim == PUBLISHED[name]["dim"]
    assert meta.provenance["weights_sha256"] == hashlib.sha256(safetensors_file.read_bytes()).hexdigest()
    assert meta.provenance["random_init"] is False


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_other_input_px_matches_the_reference(name):
    """--input-px: position embeddings interpolated (timm dynamic_img_size, transformers
    interpolate_pos_encoding), the tile resized to it without a crop, as TRIDENT's target_img_size."""
    spec = FOUNDATION[name]
    px = spec.patch_px * 20  # 280 or 320 px: another token grid than the native 224's
    encoder = _build(name, depth=1, input_px=px)
    _, images = slide_tiles(SLIDE, 300, 2)
    with torch.no_grad():
        milkit = encoder(torch.from_numpy(np.stack([np.asarray(image) for image in images]))).numpy()
        tokens = encoder.backbone.tokens(torch.zeros(1, 3, px, px))  # (1, tokens, width)
    assert tokens.shape[1] == spec.prefix_tokens + 20 * 20
    assert _rel_l2(milkit, reference_features(name, encoder, images, input_px=px)).max() <= 1e-5


@pytest.mark.slow
def test_check_encoder_passes_and_catches_other_weights(exported, tmp_path):
    name, weights, path, _ = exported
    if name not in ("uni_v1", "virchow2"):
        pytest.skip("one ClassToken and one class+patch-mean entry (bilinear, bicubic) are enough for --check")
    report = check_encoder(name, weights, path, SLIDE, max_tiles=3, depth=TEST_DEPTH[name])
    assert report.passed and len(report.errors) == 3, report.summary()
    assert "passed" in report.summary()
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i, image in enumerate(slide_tiles(SLIDE, 300, 2)[1]):  # a size that needs a real resize to 224
        image.save(tiles / f"t{i}.png")
    resized = check_encoder(name, weights, path, tiles, depth=TEST_DEPTH[name])
    assert resized.passed and len(resized.errors) == 2, resized.summary()
    other = check_encoder(name, None, path, tiles, depth=TEST_DEPTH[name])  # the seeded init, not the file's
    assert not other.passed and "FAILED" in other.summary()
    print(f"\n{report.summary()}\n{resized.summary()}\n{other.summary()}")
