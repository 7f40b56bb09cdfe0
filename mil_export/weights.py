"""Encoder weights from local files only: a state_dict read without unpickling code, fitted strictly.

`.safetensors` files are read with safetensors; anything else (`.bin`, `.pth`, `.pt`) with
`torch.load(weights_only=True)`, which refuses pickled code. Key names are brought to the architecture's
layout (wrappers, the prefixes of DataParallel or of a saved TileEncoder, the renames of a foundation
entry); a file that still does not fit is refused with one line naming the first key that differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mil_runtime.errors import InputNotFoundError, ModelFormatError

# prefixes of whole-model saves: DataParallel, a TileEncoder, a FoundationBackbone, a transformers
# task model around its ViT (ViTForImageClassification saves the ViT under "vit.")
WRAPPER_PREFIXES = ("module.", "backbone.", "trunk.", "vit.")
CHECKPOINT_WRAPPERS = ("state_dict", "model")  # {"state_dict": {...}, "epoch": ...} and similar


def load_weights(backbone: nn.Module, path: Path, dropped: set[str], name: str) -> None:
    """Load a state_dict file into `backbone` (its `trunk` for a foundation entry), strictly."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"weights file not found: {path}")
    state = read_state_dict(path)
    target = getattr(backbone, "trunk", backbone)  # a foundation entry's released layout is its trunk's
    state = fit_keys(state, dropped, _key_renames(name))
    expected = target.state_dict()
    problem = first_mismatch(expected, state)
    if problem is not None:
        raise ModelFormatError(f"{path} does not fit encoder {name!r}: {problem}; pass the weights of this "
                               "architecture")
    target.load_state_dict(state, strict=True)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """{key: tensor} of a .safetensors file or a weights_only torch file (checkpoint wrappers unwrapped)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling and safetensors header errors come in many types
        raise ModelFormatError(f"{path} is not a loadable state_dict ({type(exc).__name__}); save one with "
                               "torch.save(model.state_dict(), path) or safetensors.torch.save_file") from None
    for wrapper in CHECKPOINT_WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise ModelFormatError(f"{path} holds a {type(state).__name__}, not a state_dict")
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ModelFormatError(f"{path} is not a state_dict: {not_tensors[0]!r} holds a "
                               f"{type(state[not_tensors[0]]).__name__}, not a tensor")
    return state


def fit_keys(state: dict[str, torch.Tensor], dropped: set[str], renames: tuple[tuple[str, str], ...] = ()
             ) -> dict[str, torch.Tensor]:
    """Keys in the architecture's layout: wrapper prefixes stripped, renames applied, unused keys dropped."""
    fitted = {}
    for key, value in state.items():
        key = _strip_prefixes(key)
        for old, new in renames:
            key = key.replace(old, new)
        if not any(key.startswith(prefix) for prefix in dropped):
            fitted[key] = value
    return fitted


def first_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str | None:
    """One line about the first key (in the architecture's order) that is missing or of another shape,
    else about the first key the architecture does not have; None when `found` fits."""
    for key, want in expected.items():
        if key not in found:
            return f"missing key {key!r} (expected shape {tuple(want.shape)}){_more(expected, found)}"
        if tuple(found[key].shape) != tuple(want.shape):
            return f"key {key!r} has shape {tuple(found[key].shape)}, expected {tuple(want.shape)}"
    unexpected = [key for key in found if key not in expected]
    if unexpected:
        extra = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        return f"unexpected key {unexpected[0]!r}{extra}"
    return None


def _more(expected: dict[str, Any], found: dict[str, Any]) -> str:
    missing = sum(key not in found for key in expected)
    return f" (and {missing - 1} more missing)" if missing > 1 else ""


def _strip_prefixes(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _key_renames(name: str) -> tuple[tuple[str, str], ...]:
    from mil_export.foundation import FOUNDATION

    spec = FOUNDATION.get(name)
    return spec.key_renames if spec is not None else ()
