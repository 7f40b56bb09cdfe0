"""Pathology foundation-model tile encoders by TRIDENT's names (issue 15): the published configurations.

One frozen `FoundationSpec` per entry holds what a graph needs to compute the published features: the
architecture (library, constructor, the exact overrides of the model card / TRIDENT's loader), the
preprocessing of its documented eval transform, which tokens form the embedding, and, for the docs, the
tile size and mpp of its paper, the weights' licence and the source of every fact (docs/encoders.md).

Nothing here downloads: `build_foundation` creates the architecture with `pretrained=False` and a seeded
random init; real weights come from a local file through `mil_export.weights.load_weights`, into
`FoundationBackbone.trunk`, whose state_dict has exactly the released checkpoint's key layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mil_export.encoders import IMAGENET_MEAN, IMAGENET_STD, RANDOM_INIT_SEED
from mil_runtime.errors import MilkitError
TRIDENT_LOAD = "https://github.com/mahmoodlab/TRIDENT/blob/main/trident/patch_encoder_models/load.py"


@dataclass(frozen=True)
class FoundationSpec:
    """A published foundation model, as milkit rebuilds it. Tuples only: the registry cannot be mutated."""

    name: str  # TRIDENT's encoder name
    title: str  # the model's published name
    library: str  # "timm" or "transformers"
    architecture: str  # timm model name, or the transformers model class
    overrides: tuple[tuple[str, Any], ...]  # constructor kwargs; layer classes by name (see _layer)
    output_dim: int
    patch_px: int
    prefix_tokens: int  # class token + register tokens ahead of the patch tokens
    embedding: str  # "class" or "class+patch_mean" (register tokens excluded from the mean)
    input_px: int  # the network's input side
    resize_px: int | None  # Resize(resize_px) then CenterCrop(input_px); None: Resize(input_px), no crop
    interpolation: str  # of the Resize: "bilinear" or "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    paper_tile_px: int
    paper_mpp: float
    paper_tiling: str  # how the paper's tiles were cut, in words
    licence: str
    weights_url: str
    sources: tuple[str, ...]
    dropped_prefixes: tuple[str, ...] = ()  # keys of released files the architecture does not use
    key_renames: tuple[tuple[str, str], ...] = field(default=())  # (old, new) substrings, applied in order

    @property
    def depth(self) -> int:
        return int(dict(self.overrides).get(_DEPTH_KEY[self.library], _FULL_DEPTH[self.architecture]))

    @property
    def patch_tokens(self) -> int:
        return (self.input_px // self.patch_px) ** 2


_DEPTH_KEY = {"timm": "depth", "transformers": "num_hidden_layers"}
# depth of the timm constructors (and transformers' ViTConfig) where the published overrides keep it
_FULL_DEPTH = {"vit_large_patch16_224": 24, "vit_huge_patch14_224": 32, "vit_giant_patch14_dinov2": 40,
               "vit_giant_patch14_reg4_dinov2": 40, "vit_giant_patch14_224": 40, "ViTModel": 12}

# transformers 5 renamed ViT's parameters; released Phikon files carry the transformers 4 names
# (the renames transformers applies itself when it loads such a file, in order)
_LEGACY_HF_VIT = (
    ("encoder.layer.", "layers."),
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
)

_SWIGLU = (("mlp_layer", "SwiGLUPacked"), ("act_layer", "SiLU"))

FOUNDATION: dict[str, FoundationSpec] = {spec.name: spec for spec in (
    FoundationSpec(
        name="uni_v1", title="UNI (ViT-L/16)", library="timm", architecture="vit_large_patch16_224",
        overrides=(("img_size", 224), ("patch_size", 16), ("init_values", 1e-5), ("num_classes", 0),
                   ("dynamic_img_size", True)),
        output_dim=1024, patch_px=16, prefix_tokens=1, embedding="class",
        input_px=224, resize_px=None, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        paper_tile_px=256, paper_mpp=0.5, paper_tiling="256 and 512 px regions at 20x (Mass-100K)",
        licence="CC-BY-NC-ND 4.0 (gated; non-commercial academic research)",
        weights_url="https://huggingface.co/MahmoodLab/UNI",
        sources=("https://huggingface.co/MahmoodLab/UNI", TRIDENT_LOAD + " (UNIInferenceEncoder)",
                 "Chen et al., Nature Medicine 2024, doi:10.1038/s41591-024-02857-3"),
    ),
    FoundationSpec(
        name="uni_v2", title="UNI2-h (ViT-H/14, 8 registers, SwiGLU)", library="timm",
        architecture="vit_giant_patch14_224",
        overrides=(("img_size", 224), ("patch_size", 14), ("depth", 24), ("num_heads", 24),
                   ("init_values", 1e-5), ("embed_dim", 1536), ("mlp_ratio", 2.66667 * 2), ("num_classes", 0),
                   ("no_embed_class", True), *_SWIGLU, ("reg_tokens", 8), ("dynamic_img_size", True)),
        output_dim=1536, patch_px=14, prefix_tokens=9, embedding="class",
        input_px=224, resize_px=None, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        paper_tile_px=256, paper_mpp=0.5, paper_tiling="not stated on the model card; UNI's 256 px at 20x assumed",
        licence="CC-BY-NC-ND 4.0 (gated; non-commercial academic research)",
        weights_url="https://huggingface.co/MahmoodLab/UNI2-h",
        sources=("https://huggingface.co/MahmoodLab/UNI2-h", TRIDENT_LOAD + " (UNIv2InferenceEncoder)"),
    ),
    FoundationSpec(
        name="virchow2", title="Virchow2 (ViT-H/14, 4 registers, SwiGLU)", library="timm",
        architecture="vit_huge_patch14_224",
        overrides=(("img_size", 224), ("init_values", 1e-5), ("num_classes", 0), ("reg_tokens", 4),
                   ("mlp_ratio", 5.3375), ("global_pool", ""), ("dynamic_img_size", True), *_SWIGLU),
        output_dim=2560, patch_px=14, prefix_tokens=5, embedding="class+patch_mean",
        input_px=224, resize_px=None, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        paper_tile_px=224, paper_mpp=0.5, paper_tiling="224 px tiles at 5x, 10x, 20x and 40x (mixed magnification)",
        licence="CC-BY-NC-ND 4.0 (gated; non-commercial academic research)",
        weights_url="https://huggingface.co/paige-ai/Virchow2",
        sources=("https://huggingface.co/paige-ai/Virchow2", TRIDENT_LOAD + " (Virchow2InferenceEncoder)",
                 "Zimmermann et al., arXiv:2408.00738"),
    ),
    FoundationSpec(
        name="gigapath", title="Prov-GigaPath tile encoder (ViT-g/16, SwiGLU)", library="timm",
        architecture="vit_giant_patch14_dinov2",
        # the hub config.json overrides DINOv2's patch 14 with 16 (TRIDENT repeats its model_args)
        overrides=(("img_size", 224), ("in_chans", 3), ("patch_size", 16), ("embed_dim", 1536), ("depth", 40),
                   ("num_heads", 24), ("mlp_ratio", 5.33334), ("num_classes", 0), ("dynamic_img_size", True)),
        output_dim=1536, patch_px=16, prefix_tokens=1, embedding="class",
        input_px=224, resize_px=256, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        paper_tile_px=256, paper_mpp=0.5, paper_tiling="256 px tiles at 0.5 um/px",
        licence="Apache-2.0 (gated: accept the terms on the hub)",
        weights_url="https://huggingface.co/prov-gigapath/prov-gigapath",
        sources=("https://huggingface.co/prov-gigapath/prov-gigapath (config.json, model card transform)",
                 TRIDENT_LOAD + " (GigaPathInferenceEncoder)", "Xu et al., Nature 2024, doi:10.1038/s41586-024-07441-w"),
    ),
    FoundationSpec(
        name="hoptimus0", title="H-optimus-0 (ViT-g/14, 4 registers)", library="timm",
        architecture="vit_giant_patch14_reg4_dinov2",
        overrides=(("num_classes", 0), ("img_size", 224), ("global_pool", "token"), ("init_values", 1e-5),
                   ("dynamic_img_size", True)),
        output_dim=1536, patch_px=14, prefix_tokens=5, embedding="class",
        input_px=224, resize_px=None, interpolation="bilinear",
        mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
        paper_tile_px=224, paper_mpp=0.5, paper_tiling="224 px tiles at 0.5 um/px",
        licence="Apache-2.0",
        weights_url="https://huggingface.co/bioptimus/H-optimus-0",
        sources=("https://huggingface.co/bioptimus/H-optimus-0", TRIDENT_LOAD + " (HOptimus0InferenceEncoder)"),
    ),
    FoundationSpec(
        name="phikon", title="Phikon (ViT-B/16, iBOT)", library="transformers", architecture="ViTModel",
        # ViTConfig's defaults are ViT-B/16 (768 wide, 12 layers and heads, MLP 3072, LayerNorm eps 1e-12)
        overrides=(("image_size", 224), ("patch_size", 16)),
        output_dim=768, patch_px=16, prefix_tokens=1, embedding="class",
        input_px=224, resize_px=None, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        paper_tile_px=224, paper_mpp=0.5, paper_tiling="224 px tiles at 20x from TCGA",
        licence="Owkin non-commercial licence (see the model card)",
        weights_url="https://huggingface.co/owkin/phikon",
        sources=("https://huggingface.co/owkin/phikon", TRIDENT_LOAD + " (PhikonInferenceEncoder)",
                 "Filiot et al., medRxiv 2023.07.21.23292757"),
        dropped_prefixes=("pooler.", "embeddings.mask_token"),  # add_pooling_layer=False; iBOT's mask token
        key_renames=_LEGACY_HF_VIT,
    ),
)}


def foundation_names() -> list[str]:
    return sorted(FOUNDATION)


def foundation_spec(name: str) -> FoundationSpec:
    if name not in FOUNDATION:
        raise MilkitError(f"unknown foundation encoder {name!r}; known: {', '.join(foundation_names())}")
    return FOUNDATION[name]


# -- embedding heads: which tokens form the feature vector ----------------------------------------


class ClassToken(nn.Module):
    """The class token of the final (normed) tokens."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]  # (batch, dim)


class ClassAndPatchMean(nn.Module):
    """Class token concatenated with the mean of the patch tokens; register tokens are in neither."""

    def __init__(self, prefix_tokens: int) -> None:
        super().__init__()
        self.prefix_tokens = int(prefix_tokens)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.prefix_tokens:]  # (batch, patch_tokens, dim)
        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)  # (batch, 2 * dim)


class FoundationBackbone(nn.Module):
    """The published model (`trunk`: its state_dict is the released checkpoint's layout) + embedding head.

    (batch, 3, input_px, input_px) normalised -> (batch, output_dim).
    """

    def __init__(self, trunk: nn.Module, spec: FoundationSpec, input_px: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = ClassAndPatchMean(spec.prefix_tokens) if spec.embedding == "class+patch_mean" else ClassToken()
        self.library = spec.library
        # transformers' ViT interpolates its position embeddings only when asked (timm: dynamic_img_size)
        self.interpolate_pos_encoding = input_px != spec.input_px

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.library == "timm":
            return self.trunk.forward_features(x)  # (batch, prefix + patches, dim), final norm applied
        output = self.trunk(pixel_values=x, interpolate_pos_encoding=self.interpolate_pos_encoding)
        return output.last_hidden_state  # (batch, 1 + patches, dim), final layernorm applied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tokens(x))  # (batch, output_dim)


# -- building ---------------------------------------------------------------------------------------


def build_foundation(name: str, *, input_px: int | None = None, depth: int | None = None):
    """(TileEncoder, dropped key prefixes) of registered foundation model `name`, seeded random weights.

    `depth` builds fewer blocks of the same type and width (tests; the key layout of the blocks kept is
    the released one). `input_px` runs the network at another multiple of its patch size (position
    embeddings interpolated, as TRIDENT's `target_img_size`); the tile is then resized to it, not cropped.
    """
    spec = foundation_spec(name)
    px = _checked_input_px(spec, input_px)
    if depth is not None and not 1 <= depth <= spec.depth:
        raise MilkitError(f"{name}: depth must be 1..{spec.depth}, got {depth}")
    with torch.random.fork_rng(devices=[]):  # a fixed init that leaves the caller's RNG alone
        torch.manual_seed(RANDOM_INIT_SEED)
        trunk = build_trunk(spec, depth)
        _vivify(trunk)
    backbone = FoundationBackbone(trunk, spec, px).eval()
    return _tile_encoder(backbone, spec, px), set(spec.dropped_prefixes)


def build_trunk(spec: FoundationSpec, depth: int | None = None) -> nn.Module:
    """The published architecture in eval mode, random init (the library's own), `depth` blocks if given."""
    kwargs = {key: _layer(value) if key in _LAYER_KEYS else value for key, value in spec.overrides}
    if depth is not None:
        kwargs[_DEPTH_KEY[spec.library]] = depth
    if spec.library == "timm":
        trunk = _timm().create_model(spec.architecture, pretrained=False, **kwargs)
    else:
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(**kwargs, attn_implementation="eager")  # plain matmul-softmax: exports as such
        trunk = ViTModel(config, add_pooling_layer=False)
    return trunk.eval()


def _timm():
    try:
        import timm
    except ImportError:
        raise MilkitError("foundation encoders need timm; install milkit[encoders]") from None
    return timm


_LAYER_KEYS = ("mlp_layer", "act_layer")  # overrides that name a layer class (specs stay plain data)


def _layer(name: str) -> Any:
    return _timm().layers.SwiGLUPacked if name == "SwiGLUPacked" else getattr(nn, name)


def _checked_input_px(spec: FoundationSpec, input_px: int | None) -> int:
    if input_px is None:
        return spec.input_px
    if input_px % spec.patch_px:
        raise MilkitError(f"{spec.name}: --input-px must be a multiple of its patch size {spec.patch_px}, "
                          f"got {input_px}")
    return int(input_px)


def _vivify(trunk: nn.Module) -> None:
    """Move a fresh init away from the near-identity the libraries start from.

    timm starts LayerScale at 1e-5 and the class/register tokens at ~1e-6, and every bias and LayerNorm
    at 0/1: a random network's features would then barely depend on its blocks, biases or norms, and a
    parity test would pass with any of them wrong. Every one of them gets an O(0.1-1) random value.
    """
    with torch.no_grad():
        for module in trunk.modules():
            if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
            elif isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
                module.bias.normal_(0.0, 0.02)
            gamma = getattr(module, "gamma", None)
            if isinstance(gamma, nn.Parameter):  # timm LayerScale
                gamma.uniform_(0.2, 0.6)
        for name, param in trunk.named_parameters():
            if name.rsplit(".", 1)[-1] in ("cls_token", "reg_token"):
                param.normal_(0.0, 0.02)


def _tile_encoder(backbone: FoundationBackbone, spec: FoundationSpec, input_px: int):
    from mil_export.encoders import Preprocessing, TileEncoder

    resize_px = spec.resize_px if input_px == spec.input_px else None  # another input size: no crop
    preprocessing = Preprocessing(input_px=input_px, resize_px=resize_px, interpolation=spec.interpolation,
                                  mean=spec.mean, std=spec.std)
    return TileEncoder(backbone, spec.output_dim, input_px, preprocessing=preprocessing)
