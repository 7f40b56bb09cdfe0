"""Checkpoints: a plain dict of tensors, strings and numbers, loadable with `weights_only=True`.

Layout: {"format": "milkit-checkpoint", "format_version": 1, "model_name": str, "config": dict,
         "state_dict": dict[str, Tensor], "class_names": list[str] | None,
         "encoder": dict | None, "tiling": dict | None, "provenance": dict,
         "feature_stats": dict | None,   (the training features' statistics, mil_train.feature_stats;
                                          absent in older checkpoints)
         "training_state": dict}         (only in the Trainer's last checkpoint, what resuming needs:
                                          optimizer, RNG and loader states, history, best weights)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mil_train.models import MILModel, create_model

FORMAT = "milkit-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(
    model: MILModel,
    path: str | os.PathLike,
    *,
    class_names: list[str] | None = None,
    encoder: dict[str, Any] | None = None,
    tiling: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    feature_stats: dict[str, Any] | None = None,
    training_state: dict[str, Any] | None = None,
) -> Path:
    """Write atomically (temp file, then rename) so a crash never leaves half a checkpoint.

    A model with an unregistered feature extractor is refused (ValueError): the checkpoint could not
    rebuild it from a name and config under weights_only=True."""
    from mil_train.feat_ext import feat_ext_of, feature_extractor_spec

    if feat_ext_of(model) is not None:
        feature_extractor_spec(model.feat_ext)
    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model.name,
        "config": dict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "class_names": class_names,
        "encoder": encoder,
        "tiling": tiling,
        "provenance": provenance or {},
        "feature_stats": feature_stats,
    }
    if training_state is not None:
        payload["training_state"] = training_state
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint_payload(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's dict, read with `weights_only=True`, without building the model."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a milkit checkpoint (save it with mil_train.save_checkpoint)")
    return payload


def load_checkpoint(path: str | os.PathLike) -> tuple[MILModel, dict[str, Any]]:
    """Rebuild the model by registry name and load its weights; returns (model in eval mode, payload)."""
    payload = load_checkpoint_payload(path)
    model = create_model(payload["model_name"], **payload["config"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, payload
