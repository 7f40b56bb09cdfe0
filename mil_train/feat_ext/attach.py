"""Giving a MIL model an instance feature extractor, applied to real instances only, in chunks.

`attach_feat_ext(model, extractor)` makes `model.feat_ext` a submodule (its weights train with the
model and live in its state_dict under `feat_ext.`) and registers a forward pre-hook: when X holds
images, (batch, bag, 3, H, W) uint8 or float in [0, 1], the hook replaces it by the extractor's
(batch, bag, in_dim) features before the model's own forward runs. Features pass through untouched,
so the exported MIL graph (features in) is the model's forward as before.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mil_train.feat_ext.extractor import FeatureExtractor

DEFAULT_INSTANCE_CHUNK = 256


def as_unit_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1] (the exported encoder's first step); float images as they are."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images


def encode_instances(extractor: nn.Module, X: torch.Tensor, mask: torch.Tensor | None,
                     chunk: int = DEFAULT_INSTANCE_CHUNK) -> torch.Tensor:
    """(batch, bag, *in_shape) images -> (batch, bag, D) features, zeros on padding.

    Only real instances (mask True) go through the extractor, `chunk` at a time; with gradients on,
    each chunk is activation-checkpointed (recomputed in backward), so a bag of many images needs the
    activations of one chunk at a time. An extractor with BatchNorm sees each chunk twice in training.
    """
    batch, bag = X.shape[:2]
    if isinstance(extractor, FeatureExtractor) and tuple(X.shape[2:]) != extractor.in_shape:
        # the exported encoder resizes tiles to input_px: training on other sizes would not be what it runs
        raise ValueError(f"the images are {tuple(X.shape[2:])} but the feature extractor takes {extractor.in_shape}")
    real = X.flatten(0, 1) if mask is None else X[mask]  # (n_real, *in_shape)
    parts = []
    for start in range(0, real.shape[0], max(1, int(chunk))):
        images = as_unit_images(real[start:start + chunk])  # (chunk, 3, H, W)
        if torch.is_grad_enabled():
            parts.append(checkpoint(extractor, images, use_reentrant=False))
        else:
            parts.append(extractor(images))
    features = torch.cat(parts)  # (n_real, D)
    if mask is None:
        return features.view(batch, bag, -1)  # (batch, bag, D)
    out = features.new_zeros(batch, bag, features.shape[1])
    out[mask] = features
    return out  # (batch, bag, D)


def _encode_images_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    X = args[0] if args else kwargs.get("X")
    if X is None or X.dim() < 4:  # (batch, bag, D) features: nothing to extract
        return None
    mask = args[1] if len(args) > 1 else kwargs.get("mask")
    features = encode_instances(model.feat_ext, X, mask, model.instance_chunk)  # (batch, bag, D)
    if args:
        return (features, *args[1:]), kwargs
    return args, {**kwargs, "X": features}


def with_features(model: nn.Module, batch: Any) -> Any:
    """The batch with image X replaced by the model's extractor's features (a shallow copy); a batch of
    features, or a model without an extractor, as it is (MILModel.compute_loss calls this)."""
    X = batch["X"]
    if X.dim() < 4 or feat_ext_of(model) is None:
        return batch
    features = encode_instances(model.feat_ext, X, batch.get("mask", None), model.instance_chunk)  # (batch, bag, D)
    if hasattr(batch, "clone") and hasattr(batch, "batch_size"):  # a TensorDict: copy the structure, not the data
        batch = batch.clone(recurse=False)
        batch["X"] = features
        return batch
    return {**batch, "X": features}


def attach_feat_ext(model: nn.Module, feat_ext: FeatureExtractor | dict[str, Any],
                    instance_chunk: int = DEFAULT_INSTANCE_CHUNK) -> nn.Module:
    """Give `model` an instance feature extractor (a FeatureExtractor, or a registered spec
    {"name": ..., **config}); its output width must be the model's in_dim. Returns the model."""
    if isinstance(feat_ext, dict):
        from mil_train.feat_ext.registry import create_feature_extractor

        spec = dict(feat_ext)
        feat_ext = create_feature_extractor(spec.pop("name"), **spec)
    if not isinstance(feat_ext, FeatureExtractor):
        raise TypeError(f"feat_ext must be a FeatureExtractor or a registered spec, got {type(feat_ext).__name__}; "
                        "wrap a backbone as FeatureExtractor(backbone, output_dim, input_px)")
    in_dim = model.config.get("in_dim")
    if in_dim is not None and int(in_dim) != feat_ext.output_dim:
        raise ValueError(f"the feature extractor gives {feat_ext.output_dim}-d features but {model.name} takes "
                         f"in_dim={in_dim}; make them equal")
    if instance_chunk < 1:
        raise ValueError(f"instance_chunk must be >= 1, got {instance_chunk}")
    model.feat_ext, model.instance_chunk = feat_ext, int(instance_chunk)
    model.register_forward_pre_hook(_encode_images_hook, with_kwargs=True)
    if feat_ext.spec is not None:  # what a checkpoint rebuilds it from (create_model(name, **config))
        model.config["feat_ext"] = dict(feat_ext.spec)
        model.config["instance_chunk"] = int(instance_chunk)
    return model


def feat_ext_of(model: nn.Module) -> FeatureExtractor | None:
    """The model's attached feature extractor, or None."""
    extractor = getattr(model, "feat_ext", None)
    return extractor if isinstance(extractor, FeatureExtractor) else None
