"""The models the server offers, each loaded once per process (one MILRunner and one encoder per file;
onnxruntime sessions are safe to run from several threads)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mil_runtime.errors import ContractMismatchError, MilkitError


@dataclass
class ModelEntry:
    id: str
    path: Path
    runner: Any  # MILRunner
    encoder: Any  # TileEncoderRunner, or None when none was found (the model then only serves /v1/predict)
    encoder_error: str | None = None

    @property
    def sha256(self) -> str:
        return self.runner.sha256

    @property
    def classes(self) -> list[str]:
        return list(self.runner.class_names)

    def describe(self) -> dict[str, Any]:
        meta = self.runner.metadata
        tiling = meta.tiling
        encoder = meta.encoder.name if meta.encoder is not None else (self.encoder.name if self.encoder else None)
        return {"id": self.id, "name": meta.model_name, "class_names": self.classes, "encoder": encoder,
                "tile_size": tiling.tile_px if tiling else None, "mpp": tiling.mpp if tiling else None,
                "sha256": self.sha256, "class_attention": bool(self.runner.has_class_attention),
                "slides": self.encoder is not None}

    def require_encoder(self) -> None:
        if self.encoder is None:
            raise ContractMismatchError(f"model {self.id} has no encoder on this server ({self.encoder_error}); "
                                        "start mil-serve with the encoder next to the model")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:64] or "model"


def load_models(paths: list[Path], encoder_paths: dict | None = None, device: str = "auto") -> dict[str, ModelEntry]:
    """{id: ModelEntry}. Ids are the file stems, made unique with the sha256 where two files share one.
    The server's process keeps the MIL models (re-aggregation, /v1/predict); job processes load their own."""
    from mil_runtime.encoder import find_encoder, load_encoder
    from mil_runtime.model import load_model

    encoder_paths = {str(Path(k).resolve()): v for k, v in (encoder_paths or {}).items()}
    loaded: list[tuple[Path, Any, Any, str | None]] = []
    encoders: dict[Path, Any] = {}
    seen: set[Path] = set()
    for path in paths:
        path = Path(path).resolve()
        if path in seen:
            continue
        seen.add(path)
        runner = load_model(path, device=device)
        encoder, error = None, None
        if runner.metadata.tiling is not None:
            try:
                where = find_encoder(path, runner.metadata, encoder_paths.get(str(path))).resolve()
                if where not in encoders:
                    encoders[where] = load_encoder(where, device=device)
                encoder = encoders[where]
            except MilkitError as exc:
                error = " ".join(str(exc).split())
        loaded.append((path, runner, encoder, error))
    stems = [_slug(p.stem) for p, *_ in loaded]
    entries: dict[str, ModelEntry] = {}
    for (path, runner, encoder, error), stem in zip(loaded, stems):
        model_id = stem if stems.count(stem) == 1 else f"{stem}-{runner.sha256[:8]}"
        while model_id in entries:
            model_id += "_"
        entries[model_id] = ModelEntry(model_id, path, runner, encoder, error)
    return entries
