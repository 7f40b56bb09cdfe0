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


def create_model(name: str, *, feat_ext: Any = None, instance_chunk: int | None = None, **kwargs: Any) -> MILModel:
    """The registered model `name` built with `kwargs`; with `feat_ext` (a FeatureExtractor or a registered
    spec {"name": ..., **config}, mil_train.feat_ext) it takes images and extracts their features itself,
    `instance_chunk` real instances at a time."""
    model = get_model_class(name)(**kwargs)
    if feat_ext is not None:
        from mil_train.feat_ext import attach_feat_ext
        from mil_train.feat_ext.attach import DEFAULT_INSTANCE_CHUNK

        attach_feat_ext(model, feat_ext, instance_chunk or DEFAULT_INSTANCE_CHUNK)
    elif instance_chunk is not None:
        raise ValueError("instance_chunk is for models with a feature extractor (feat_ext=)")
    return model
