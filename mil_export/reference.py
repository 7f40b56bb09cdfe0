"""The published feature pipeline of each foundation entry, and `--check`: milkit's graph against it.

`reference_features` is what TRIDENT and the model cards compute: torchvision's transforms on PIL images
(Resize, CenterCrop, ToTensor, Normalize), the eager timm / transformers model in fp32, then the entry's
token selection, written here from the published code (TRIDENT's `forward`s), not through milkit's
embedding heads, so that a test comparing the two compares independent implementations.

`check_encoder` runs an exported graph (onnxruntime, CPU) and the reference, built from the same weights
file, on the user's own tiles (a folder of images, or a slide read with OpenSlide) and reports the
relative L2 error of the features per tile.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mil_export.foundation import foundation_spec
from mil_runtime.contract import ENCODER_OUTPUT, TILES
from mil_runtime.errors import InputNotFoundError, InvalidInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DEFAULT_CHECK_TILES = 8


def reference_transform(name: str, input_px: int | None = None):
    """The entry's documented eval transform (torchvision, on a PIL image) -> (3, px, px) float tensor."""
    from torchvision import transforms

    spec = foundation_spec(name)
    px = input_px or spec.input_px
    resize = spec.resize_px if px == spec.input_px and spec.resize_px else px
    mode = {"bilinear": transforms.InterpolationMode.BILINEAR,
            "bicubic": transforms.InterpolationMode.BICUBIC}[spec.interpolation]
    return transforms.Compose([
        transforms.Resize(resize, interpolation=mode),
        transforms.CenterCrop(px),  # identity when Resize already gave a px square
        transforms.ToTensor(),
        transforms.Normalize(mean=spec.mean, std=spec.std),
    ])


def reference_features(name: str, model: Any, images: Sequence[Any], *, input_px: int | None = None) -> np.ndarray:
    """(batch, D) float32 features of PIL `images` the published way.

    `model` is the published timm / transformers model, or a milkit TileEncoder / FoundationBackbone
    around one (its `trunk` is used; milkit's preprocessing and embedding head are not).
    """
    spec = foundation_spec(name)
    trunk = _published_model(model)
    transform = reference_transform(name, input_px)
    batch = torch.stack([transform(image.convert("RGB")) for image in images])  # (batch, 3, px, px)
    interpolate = input_px is not None and input_px != spec.input_px
    with torch.no_grad():
        features = _published_forward(spec.name, trunk.eval(), batch.to(torch.float32), interpolate)
    return features.numpy().astype(np.float32)  # (batch, D)


def _published_model(model: Any) -> torch.nn.Module:
    model = getattr(model, "backbone", model)
    return getattr(model, "trunk", model)


def _published_forward(name: str, trunk: torch.nn.Module, x: torch.Tensor, interpolate: bool) -> torch.Tensor:
    """The published `forward`s (TRIDENT's load.py) on normalised (batch, 3, px, px) input."""
    if name == "phikon":
        # ViTModel(add_pooling_layer=False): class token of last_hidden_state
        hidden = trunk(pixel_values=x, interpolate_pos_encoding=interpolate).last_hidden_state  # (batch, T, 768)
        return hidden[:, 0, :]  # (batch, 768)
    output = trunk(x)  # timm forward: forward_features + its global_pool
    if name == "virchow2":
        # global_pool="": all tokens; class token + mean of the patch tokens after the registers
        first_patch = 1 + int(trunk.num_reg_tokens)
        class_token = output[:, 0]  # (batch, 1280)
        return torch.cat([class_token, output[:, first_patch:].mean(1)], dim=-1)  # (batch, 2560)
    return output  # global_pool="token": (batch, D), the normed class token


# -- --check ---------------------------------------------------------------------------------------


@dataclass
class CheckReport:
    """Per-tile relative L2 error of an exported graph's features against the reference pipeline."""

    name: str
    onnx_path: str
    tiles: list[str]  # what each tile is: a file name, or "x,y" on the slide at level 0
    errors: np.ndarray  # (tiles,) ||graph - reference|| / ||reference||
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(len(self.errors)) and bool(np.all(self.errors <= self.tolerance))

    @property
    def worst(self) -> str:
        return self.tiles[int(np.argmax(self.errors))]

    def summary(self) -> str:
        verdict = "passed" if self.passed else f"FAILED (worst tile {self.worst})"
        return (f"{self.name}: {len(self.errors)} tiles, feature relative L2 error max {self.errors.max():.2e}, "
                f"mean {self.errors.mean():.2e} against the reference pipeline (tolerance {self.tolerance:.0e}): "
                f"{verdict}")


def check_encoder(name: str, weights: str | os.PathLike | None, onnx_path: str | os.PathLike,
                  tiles: str | os.PathLike, tolerance: float = 1e-4, *, max_tiles: int = DEFAULT_CHECK_TILES,
                  input_px: int | None = None, depth: int | None = None) -> CheckReport:
    """Compare the graph at `onnx_path` with the reference pipeline built from `weights` on `tiles`.

    `tiles`: a folder of images (all of them, sorted, at most `max_tiles`), or a slide OpenSlide opens,
    from which `max_tiles` tiles of the paper's tile size are read at level 0, spread over the slide.
    `input_px` and `depth` as the graph was built with (`depth`: reduced-depth test builds only).
    """
    from mil_export.encoders import build_encoder

    spec = foundation_spec(name)
    labels, images = read_tiles(Path(tiles), spec.paper_tile_px, max_tiles)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-init warning when weights is None: the caller knows
        encoder, _ = build_encoder(name, weights, input_px=input_px, depth=depth)
    expected = reference_features(name, encoder, images, input_px=input_px)  # (tiles, D)
    got = graph_features(onnx_path, images)  # (tiles, D)
    if got.shape != expected.shape:
        raise InvalidInputError(f"{onnx_path} gives {got.shape[1]}-d features, {name} has {expected.shape[1]}")
    errors = np.linalg.norm(got - expected, axis=1) / np.maximum(np.linalg.norm(expected, axis=1), 1e-30)
    return CheckReport(name, str(onnx_path), labels, errors.astype(np.float64), float(tolerance))


def graph_features(onnx_path: str | os.PathLike, images: Sequence[Any]) -> np.ndarray:
    """(tiles, D) features of uint8 RGB `images` through the graph, one tile per run (sizes may differ)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rows = [session.run([ENCODER_OUTPUT], {TILES: np.asarray(image.convert("RGB"))[None]})[0]
            for image in images]  # each (1, D)
    return np.concatenate(rows).astype(np.float32)


def read_tiles(path: Path, tile_px: int, max_tiles: int) -> tuple[list[str], list[Any]]:
    """(labels, PIL RGB images) from a folder of images or from a slide."""
    if path.is_dir():
        return _folder_tiles(path, max_tiles)
    if path.is_file():
        return slide_tiles(path, tile_px, max_tiles)
    raise InputNotFoundError(f"tiles not found: {path} (a folder of images or a slide)")


def _folder_tiles(folder: Path, max_tiles: int) -> tuple[list[str], list[Any]]:
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_tiles]
    if not files:
        raise InvalidInputError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [p.name for p in files], [Image.open(p).convert("RGB") for p in files]


def slide_tiles(slide_path: Path, tile_px: int, count: int) -> tuple[list[str], list[Any]]:
    """`count` tiles of tile_px at level 0, evenly spaced over the slide's row-major tile grid."""
    import openslide

    try:
        slide = openslide.OpenSlide(str(slide_path))
    except openslide.OpenSlideError as exc:
        raise InvalidInputError(f"{slide_path} is neither a folder of tiles nor a slide OpenSlide reads: {exc}") from None
    with slide:
        width, height = slide.dimensions
        columns, rows = width // tile_px, height // tile_px
        if columns * rows == 0:
            raise InvalidInputError(f"{slide_path} ({width} x {height}) is smaller than one {tile_px} px tile")
        picks = np.unique(np.linspace(0, columns * rows - 1, num=min(count, columns * rows)).round().astype(int))
        origins = [(int(i % columns) * tile_px, int(i // columns) * tile_px) for i in picks]
        images = [slide.read_region(origin, 0, (tile_px, tile_px)).convert("RGB") for origin in origins]
    return [f"{x},{y}" for x, y in origins], images
