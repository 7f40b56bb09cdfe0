"""Tile encoders as exportable graphs: uint8 RGB tiles in, features out, preprocessing inside.

`TileEncoder` wraps a backbone with the preprocessing a runtime must never have to know (`Preprocessing`):
uint8 NHWC -> PIL's uint8 resize of the short side + torchvision's center crop (mil_export/pil_resample.py)
-> float NCHW in [0, 1] -> (x - mean) / std, i.e. torchvision's Resize + CenterCrop + ToTensor + Normalize on a
PIL image, which is what the published encoders were trained and evaluated with. Tiles already at the input
size pass through unchanged.

Change from the first format (bilinear F.interpolate in float, antialiased, to a square): the resize now
rounds to uint8 after each pass as PIL does, and a non-square tile keeps its aspect ratio and is
center-cropped, as torchvision's Resize(int) + CenterCrop do. Square tiles at the input size are unaffected.

Registry (`build_encoder`):
  resnet50_trunc   torchvision ResNet-50 up to layer3 + global average pool: 1024-d at 224 px, ImageNet
                   mean/std (the CLAM / TRIDENT baseline). Weights from a local file only.
  tiny_cnn         four convolutions + global average pool, 64-d at 96 px: demo bundle and fast tests.
  timm:<model>     any timm model (timm installed), num_classes=0, mean/std/input size from its config.
  uni_v1, uni_v2, virchow2, gigapath, hoptimus0, phikon
                   pathology foundation models by TRIDENT's names, with their published architecture,
                   transform and token selection (mil_export/foundation.py, docs/encoders.md).
Without weights every encoder gets a fixed-seed random init and a loud warning: its features mean nothing.
"""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from mil_runtime._version import __version__
from mil_runtime.contract import BATCH_AXIS, ENCODER_OUTPUT, TILES, ModelMetadata
from mil_runtime.encoder import sha256_file
from mil_export import vit_fusion
from mil_export.onnx_files import EXTERNAL_DATA_BYTES, data_file_name, save_graph, tensor_bytes
from mil_export.pil_resample import INTERPOLATIONS, resize_crop
from mil_export.weights import load_weights
from mil_runtime.errors import MilkitError, OutputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT_SEED = 0
HEIGHT_AXIS = "height"
WIDTH_AXIS = "width"
OPSET = 18


@dataclass(frozen=True)
class Preprocessing:
    """How a tile becomes the network's input: torchvision's Resize + CenterCrop on a PIL image, then Normalize.

    The tile's short side is resized to `resize_px` (None: `input_px`) as `Resize(resize_px, interpolation)`
    does on a PIL image (PIL's uint8 two-pass resampling, see mil_export/pil_resample.py), then
    `CenterCrop(input_px)` cuts the network's square input, then ToTensor + Normalize(mean, std).
    """

    input_px: int
    resize_px: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.input_px < 1 or self.resized_px < self.input_px:
            raise ValueError(
                f"resize_px ({self.resize_px}) must be at least input_px ({self.input_px}): CenterCrop would pad"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need three channels and std > 0, got {self.mean} / {self.std}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def resized_px(self) -> int:
        return self.input_px if self.resize_px is None else int(self.resize_px)

    def to_config(self) -> dict[str, Any]:
        """The metadata's description (model_config): what a reader needs to redo the preprocessing."""
        return {
            "input_px": self.input_px,
            "resize_px": self.resized_px,
            "crop_px": self.input_px,
            "interpolation": self.interpolation,
            "mean": [round(v, 6) for v in self.mean],
            "std": [round(v, 6) for v in self.std],
            "resize": self.interpolation,  # kept from the first format: the filter's name
            "align_corners": False,
            "antialias": True,
            "rounding": "uint8 after each pass (PIL)",
        }


class TileEncoder(nn.Module):
    """uint8 (batch, H, W, 3) RGB tiles -> float32 (batch, output_dim) features, preprocessing included.

    Without `preprocessing`, tiles are resized (short side) and center-cropped to `input_px` with PIL's
    bilinear filter and normalised by `mean`/`std` (ImageNet's by default). With it, `input_px` must agree
    and `mean`/`std` must be left out or agree.
    """

    def __init__(
        self,
        backbone: nn.Module,
        output_dim: int,
        input_px: int,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        *,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        super().__init__()
        if preprocessing is None:
            preprocessing = Preprocessing(int(input_px), mean=mean or IMAGENET_MEAN, std=std or IMAGENET_STD)
        _check_agrees(preprocessing, int(input_px), mean, std)
        self.backbone = backbone
        self.output_dim = int(output_dim)
        self.input_px = preprocessing.input_px
        self.preprocessing = preprocessing
        self.network_dtype = torch.float32  # export_encoder(precision="fp16") runs the backbone in float16
        # not persistent: the state_dict holds backbone weights only, mean/std travel in metadata
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        prep = self.preprocessing
        x = resize_crop(tiles, prep.resized_px, prep.input_px, prep.interpolation)  # (batch, 3, px, px) 0..255
        x = x.to(torch.float32) / 255.0  # ToTensor
        x = (x - self.mean) / self.std  # Normalize, in float32 whatever the network runs in
        features = self.backbone(x.to(self.network_dtype))  # (batch, output_dim, ...)
        return features.flatten(1).to(torch.float32)  # (batch, output_dim)


def _check_agrees(prep: Preprocessing, input_px: int, mean: Any, std: Any) -> None:
    if input_px != prep.input_px:
        raise ValueError(f"input_px {input_px} disagrees with preprocessing.input_px {prep.input_px}")
    for label, given, kept in (("mean", mean, prep.mean), ("std", std, prep.std)):
        if given is not None and tuple(float(v) for v in given) != kept:
            raise ValueError(f"{label} {tuple(given)} disagrees with preprocessing.{label} {kept}")


class ResNetTrunk(nn.Module):
    """torchvision ResNet-50 up to layer3, then global average pool: (batch, 3, H, W) -> (batch, 1024).

    Attribute names follow torchvision, so a full resnet50 state_dict loads once fc/layer4 are dropped.
    """

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet50

        full = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = full.conv1, full.bn1, full.relu, full.maxpool
        self.layer1, self.layer2, self.layer3 = full.layer1, full.layer2, full.layer3
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (batch, 64, H/4, W/4)
        x = self.layer3(self.layer2(self.layer1(x)))  # (batch, 1024, H/16, W/16)
        return self.pool(x).flatten(1)  # (batch, 1024)


class TinyCNN(nn.Module):
    """Four 3x3 convolutions (three with stride 2) + global average pool: (batch, 3, H, W) -> (batch, 64)."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for i, out_ch in enumerate(widths):
            stride = 2 if i < len(widths) - 1 else 1
            layers += [nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1), nn.ReLU()]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        for conv in self.features:
            if isinstance(conv, nn.Conv2d):  # He init keeps features O(1), so parity tests mean something
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)  # (batch, widths[-1])


# -- registry -------------------------------------------------------------------------------------


def _resnet50_trunc(input_px: int | None) -> tuple[TileEncoder, set[str]]:
    encoder = TileEncoder(ResNetTrunk(), 1024, input_px or 224, IMAGENET_MEAN, IMAGENET_STD)
    return encoder, {"fc.", "layer4."}  # parts of a full torchvision resnet50 the trunk drops


def _tiny_cnn(input_px: int | None) -> tuple[TileEncoder, set[str]]:
    return TileEncoder(TinyCNN(), 64, input_px or 96, IMAGENET_MEAN, IMAGENET_STD), set()


def _timm(model_name: str, input_px: int | None) -> tuple[TileEncoder, set[str]]:
    try:
        import timm
    except ImportError:
        raise MilkitError("timm encoders need timm; install milkit[encoders]") from None
    try:
        backbone = timm.create_model(model_name, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise MilkitError(f"timm has no model {model_name!r} ({exc}); see timm.list_models()") from None
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    input_px = input_px or int(cfg.get("input_size", (3, 224, 224))[-1])
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    with torch.no_grad():  # the pooled width differs between families: measure it
        probe = backbone.eval()(torch.zeros(1, 3, input_px, input_px))  # (1, D)
    return TileEncoder(backbone, probe.flatten(1).shape[1], input_px, mean, std), set()


ENCODERS: dict[str, Callable[[int | None], tuple[TileEncoder, set[str]]]] = {
    "resnet50_trunc": _resnet50_trunc,
    "tiny_cnn": _tiny_cnn,
}


def foundation_names() -> list[str]:
    from mil_export.foundation import foundation_names as names

    return names()


def build_foundation(name: str, *, input_px: int | None, depth: int | None) -> tuple[TileEncoder, set[str]]:
    from mil_export.foundation import build_foundation as build

    return build(name, input_px=input_px, depth=depth)


def list_encoders() -> list[str]:
    return sorted(ENCODERS) + foundation_names() + ["timm:<model_name>"]


def build_encoder(
    name: str, weights: str | os.PathLike | None = None, *, input_px: int | None = None,
    depth: int | None = None,
) -> tuple[TileEncoder, dict[str, Any]]:
    """Build a registered encoder in eval mode, with weights from a local file or a seeded random init.

    Returns (encoder, info); info records the weights file and its sha256 (None for random init).
    `depth` builds a foundation-model entry with fewer blocks (same block types and widths): tests only.
    """
    with torch.random.fork_rng(devices=[]):  # a fixed init that leaves the caller's RNG alone
        torch.manual_seed(RANDOM_INIT_SEED)
        if name.startswith("timm:"):
            encoder, dropped = _timm(name[len("timm:"):], input_px)
        elif name in ENCODERS:
            encoder, dropped = ENCODERS[name](input_px)
        elif name in foundation_names():
            encoder, dropped = build_foundation(name, input_px=input_px, depth=depth)
        else:
            raise MilkitError(f"unknown encoder {name!r}; known: {', '.join(list_encoders())}")
    info: dict[str, Any] = {"architecture": name, "weights": None, "weights_sha256": None, "random_init": True}
    if weights is None:
        warnings.warn(
            f"encoder {name!r} has NO pretrained weights (seeded random init): its features are meaningless "
            "for real slides; pass a local weights file",
            stacklevel=2,
        )
    else:
        load_weights(encoder.backbone, Path(weights), dropped, name)
        info.update(weights=Path(weights).name, weights_sha256=sha256_file(weights), random_init=False)
    return encoder.eval(), info


# -- export --------------------------------------------------------------------------------------


PRECISIONS = ("fp32", "fp16")


def export_encoder(
    encoder: TileEncoder,
    path: str | os.PathLike,
    *,
    name: str,
    tile_px: int | None = None,
    provenance: dict[str, Any] | None = None,
    precision: str = "fp32",
    fuse: bool | None = None,
    external_data_threshold: int = EXTERNAL_DATA_BYTES,
) -> Path:
    """Write `encoder` as a milkit encoder graph, atomically.

    `tiles` is uint8 [batch, height, width, 3] with all three axes symbolic, unless `tile_px` fixes
    height = width = tile_px (recorded in the metadata's model config). `precision="fp16"` runs the
    network in float16 (tiles in, preprocessing and features stay as in fp32). `fuse` applies
    onnxruntime's attention / LayerNorm / GELU fusion (None: for ViT backbones). Graphs holding more
    than `external_data_threshold` bytes of weights are written as NAME.onnx + NAME.onnx.data.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"output folder {path.parent} does not exist; create it first")
    if precision not in PRECISIONS:
        raise MilkitError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    fusable = vit_fusion.is_fusable_vit(encoder.backbone)
    if fuse and not fusable:
        raise MilkitError(f"{name}: attention fusion needs a ViT backbone (timm blocks, or transformers ViT)")
    graph, fusion, lifted = _graph(encoder.eval(), tile_px, precision, fusable if fuse is None else fuse)
    external = tensor_bytes(graph, lifted) > external_data_threshold
    config = {**encoder.preprocessing.to_config(), "tile_px": tile_px, "precision": precision, "fusion": fusion}
    if external:
        config["external_data"] = [data_file_name(path)]
    metadata = ModelMetadata(
        kind="encoder",
        model_name=name,
        feature_dim=encoder.output_dim,
        inputs=[TILES],
        model_config=config,
        tiling=None,
        version=__version__,
        provenance=dict(provenance or {}),
    )
    metadata.validate(str(path))
    props = metadata.to_props()
    spatial = {1: HEIGHT_AXIS, 2: WIDTH_AXIS} if tile_px is None else {}

    def finish(head: Any) -> None:  # the graph without its weights: cheap to edit
        _rename_dims(head, spatial)
        for key, value in props.items():
            _set_prop(head, key, value)

    save_graph(graph, path, external=external, edit=finish, lifted=lifted)
    return path


def _graph(encoder: TileEncoder, tile_px: int | None, precision: str,
           fuse: bool) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The ONNX graph at `precision`, fused or not (an onnx_ir Model, or a fused ModelProto), the fusion
    record for the metadata, and the weights the fused graph holds as empty placeholders (by name)."""
    dtype = torch.float16 if precision == "fp16" else torch.float32
    layout = vit_fusion.fusable_layout(encoder.backbone) if fuse else contextlib.nullcontext(0)
    with _network_in(encoder, dtype), layout as swapped:
        model = _to_onnx(encoder, tile_px)
    if not fuse:
        return model, {"applied": False}, {}
    proto, lifted = vit_fusion.light_proto(model)  # the optimizer edits a ModelProto
    del model
    gc.collect()
    try:
        fused, record = vit_fusion.fuse(proto, *vit_fusion.vit_shape(encoder.backbone))
    except Exception as exc:  # the optimizer's failures have no common type (e.g. protobuf's 2 GB limit)
        warnings.warn(f"attention fusion failed ({type(exc).__name__}: {str(exc)[:200]}); the graph is written "
                      "unfused, in the layout onnxruntime's session optimizer fuses at load", stacklevel=3)
        with _network_in(encoder, dtype), vit_fusion.fusable_layout(encoder.backbone):
            graph = _to_onnx(encoder, tile_px)  # again: the optimizer edits the graph it was given in place
        return graph, {"applied": False, "attention_blocks": swapped, "error": type(exc).__name__}, {}
    changed = {op for op in set(record["ops_before"]) | set(record["ops_after"])
               if record["ops_before"].get(op, 0) != record["ops_after"].get(op, 0)}
    return fused, {
        "applied": True,
        "attention_blocks": swapped,
        "fused": record["fusions"],
        "ops_before": {op: record["ops_before"].get(op, 0) for op in sorted(changed)},
        "ops_after": {op: record["ops_after"].get(op, 0) for op in sorted(changed)},
    }, lifted


@contextlib.contextmanager
def _network_in(encoder: TileEncoder, dtype: torch.dtype) -> Iterator[None]:
    """Run the backbone in `dtype` for the export; its float32 tensors are put back untouched afterwards."""
    if dtype == torch.float32:
        yield
        return
    tensors = [t for t in list(encoder.backbone.parameters()) + list(encoder.backbone.buffers())
               if t.is_floating_point()]
    originals = [t.data for t in tensors]
    try:
        for tensor, original in zip(tensors, originals):
            tensor.data = original.to(dtype)
        encoder.network_dtype = dtype
        yield
    finally:
        for tensor, original in zip(tensors, originals):
            tensor.data = original
        encoder.network_dtype = torch.float32


def _set_prop(proto: Any, key: str, value: str) -> None:
    for prop in proto.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value


def _to_onnx(encoder: TileEncoder, tile_px: int | None) -> Any:
    """torch.export first (dynamic axes stay real), then the ONNX exporter on the exported program."""
    side = tile_px or encoder.input_px + 1  # an example size unlike any constant in the graph
    example = torch.zeros(2, side, side, 3, dtype=torch.uint8)  # (batch, H, W, 3)
    axes: dict[int, Any] = {0: torch.export.Dim(BATCH_AXIS, min=1)}
    if tile_px is None:
        axes[1] = torch.export.Dim(HEIGHT_AXIS, min=1)
        axes[2] = torch.export.Dim(WIDTH_AXIS, min=1)
    with torch.no_grad():
        program = torch.export.export(encoder, (example,), dynamic_shapes={"tiles": axes})
    onnx_program = torch.onnx.export(
        program, dynamo=True, input_names=[TILES], output_names=[ENCODER_OUTPUT], opset_version=OPSET,
        verbose=False,
    )
    # the onnx_ir model, whose initializers are the torch tensors themselves: `model_proto` would copy
    # every weight into protobuf; save_graph serializes them one at a time instead
    model = onnx_program.model
    for value in model.graph.initializers.values():
        tensor = value.const_value  # the parameter itself: _network_in puts its fp32 data back in place later
        if isinstance(getattr(tensor, "raw", None), torch.Tensor):
            value.const_value = type(tensor)(tensor.raw.detach(), name=tensor.name)  # same storage, own tensor
    del onnx_program, program
    gc.collect()
    return model


def _rename_dims(proto: Any, spatial: dict[int, str]) -> None:
    """Give the exporter's symbols (s0, s1, ...) the contract's names everywhere they appear."""
    tiles = next(i for i in proto.graph.input if i.name == TILES)
    dims = tiles.type.tensor_type.shape.dim
    renames = {dims[0].dim_param: BATCH_AXIS}
    renames.update({dims[axis].dim_param: label for axis, label in spatial.items()})
    infos = list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info)
    for info in infos:
        for dim in info.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]
