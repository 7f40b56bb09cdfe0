"""Tile encoders at inference: load an exported encoder, encode uint8 tiles, and check it fits a MIL model.

numpy + onnxruntime only. The encoder graph (DESIGN.md section 4) takes `tiles` uint8 [batch, H, W, 3]
RGB and returns `features` float32 [batch, D]; resizing and mean/std normalisation are inside the graph,
so this module never needs an encoder's preprocessing constants.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from mil_runtime.contract import ENCODER_OUTPUT, TILES, ModelMetadata
from mil_runtime.errors import ContractMismatchError, InputNotFoundError, InvalidInputError, ModelFormatError
from mil_runtime.session import Session, SessionRunner, open_session, sha256_file  # sha256_file: re-exported

DEFAULT_ENCODER_FILENAME = "encoder.onnx"


def encoder_filename(name: str) -> str:
    """File name an encoder called `name` gets next to a model: unsafe characters become "_".

    "resnet50_trunc" -> "resnet50_trunc.onnx"; "timm:vit_small_patch16_224" -> "timm_vit_small_patch16_224.onnx".
    """
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".onnx"


class TileEncoderRunner(SessionRunner):
    """An exported tile encoder in an onnxruntime session: `encode(tiles) -> features`."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        meta = session.metadata
        self.input_px: int | None = meta.model_config.get("input_px")
        # tile_px is None when the file takes any tile size (symbolic height and width)
        self.tile_px: int | None = meta.model_config.get("tile_px")

    @property
    def name(self) -> str:
        return self.metadata.model_name

    @property
    def output_dim(self) -> int:
        return self.metadata.feature_dim

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        """Features of a batch of tiles: uint8 (batch, H, W, 3) RGB -> float32 (batch, D)."""
        tiles = self._checked(tiles)
        features = self.session.inference.run([ENCODER_OUTPUT], {TILES: tiles})[0]  # (batch, D)
        return features

    def _checked(self, tiles: np.ndarray) -> np.ndarray:
        if not isinstance(tiles, np.ndarray):
            raise InvalidInputError(f"tiles must be a numpy array, got {type(tiles).__name__}")
        if tiles.dtype != np.uint8:
            raise InvalidInputError(
                f"tiles must be uint8 RGB (0-255), got {tiles.dtype}; convert with np.asarray(img, np.uint8)"
            )
        if tiles.ndim != 4 or tiles.shape[-1] != 3:
            hint = " (one tile: pass tiles[None])" if tiles.ndim == 3 else ""
            raise InvalidInputError(f"tiles must have shape (batch, H, W, 3) RGB, got {tiles.shape}{hint}")
        if min(tiles.shape[:3]) < 1:
            raise InvalidInputError(f"tiles must hold at least one non-empty tile, got shape {tiles.shape}")
        if self.tile_px is not None and tiles.shape[1:3] != (self.tile_px, self.tile_px):
            raise InvalidInputError(
                f"{self.path.name} takes {self.tile_px}x{self.tile_px} tiles, got "
                f"{tiles.shape[1]}x{tiles.shape[2]}; read tiles at {self.tile_px} px or re-export the "
                "encoder without --tile-px"
            )
        return np.ascontiguousarray(tiles)


def load_encoder(path: str | os.PathLike, device: str = "auto", threads: int | None = None) -> TileEncoderRunner:
    """Open an exported encoder; refuse files that are not milkit encoders (ModelFormatError)."""
    session = open_session(path, device=device, threads=threads)
    if session.metadata.kind != "encoder":
        raise ModelFormatError(
            f"{session.path} is a {session.metadata.kind!r} model, not a tile encoder; pass the encoder "
            "file (made with `mil-export encoder`)"
        )
    names = [i.name for i in session.inference.get_inputs()]
    if names != [TILES]:
        raise ModelFormatError(f"{session.path}: encoder inputs are {names}, expected ['{TILES}']; re-export it")
    return TileEncoderRunner(session)


def weights_sha256(encoder) -> str | None:
    """sha256 of the weights file an encoder was exported from (its provenance); None for random init."""
    metadata = getattr(encoder, "metadata", None)
    return (getattr(metadata, "provenance", None) or {}).get("weights_sha256")


def check_encoder_matches(mil_metadata: ModelMetadata, encoder: TileEncoderRunner) -> None:
    """Refuse an encoder the MIL model was not trained on (ContractMismatchError): name, dim, weights, sha256.

    The feature dimension is always checked; name, the weights' sha256 and the file's sha256 only where the
    model records them.
    """
    where = f"encoder {encoder.path}"
    fix = "pass --encoder with the encoder file the model was trained on"
    ref = mil_metadata.encoder
    if ref is not None and ref.name != encoder.name:
        raise ContractMismatchError(f"the model expects encoder {ref.name!r} but {where} is {encoder.name!r}; {fix}")
    expected_dim = ref.output_dim if ref is not None else mil_metadata.feature_dim
    for dim in {expected_dim, mil_metadata.feature_dim}:
        if dim != encoder.output_dim:
            raise ContractMismatchError(
                f"the model expects {dim}-d features but {where} gives {encoder.output_dim}-d; {fix}"
            )
    weights = weights_sha256(encoder)
    if ref is not None and ref.weights_sha256 and weights != ref.weights_sha256:
        found = f"weights {weights[:12]}..." if weights else "no recorded weights (random init?)"
        raise ContractMismatchError(
            f"{where} is {ref.name!r} exported from other weights than the model was trained on ({found} vs "
            f"recorded {ref.weights_sha256[:12]}...); {fix}"
        )
    if ref is not None and ref.sha256 and ref.sha256 != encoder.sha256:
        raise ContractMismatchError(
            f"{where} is {ref.name!r} but not the same file the model was trained with (sha256 "
            f"{encoder.sha256[:12]}... vs recorded {ref.sha256[:12]}...: other weights?); {fix}"
        )


def find_encoder(
    model_path: str | os.PathLike, mil_metadata: ModelMetadata, explicit: str | os.PathLike | None = None
) -> Path:
    """Where the encoder for a MIL model is.

    Rule: `explicit` (the --encoder option) when given; it must exist. Otherwise, in the model file's
    folder, the first existing of `<model stem>.encoder.onnx` (the encoder `mil-export model` writes
    beside a model trained with its own feature extractor), `encoder_filename(<recorded encoder name>)`
    (e.g. resnet50_trunc.onnx) and then `encoder.onnx`. Whatever is found is only a candidate: `check_encoder_matches` verifies it.
    Raises InputNotFoundError naming the paths looked at and asking for --encoder.
    """
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise InputNotFoundError(f"encoder file not found: {path}")
        return path
    folder = Path(model_path).resolve().parent
    ref = mil_metadata.encoder
    names = [f"{Path(model_path).stem}.encoder.onnx"] if ref is not None else []
    names += ([encoder_filename(ref.name)] if ref is not None else []) + [DEFAULT_ENCODER_FILENAME]
    candidates = [folder / name for name in dict.fromkeys(names)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    wanted = f"encoder {ref.name!r}" if ref is not None else "an encoder (the model records none)"
    looked = ", ".join(str(c) for c in candidates)
    raise InputNotFoundError(f"the model needs {wanted}; none found at {looked}; pass --encoder PATH")
