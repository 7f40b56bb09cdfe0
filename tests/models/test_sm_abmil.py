"""SmABMIL and SmTransformerABMIL as models: where the graph comes from, argument checks, the declared
limits. The numerics are in test_sm.py (blocks) and test_registry_models.py (every registered model)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mil_train.data.graphs import batch_graph
from mil_train.models import create_model, get_model_class
from mil_train.nn.transformer import max_bag_for_attention

SMALL = {
    "SmABMIL": {"att_dim": 8},
    "SmTransformerABMIL": {"pool_att_dim": 8, "transf_att_dim": 16, "transf_n_heads": 4},
}


def bags_on_grids(lengths, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n_max = max(lengths)
    X = torch.randn(len(lengths), n_max, dim, generator=generator)
    mask = torch.arange(n_max)[None, :] < torch.tensor(lengths)[:, None]
    coords = torch.zeros(len(lengths), n_max, 2, dtype=torch.long)
    for b, n in enumerate(lengths):
        width = math.ceil(math.sqrt(n))
        index = torch.arange(n)
        coords[b, :n] = torch.stack([index // width, index % width], dim=1)
    return X, mask, coords


@pytest.mark.parametrize("name", sorted(SMALL))
def test_graph_from_coords_equals_the_rule_graph_passed_in(name):
    torch.manual_seed(0)
    model = create_model(name, in_dim=16, n_classes=2, **SMALL[name]).eval()
    assert model.graph_rule == {"rule": "grid8", "params": {"lone_self_loop": True}}
    X, mask, coords = bags_on_grids((12, 5, 1))
    edge_index, edge_weight = batch_graph(coords, mask, "grid8", lone_self_loop=True)
    with torch.no_grad():
        given = model(X, mask, edge_index=edge_index, edge_weight=edge_weight)
        built = model(X, mask, coords=coords)
    torch.testing.assert_close(built.logits, given.logits, rtol=0, atol=0)
    torch.testing.assert_close(built.attention, given.attention, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_without_graph_or_coords_it_warns_and_smooths_over_no_edges(name):
    torch.manual_seed(0)
    model = create_model(name, in_dim=16, n_classes=1, **SMALL[name]).eval()
    X, mask, _ = bags_on_grids((9, 4))
    with pytest.warns(UserWarning, match="neither edge_index nor coords"):
        out = model(X, mask)
    empty = torch.zeros(2, 0, dtype=torch.long)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        no_edges = model(X, mask, edge_index=empty, edge_weight=torch.zeros(0))
    torch.testing.assert_close(out.logits, no_edges.logits)


@pytest.mark.parametrize("alpha", [1.0, -0.1, "fixed", True])
def test_alpha_must_be_in_zero_one_or_trainable(alpha):
    with pytest.raises(ValueError, match="sm_alpha"):
        create_model("SmABMIL", in_dim=8, sm_alpha=alpha)


def test_unknown_modes_and_places_are_refused():
    with pytest.raises(ValueError, match="sm_mode"):
        create_model("SmABMIL", in_dim=8, sm_mode="dense")
    with pytest.raises(ValueError, match="sm_where"):
        create_model("SmABMIL", in_dim=8, sm_where="everywhere")
    with pytest.raises(ValueError, match="add_self"):
        create_model("SmTransformerABMIL", in_dim=8, transf_att_dim=16, transf_n_layers=2)


def test_declared_limits():
    assert get_model_class("SmABMIL").max_bag_size is None  # linear in N
    assert get_model_class("SmTransformerABMIL").max_bag_size == max_bag_for_attention(4) == 16_384


def test_trainable_coefficients_are_parameters_and_float_alpha_is_a_constant():
    trainable = create_model("SmTransformerABMIL", in_dim=16, **SMALL["SmTransformerABMIL"])
    assert sorted(n for n, _ in trainable.named_parameters() if n.endswith("coef")) == [
        "encoder.layers.0.sm.coef", "pool.sm.coef"]
    fixed = create_model("SmABMIL", in_dim=16, sm_alpha=0.25, att_dim=8)
    assert not [n for n, _ in fixed.named_parameters() if n.endswith("coef")]
    assert fixed.pool.sm.coef == pytest.approx(1 / 3)
