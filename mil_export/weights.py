"""Encoder weights from local files only: a state_dict read without unpickling code, fitted strictly.

`.safetensors` files are read with safetensors; anything else with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mil_runtime.errors import InputNotFoundError, ModelFormatError


def load_weights(backbone: nn.Module, path: Path, dropped: set[str], name: str) -> None:
    """Load a state_dict file (tensors only, weights_only=True) into `backbone`, strictly."""
    if not path.is_file():
        raise InputNotFoundError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ModelFormatError(f"{path} is not a loadable state_dict ({type(exc).__name__}); save one with "
                               "torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # common checkpoint wrapper
    if not isinstance(state, dict):
        raise ModelFormatError(f"{path} holds a {type(state).__name__}, not a state_dict")
    state = {_strip_prefixes(k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in dropped)}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[1:3]
        raise ModelFormatError(
            f"{path} does not fit encoder {name!r}: {' '.join(s.strip() for s in detail)[:300]}; "
            "pass the weights of this architecture"
        ) from None


def _strip_prefixes(key: str) -> str:
    """Keys saved from DataParallel ("module.") or from a whole TileEncoder ("backbone.")."""
    for prefix in ("module.", "backbone."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key
