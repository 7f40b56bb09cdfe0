"""DSMIL: the dual stream by hand, the critical instance ignores padding, losses and torchmil parity.

Tolerances: |a - b| <= 1e-5 + 1e-5 |b| against torchmil (DESIGN section 7); 1e-6 between two
milkit computations of the same thing.
"""

from __future__ import annotations

import math

import pytest
import torch

from mil_train.models import DSMIL
from mil_train.nn.max_instance import MaxInstanceAttention
from bag_helpers import pad

D = 6
TOL = 1e-5


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    excess = (actual - expected).abs() - (TOL + TOL * expected.abs())
    assert excess.max() <= 0, f"{what}: max |a - b| = {(actual - expected).abs().max():.3e}"



def make_model(**kwargs) -> DSMIL:
    torch.manual_seed(0)
    return DSMIL(in_dim=D, att_dim=4, **kwargs).eval()


def test_binary_dsmil_matches_hand_computation():
    """m = argmax_i c(x_i); a = softmax_i(q_i . q_m / sqrt(att)); logit = (w_b . sum a_i x_i + b_b + c(x_m)) / 2."""
    model = make_model()
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(1))
    c, q, b = model.streams.instance_classifier, model.streams.query, model.bag_classifier
    instance_logits = x @ c.weight[0] + c.bias[0]  # (bag,)
    m = int(instance_logits.argmax())
    queries = x @ q.weight.T + q.bias  # (bag, att)
    a = torch.softmax(queries @ queries[m] / math.sqrt(4), dim=0)  # (bag,)
    bag_logit = (a @ x) @ b.weight[0] + b.bias[0]
    with torch.no_grad():
        out = model(x.unsqueeze(0))
        bag_stream, max_stream, _ = model.stream_logits(x.unsqueeze(0))
    torch.testing.assert_close(out.attention[0], a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(max_stream[0, 0], instance_logits[m], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bag_stream[0, 0], bag_logit, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.logits[0, 0], 0.5 * (bag_logit + instance_logits[m]), atol=1e-6, rtol=1e-6)


def test_critical_instance_is_never_padding():
    """Zeroed padding scores the classifier's bias: make that beat every real instance."""
    block = MaxInstanceAttention(D, att_dim=4)
    with torch.no_grad():
        block.instance_classifier.weight.fill_(1.0)
        block.instance_classifier.bias.fill_(5.0)
    bag = -torch.rand(4, D) - 1.0  # every real instance scores <= 5 - 6 = -1 < 5
    X, mask = pad([bag, torch.randn(7, D)])
    with torch.no_grad():
        max_padded, weights_padded, _ = block(X, mask)
        max_alone, weights_alone, _ = block(bag.unsqueeze(0))
    torch.testing.assert_close(max_padded[0], max_alone[0])
    assert max_padded[0, 0] < 0
    torch.testing.assert_close(weights_padded[0, :4], weights_alone[0])
    assert (weights_padded[0, 4:] == 0).all()


@pytest.mark.parametrize("fill", [float("nan"), 1e30, -1e30])
@pytest.mark.parametrize("options", [{}, {"nonlinear_q": True, "nonlinear_v": True, "n_classes": 3}])
def test_bag_alone_equals_bag_padded_whatever_the_padding_holds(fill, options):
    model = make_model(**options)
    bags = [torch.randn(n, D, generator=torch.Generator().manual_seed(n)) for n in (5, 1, 8)]
    X, mask = pad(bags, fill)
    with torch.no_grad():
        batched = model(X, mask)
        for i, bag in enumerate(bags):
            alone = model(bag.unsqueeze(0))
            torch.testing.assert_close(batched.logits[i], alone.logits[0], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(batched.attention[i, : len(bag)], alone.attention[0], atol=1e-6, rtol=1e-6)
            assert (batched.attention[i, len(bag):] == 0).all()


def test_multiclass_has_one_critical_instance_per_class_and_averages_their_weights():
    model = make_model(n_classes=3)
    x = torch.randn(1, 11, D, generator=torch.Generator().manual_seed(2))
    block = model.streams
    with torch.no_grad():
        max_logits, weights, embeddings = block(x)
        instance_logits = block.instance_classifier(x)[0]  # (bag, C)
        queries = block.query(x)[0]  # (bag, att)
        for k in range(3):
            m = int(instance_logits[:, k].argmax())
            expected = torch.softmax(queries @ queries[m] / 2.0, dim=0)  # sqrt(att_dim=4) = 2
            torch.testing.assert_close(weights[0, :, k], expected, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(max_logits[0, k], instance_logits[m, k])
            torch.testing.assert_close(embeddings[0, k], expected @ x[0], atol=1e-6, rtol=1e-6)
        out = model(x)
    torch.testing.assert_close(out.attention[0], weights[0].mean(dim=-1))
    expected_logits = 0.5 * (model.bag_classifier(embeddings.flatten(1)) + max_logits)
    torch.testing.assert_close(out.logits, expected_logits)


def test_value_dropout_acts_in_training_only():
    model = make_model(nonlinear_v=True, dropout=0.5)
    x = torch.randn(1, 30, D)
    with torch.no_grad():
        assert torch.equal(model(x).logits, model(x).logits)
        model.train()
        torch.manual_seed(1)
        first = model(x).logits
        torch.manual_seed(2)
        assert not torch.equal(first, model(x).logits)


def test_compute_loss_has_the_bag_and_max_instance_terms():
    model = make_model()
    X, mask = pad([torch.randn(n, D) for n in (4, 9)])
    Y = torch.tensor([1.0, 0.0])
    logits, terms = model.compute_loss({"X": X, "mask": mask, "Y": Y})
    bag_stream, max_stream, _ = model.stream_logits(X, mask)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert set(terms) == {"cls", "max_instance"}
    torch.testing.assert_close(terms["cls"], bce(bag_stream[:, 0], Y))
    torch.testing.assert_close(terms["max_instance"], bce(max_stream[:, 0], Y))
    torch.testing.assert_close(logits, model(X, mask).logits)
    multi = make_model(n_classes=3)
    _, terms = multi.compute_loss({"X": X, "mask": mask, "Y": torch.tensor([2, 0])})
    _, max_stream, _ = multi.stream_logits(X, mask)
    torch.testing.assert_close(terms["max_instance"], torch.nn.functional.cross_entropy(max_stream, torch.tensor([2, 0])))


# -- torchmil -------------------------------------------------------------------------------------


def torchmil_pair(**config):
    from mil_train.interop.torchmil import build_reference, from_torchmil

    config = {"in_dim": D, "att_dim": 8, **config}
    torch.manual_seed(3)
    reference = build_reference("DSMIL", **config)
    return reference, from_torchmil(reference, "DSMIL", **config)


def check_parity(n: int, **config) -> None:
    from mil_train.interop.torchmil import reference_outputs

    reference, model = torchmil_pair(**config)
    X = torch.randn(1, n, D, generator=torch.Generator().manual_seed(n))
    ref_logits, ref_attention = reference_outputs("DSMIL", reference, X)
    with torch.no_grad():
        out = model(X)
    assert_parity(out.logits, ref_logits, f"logits at {n}")
    assert_parity(out.attention, ref_attention, f"attention at {n}")


@pytest.mark.parametrize("n", [1, 7, 500])
@pytest.mark.parametrize("config", [{}, {"nonlinear_q": True}, {"nonlinear_v": True, "dropout": 0.3}])
def test_torchmil_parity(n, config):
    check_parity(n, **config)


@pytest.mark.slow
@pytest.mark.parametrize("config", [{}, {"nonlinear_q": True, "nonlinear_v": True}])
def test_torchmil_parity_large_bag(config):
    check_parity(10_000, **config)


def test_logits_are_torchmils_predict_not_its_forward():
    reference, model = torchmil_pair()
    x = torch.randn(1, 12, D)
    with torch.no_grad():
        bag_stream, inst_logits = reference(x, return_inst_pred=True)
        ours = model(x).logits[0, 0]
        assert_parity(ours, reference.predict(x)[0], "logits vs torchmil predict")
        assert_parity(ours, 0.5 * (bag_stream[0] + inst_logits[0].max()), "logits vs the mean of the streams")
        assert (ours - bag_stream[0]).abs() > 1e-4  # forward alone is the bag stream, a different number


def test_losses_match_torchmils_compute_loss():
    reference, model = torchmil_pair()
    X, Y = torch.randn(1, 15, D), torch.tensor([1.0])
    ref_logits, ref_terms = reference.compute_loss(Y, X)
    logits, terms = model.compute_loss({"X": X, "Y": Y})
    assert_parity(logits[:, 0], ref_logits, "compute_loss logits")
    assert_parity(terms["cls"], ref_terms["BCEWithLogitsLoss"], "cls vs torchmil's bag term")
    assert_parity(terms["max_instance"], ref_terms["BCEWithLogitsLoss_max"], "max_instance vs torchmil's max term")


def test_torchmil_lets_padding_be_the_critical_instance():
    """torchmil's bug (recorded in docs/models/DSMIL.md): its max runs over padding; milkit's does not."""
    reference, model = torchmil_pair()
    with torch.no_grad():
        reference.inst_classifier.weight.fill_(1.0)
        reference.inst_classifier.bias.fill_(5.0)
        model.streams.instance_classifier.weight.fill_(1.0)
        model.streams.instance_classifier.bias.fill_(5.0)
        bag = -torch.rand(4, D, generator=torch.Generator().manual_seed(4)) - 1.0  # real scores < 5 = padding's
        X, mask = pad([bag, torch.randn(7, D)])
        torchmil_padded = reference.predict(X, mask)[0]
        torchmil_alone = reference.predict(bag.unsqueeze(0))[0]
        ours = model(X, mask).logits[0, 0]
    assert_parity(ours, torchmil_alone, "milkit padded vs torchmil alone")
    assert (torchmil_padded - torchmil_alone).abs() > 1.0  # padding's score 5 against a real one below -1
