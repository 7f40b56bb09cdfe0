"""Model registry: `create_model("ABMIL", in_dim=1024, n_classes=2)` builds a registered model by name."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from mil_train.models.base import MILModel

_REGISTRY: dict[str, type[MILModel]] = {}
M = TypeVar("M", bound=type[MILModel])


def register_model(cls: M) -> M:
    """Class decorator: registers `cls` under `cls.name` (or its class name)."""
    name = cls.name or cls.__name__
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"model name {name!r} is already registered")
    cls.name = name
    _REGISTRY[name] = cls
    return cls


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type[MILModel]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())}") from None


def create_model(name: str, **kwargs: Any) -> MILModel:
    """The registered model `name` built with `kwargs`: its own arguments, plus `task=`, and `feat_ext=` /
    `instance_chunk=` (mil_train.feat_ext), which every registered model takes."""
    return get_model_class(name)(**kwargs)
