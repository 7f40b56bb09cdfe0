"""Feature extractors by name: `create_feature_extractor("small_cnn", out_dim=32)`, like create_model.

A checkpoint rebuilds a model from `create_model(name, **config)` under `weights_only=True`, so a
model's extractor must be rebuildable from a name and a JSON config too. Registered:
  small_cnn            SmallCNN (widths, out_dim), input_px 8, mean = std = 0.5: digits and small tiles
  tiny_cnn             the demo encoder's CNN (64-d), input_px 96, ImageNet mean/std
  resnet50_trunc       torchvision ResNet-50 to layer3 + average pool (1024-d), input_px 224
  torchvision:<model>  any torchvision classification model, its classifier removed, input_px 224
  timm:<model>         any timm model, num_classes=0, input size and mean/std from its config
Backbones start from a fixed-seed random init (nothing is downloaded); load weights into
`extractor.backbone` yourself. An unregistered FeatureExtractor trains and exports from Python, but a
checkpoint of it cannot be saved.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import torch
from torch import nn

from mil_train.feat_ext.extractor import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor
from mil_train.feat_ext.small_cnn import SmallCNN

Builder = Callable[..., FeatureExtractor]
_REGISTRY: dict[str, Builder] = {}
_PREFIXES: dict[str, Callable[..., FeatureExtractor]] = {}
RANDOM_INIT_SEED = 0


def register_feature_extractor(name: str) -> Callable[[Builder], Builder]:
    """Decorator: `builder(**config) -> FeatureExtractor` registered under `name`."""
    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"feature extractor {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder
    return decorate


def list_feature_extractors() -> list[str]:
    return sorted(_REGISTRY) + [f"{prefix}:<model>" for prefix in sorted(_PREFIXES)]


def create_feature_extractor(name: str, **config: Any) -> FeatureExtractor:
    """Build a registered extractor (fixed-seed init, the caller's RNG untouched); its `spec` is set."""
    try:
        json.dumps(config)
    except TypeError:
        raise ValueError(f"feature extractor {name!r}: the config must be JSON (numbers, text, lists), got {config}") from None
    prefix, _, model = name.partition(":")
    if name in _REGISTRY:
        builder = lambda: _REGISTRY[name](**config)  # noqa: E731
    elif model and prefix in _PREFIXES:
        builder = lambda: _PREFIXES[prefix](model, **config)  # noqa: E731
    else:
        raise KeyError(f"unknown feature extractor {name!r}; registered: {', '.join(list_feature_extractors())}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        extractor = builder()
    extractor.spec = {"name": name, **config}
    return extractor


def feature_extractor_spec(extractor: nn.Module) -> dict[str, Any]:
    """The name and config a registered extractor was built from; ValueError for an unregistered one."""
    spec = getattr(extractor, "spec", None)
    if not spec:
        raise ValueError(
            f"this model's feature extractor ({type(extractor).__name__}) is not registered, so a checkpoint "
            "could not rebuild it; build it with create_feature_extractor(name, **config), or register its "
            "builder with @register_feature_extractor(name)"
        )
    return dict(spec)


@register_feature_extractor("small_cnn")
def _small_cnn(widths: list[int] | tuple[int, ...] = (16, 32), out_dim: int = 32, input_px: int = 8,
               mean: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5),
               std: list[float] | tuple[float, ...] = (0.5, 0.5, 0.5)) -> FeatureExtractor:
    return FeatureExtractor(SmallCNN(tuple(widths), out_dim), out_dim, input_px, tuple(mean), tuple(std))


@register_feature_extractor("tiny_cnn")
def _tiny_cnn(input_px: int = 96) -> FeatureExtractor:
    from mil_export.encoders import TinyCNN

    return FeatureExtractor(TinyCNN(), 64, input_px)


@register_feature_extractor("resnet50_trunc")
def _resnet50_trunc(input_px: int = 224) -> FeatureExtractor:
    from mil_export.encoders import ResNetTrunk

    return FeatureExtractor(ResNetTrunk(), 1024, input_px)


def _measured(backbone: nn.Module, input_px: int, mean, std) -> FeatureExtractor:
    """Wrap a backbone whose pooled width differs between families: measured on one zero image."""
    was_training = backbone.training
    with torch.no_grad():
        width = backbone.eval()(torch.zeros(1, 3, input_px, input_px)).flatten(1).shape[1]
    backbone.train(was_training)
    return FeatureExtractor(backbone, width, input_px, tuple(mean), tuple(std))


def _torchvision(model: str, input_px: int = 224) -> FeatureExtractor:
    import torchvision

    build = getattr(torchvision.models, model, None)
    if build is None or not callable(build):
        raise KeyError(f"torchvision has no model {model!r}")
    backbone = build(weights=None)
    for head in ("fc", "classifier", "heads", "head"):  # the classifier, wherever the family keeps it
        if isinstance(getattr(backbone, head, None), nn.Module):
            setattr(backbone, head, nn.Identity())
            break
    return _measured(backbone, input_px, IMAGENET_MEAN, IMAGENET_STD)


def _timm(model: str, input_px: int | None = None) -> FeatureExtractor:
    import timm

    backbone = timm.create_model(model, pretrained=False, num_classes=0)
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    input_px = int(input_px or cfg.get("input_size", (3, 224, 224))[-1])
    return _measured(backbone, input_px, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))


_PREFIXES.update({"torchvision": _torchvision, "timm": _timm})
