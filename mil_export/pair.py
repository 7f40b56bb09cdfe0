"""Exporting a model with an instance feature extractor as two files: an encoder and the MIL graph.

`export_pair(model, "m.onnx", "m.encoder.onnx")` writes the extractor as a milkit encoder (uint8
(batch, H, W, 3) tiles in, the [0, 1] scaling and normalisation inside the graph, mil_export.encoders)
and the model as the MIL graph (features in), whose metadata names the encoder and its sha256, so the
runtime refuses any other encoder. `mil-infer` runs the pair on slides, `mil_runtime.predict_images`
on an array of instance images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mil_runtime.errors import OutputError


def pair_encoder_path(mil_path: str | os.PathLike) -> Path:
    """Where `mil-export model` writes a model's own encoder: beside it, `abmil.onnx` -> `abmil.encoder.onnx`."""
    mil_path = Path(mil_path)
    return mil_path.with_name(f"{mil_path.stem}.encoder{mil_path.suffix or '.onnx'}")


def export_pair(model: Any, mil_path: str | os.PathLike, encoder_path: str | os.PathLike, *,
                tiling: dict | None = None, **mil_options: Any) -> tuple[Path, Path]:
    """Write (MIL ONNX, encoder ONNX) of a model built with `feat_ext=`; `tiling` ({"tile_px", "mpp"})
    lets mil-infer tile slides for it; other keywords go to mil_export.export_onnx."""
    from mil_export.encoders import export_encoder
    from mil_export.onnx_export import encoder_reference, export_onnx
    from mil_train.feat_ext import feat_ext_of

    extractor = feat_ext_of(model)
    if extractor is None:
        raise ValueError(f"{model.name} has no feature extractor; export it with mil_export.export_onnx")
    mil_path, encoder_path = Path(mil_path), Path(encoder_path)
    if mil_path.resolve() == encoder_path.resolve():
        raise OutputError(f"the MIL graph and the encoder need two files, both are {mil_path}")
    name = (extractor.spec or {}).get("name", "feat_ext")
    was_training = extractor.training
    try:
        export_encoder(extractor.to_tile_encoder().eval(), encoder_path, name=name, tile_px=extractor.input_px,
                       provenance={"feature_extractor": extractor.spec, "model": model.name})
    finally:
        extractor.train(was_training)
    reference, _ = encoder_reference(encoder_path, int(model.config["in_dim"]))
    export_onnx(model, mil_path, encoder=reference, tiling=tiling, **mil_options)
    return mil_path, encoder_path
