"""Every registered model takes an instance feature extractor (create_model(name, feat_ext=...)): on images
it gives exactly what it gives on the extractor's features, padding included, and its loss trains the
extractor's weights."""

from __future__ import annotations

import pytest
import torch

from model_cases import small_config
from mil_runtime import contract
from mil_train.feat_ext import encode_instances
from mil_train.models import create_model, list_models

IN_DIM = 6
SPEC = {"name": "small_cnn", "widths": [4, 8], "out_dim": IN_DIM}


def optional_inputs(model, lengths: list[int]) -> dict:
    """edge_index / edge_weight / coords of the exporter's example bags, for graph and spatial models."""
    from mil_export.onnx_export import example_inputs

    if not (model.uses_graph or model.uses_coords):
        return {}
    inputs = example_inputs(model, lengths, torch.zeros(len(lengths), max(lengths), IN_DIM))
    return {k: v for k, v in inputs.items() if k in contract.MIL_OPTIONAL_INPUTS}


@pytest.mark.parametrize("name", list_models())
def test_images_in_equal_the_models_own_output_on_their_features(name):
    torch.manual_seed(0)
    model = create_model(name, **small_config(name, IN_DIM, 1), feat_ext=SPEC, instance_chunk=4).eval()
    lengths = [9, 5]
    X = torch.randint(0, 256, (2, 9, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mask = torch.arange(9)[None] < torch.tensor(lengths)[:, None]  # (batch, bag)
    X[1, 5:] = 255  # padding that must never reach the extractor's features
    optional = optional_inputs(model, lengths)
    with torch.no_grad():
        features = encode_instances(model.feat_ext, X, mask)  # (2, 9, IN_DIM), zeros on padding
        on_images, on_features = model(X, mask, **optional), model(features, mask, **optional)
    torch.testing.assert_close(on_images.logits, on_features.logits)
    torch.testing.assert_close(on_images.attention, on_features.attention)

    model.train()
    batch = {"X": X, "mask": mask, "Y": torch.tensor([1.0, 0.0]), **optional}
    _, terms = model.compute_loss(batch)
    sum(terms.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.feat_ext.parameters())
