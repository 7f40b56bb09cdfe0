"""ABMIL: attention normalisation, padding invariance, shapes, permutation invariance, registry."""

from __future__ import annotations

import pytest
import torch

from mil_train.models import ABMIL, MILModel, create_model, get_model_class, list_models

D = 12


def padded_batch(bags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad bags to the largest one by hand (independent of mil_train.data.collate)."""
    n_max = max(b.shape[0] for b in bags)
    X = torch.zeros(len(bags), n_max, bags[0].shape[1])  # (batch, bag, dim)
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)  # (batch, bag)
    for i, b in enumerate(bags):
        X[i, : b.shape[0]] = b
        mask[i, : b.shape[0]] = True
    return X, mask


def make_model(**kwargs) -> ABMIL:
    torch.manual_seed(0)
    model = ABMIL(in_dim=D, **kwargs)
    return model.eval()


@pytest.fixture
def bags() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, D, generator=g) for n in (5, 1, 9)]


@pytest.mark.parametrize("gated", [False, True])
def test_attention_sums_to_one_on_real_instances_and_zero_on_padding(bags, gated):
    model = make_model(gated=gated, embed_dims=(16,))
    X, mask = padded_batch(bags)
    out = model(X, mask)
    torch.testing.assert_close(out.attention.sum(dim=1), torch.ones(len(bags)))
    assert torch.all(out.attention[~mask] == 0)
    assert torch.all(out.attention[mask] > 0)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("n_classes", [1, 3])
def test_bag_alone_equals_bag_padded_in_batch(bags, gated, n_classes):
    model = make_model(gated=gated, n_classes=n_classes, embed_dims=(16, 8), dropout=0.5)
    X, mask = padded_batch(bags)
    # Garbage in the padding (even NaN) must not leak into the real instances' outputs.
    X = X.masked_fill(~mask.unsqueeze(-1), float("nan"))
    batched = model(X, mask)
    for i, bag in enumerate(bags):
        alone = model(bag.unsqueeze(0))
        torch.testing.assert_close(batched.logits[i], alone.logits[0], atol=1e-6, rtol=1e-6)
        n = bag.shape[0]
        torch.testing.assert_close(batched.attention[i, :n], alone.attention[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n_classes", [1, 2, 4])
def test_shapes_and_probabilities(bags, n_classes):
    model = make_model(n_classes=n_classes)
    X, mask = padded_batch(bags)
    out = model(X, mask)
    assert out.logits.shape == (3, n_classes)
    assert out.attention.shape == mask.shape
    probs = model.probabilities(out.logits)
    if n_classes == 1:
        torch.testing.assert_close(probs, torch.sigmoid(out.logits))
    else:
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))


def test_plain_attention_matches_hand_computation():
    """Plain attention, no embedding: weights = softmax(w^T tanh(V x)), pooled = sum a_i x_i."""
    model = make_model(att_dim=4, embed_dims=())
    x = torch.randn(6, D)
    V, w, clf = model.pool.V[0], model.pool.w, model.classifier
    scores = torch.tanh(x @ V.weight.T + V.bias) @ w.weight.T  # (bag, 1)
    a = torch.softmax(scores.squeeze(-1), dim=0)  # (bag,)
    expected_logits = (a @ x) @ clf.weight.T + clf.bias
    out = model(x.unsqueeze(0))
    torch.testing.assert_close(out.attention[0], a)
    torch.testing.assert_close(out.logits[0], expected_logits)


def test_gated_differs_from_plain_and_has_gate():
    assert make_model(gated=True).pool.U is not None
    assert make_model(gated=False).pool.U is None


@pytest.mark.parametrize("gated", [False, True])
def test_permutation_invariance(bags, gated):
    model = make_model(gated=gated, embed_dims=(16,), n_classes=2)
    bag = bags[2]
    perm = torch.randperm(bag.shape[0], generator=torch.Generator().manual_seed(3))
    out = model(bag.unsqueeze(0))
    out_perm = model(bag[perm].unsqueeze(0))
    torch.testing.assert_close(out.logits, out_perm.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.attention[0, perm], out_perm.attention[0], atol=1e-6, rtol=1e-6)


def test_compute_loss_binary_and_multiclass(bags):
    X, mask = padded_batch(bags)
    binary = make_model(n_classes=1)
    logits, terms = binary.compute_loss({"X": X, "mask": mask, "Y": torch.tensor([1.0, 0.0, 1.0])})
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], torch.tensor([1.0, 0.0, 1.0]))
    assert set(terms) == {"cls"}
    torch.testing.assert_close(terms["cls"], expected)
    multi = make_model(n_classes=3)
    logits, terms = multi.compute_loss({"X": X, "mask": mask, "Y": torch.tensor([2, 0, 1])})
    torch.testing.assert_close(terms["cls"], torch.nn.functional.cross_entropy(logits, torch.tensor([2, 0, 1])))


def test_registry_create_and_list():
    assert "ABMIL" in list_models()
    assert get_model_class("ABMIL") is ABMIL
    model = create_model("ABMIL", in_dim=D, n_classes=2, gated=True, embed_dims=[8])
    assert isinstance(model, MILModel) and model.name == "ABMIL"
    assert model.config == {
        "n_classes": 2, "in_dim": D, "att_dim": 128, "att_act": "tanh", "gated": True,
        "embed_dims": [8], "dropout": 0.0,
    }
    rebuilt = create_model("ABMIL", **model.config)
    assert rebuilt.config == model.config


def test_registry_unknown_name_lists_known_models():
    with pytest.raises(KeyError, match="unknown model 'NoSuchMIL'.*ABMIL"):
        create_model("NoSuchMIL", in_dim=D)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="att_act"):
        ABMIL(in_dim=D, att_act="sigmoidish")
    with pytest.raises(ValueError, match="n_classes"):
        ABMIL(in_dim=D, n_classes=0)
