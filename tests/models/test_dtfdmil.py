"""DTFDMIL: the pseudo-bag partition, tier-1 distillation by hand, empty groups, losses, torchmil parity and bugs.

Tolerances: |a - b| <= 1e-5 + 1e-5 |b| against torchmil (DESIGN section 7); 1e-6 between two
milkit computations of the same thing.
"""

from __future__ import annotations

import pytest
import torch

from mil_train.models import DTFDMIL
from mil_train.nn.pseudo_bags import grouped_softmax, pseudo_bag_membership
from bag_helpers import pad

D = 6
TOL = 1e-5
MODES = ("maxmin", "max", "afs")


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    excess = (actual - expected).abs() - (TOL + TOL * expected.abs())
    assert excess.max() <= 0, f"{what}: max |a - b| = {(actual - expected).abs().max():.3e}"



def make_model(**kwargs) -> DTFDMIL:
    torch.manual_seed(0)
    return DTFDMIL(in_dim=D, att_dim=4, **kwargs).eval()


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- the partition ----------------------------------------------------------------------------------


def test_fixed_partition_deals_real_instances_round_robin_and_skips_padding():
    mask = torch.tensor([[True, True, False, True, True, True], [True, False, False, False, False, False]])
    membership = pseudo_bag_membership(mask, n_groups=2)
    group_of = [[int(membership[b, :, i].nonzero()) if mask[b, i] else None for i in range(6)] for b in range(2)]
    assert group_of == [[0, 1, None, 0, 1, 0], [0, None, None, None, None, None]]
    assert not membership[1, 1].any()  # a one-instance bag leaves the second group empty


def test_random_partition_is_a_balanced_partition_of_the_real_instances():
    mask = torch.arange(23)[None, :] < torch.tensor([[23], [13]])  # (2, 23)
    torch.manual_seed(0)
    first = pseudo_bag_membership(mask, n_groups=4, shuffle=True)
    second = pseudo_bag_membership(mask, n_groups=4, shuffle=True)
    for membership in (first, second):
        assert torch.equal(membership.sum(dim=1), mask.long())  # each real instance in one group, padding in none
        sizes = membership.sum(dim=-1)  # (batch, G)
        assert (sizes.max(dim=1).values - sizes.min(dim=1).values <= 1).all()
    assert not torch.equal(first, second)


def test_grouped_softmax_is_a_softmax_within_each_group_and_zero_for_empty_groups():
    scores = randn(1, 5)
    membership = torch.tensor([[[True, False, True, False, False], [False, True, False, True, True],
                                [False, False, False, False, False]]])
    weights = grouped_softmax(scores, membership)
    torch.testing.assert_close(weights[0, 0, [0, 2]], torch.softmax(scores[0, [0, 2]], dim=0))
    torch.testing.assert_close(weights[0, 1, [1, 3, 4]], torch.softmax(scores[0, [1, 3, 4]], dim=0))
    assert (weights[~membership] == 0).all() and (weights[0, 2] == 0).all()


# -- the model by hand ------------------------------------------------------------------------------


def hand_dtfd(model: DTFDMIL, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One bag (n, D), binary, straight from the paper: (logit, attention (n,))."""
    t1, t2 = model.tier1, model.tier2_pool
    G = model.n_groups
    groups = [torch.arange(g, len(x), G) for g in range(min(G, len(x)))]
    rows, tier1_weights = [], []
    for index in groups:
        members = x[index]  # (m, D)
        a = torch.softmax(torch.tanh(members @ t1.pool.V[0].weight.T + t1.pool.V[0].bias) @ t1.pool.w.weight[0], 0)
        cam = members @ t1.classifier.weight[0]  # (m,)
        tier1_weights.append(a)
        if model.config["distill_mode"] == "afs":
            rows.append(a @ members)
        else:
            rows.append(members[cam.argmax()])
            if model.config["distill_mode"] == "maxmin":
                rows.append(members[cam.argmin()])
    rows = torch.stack(rows)  # (G * k, D)
    beta = torch.softmax(torch.tanh(rows @ t2.V[0].weight.T + t2.V[0].bias) @ t2.w.weight[0], 0)
    logit = (beta @ rows) @ model.tier2_classifier.weight[0] + model.tier2_classifier.bias[0]
    group_beta = beta.reshape(len(groups), -1).sum(dim=1)
    attention = torch.zeros(len(x))
    for index, a, b in zip(groups, tier1_weights, group_beta):
        attention[index] = a * b
    return logit, attention


@pytest.mark.parametrize("n", [1, 5, 8, 19])
@pytest.mark.parametrize("mode", MODES)
def test_binary_dtfd_matches_hand_computation(mode, n):
    model = make_model(n_groups=4 if n != 8 else 8, distill_mode=mode)
    x = randn(n, D, seed=n)
    logit, attention = hand_dtfd(model, x)
    with torch.no_grad():
        out = model(x.unsqueeze(0))
    torch.testing.assert_close(out.logits[0, 0], logit, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.attention[0], attention, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.attention.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("mode", MODES)
def test_a_bag_smaller_than_n_groups_equals_that_bag_with_n_groups_equal_to_its_size(mode):
    """Empty pseudo-bags are dropped, not NaN: with 3 instances, 8 groups act as 3."""
    many, few = make_model(n_groups=8, distill_mode=mode), make_model(n_groups=3, distill_mode=mode)
    few.load_state_dict(many.state_dict())
    x = randn(1, 3, D, seed=5)
    with torch.no_grad():
        a, b = many(x), few(x)
    assert torch.isfinite(a.logits).all() and torch.isfinite(a.attention).all()
    torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.attention, b.attention, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fill", [float("nan"), 1e30, -1e30])
@pytest.mark.parametrize("n_classes", [1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_bag_alone_equals_bag_padded_whatever_the_padding_holds(mode, n_classes, fill):
    model = make_model(distill_mode=mode, n_classes=n_classes)
    bags = [randn(n, D, seed=n) for n in (5, 1, 20, 9)]
    X, mask = pad(bags, fill)
    with torch.no_grad():
        batched = model(X, mask)
        for i, bag in enumerate(bags):
            alone = model(bag.unsqueeze(0))
            torch.testing.assert_close(batched.logits[i], alone.logits[0], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(batched.attention[i, : len(bag)], alone.attention[0], atol=1e-6, rtol=1e-6)
            assert (batched.attention[i, len(bag):] == 0).all()


@pytest.mark.parametrize("mode", ["maxmin", "max"])
def test_multiclass_ranks_members_by_the_cam_of_the_pseudo_bags_predicted_class(mode):
    model = make_model(n_classes=3, n_groups=2, distill_mode=mode)
    x = randn(1, 9, D, seed=6)
    membership = pseudo_bag_membership(torch.ones(1, 9, dtype=torch.bool), 2)
    with torch.no_grad():
        pooled, _, distilled, _ = model.tier1(x, membership)
        classes = model.tier1.classifier(pooled).argmax(dim=-1)[0]  # (G,)
        for g in range(2):
            members = x[0, membership[0, g]]  # (m, D)
            cam = members @ model.tier1.classifier.weight[classes[g]]  # (m,)
            k = 2 if mode == "maxmin" else 1
            torch.testing.assert_close(distilled[0, g * k], members[cam.argmax()])
            if mode == "maxmin":
                torch.testing.assert_close(distilled[0, g * k + 1], members[cam.argmin()])


def test_training_draws_random_pseudo_bags_and_eval_is_fixed():
    model = make_model()
    X = randn(1, 40, D, seed=7)
    with torch.no_grad():
        assert torch.equal(model(X).logits, model(X).logits)
        model.train()
        torch.manual_seed(1)
        first = model(X).logits
        torch.manual_seed(2)
        assert not torch.equal(first, model(X).logits)


def test_tier1_loss_averages_each_bags_non_empty_pseudo_bags():
    model = make_model(n_groups=4)
    X, mask = pad([randn(2, D, seed=8), randn(11, D, seed=9)])  # the first bag fills 2 of 4 groups
    Y = torch.tensor([1.0, 0.0])
    logits, terms = model.compute_loss({"X": X, "mask": mask, "Y": Y})
    assert set(terms) == {"cls", "tier1"}
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    torch.testing.assert_close(terms["cls"], bce(logits[:, 0], Y))
    membership = pseudo_bag_membership(mask, 4)
    pooled, _, _, _ = model.tier1(X.masked_fill(~mask[..., None], 0), membership)
    pseudo = model.tier1.classifier(pooled)[..., 0]  # (batch, G)
    expected = 0.5 * (bce(pseudo[0, :2], torch.ones(2)) + bce(pseudo[1], torch.zeros(4)))
    torch.testing.assert_close(terms["tier1"], expected)
    multi = make_model(n_classes=3, n_groups=4)
    _, terms = multi.compute_loss({"X": X, "mask": mask, "Y": torch.tensor([2, 0])})
    assert torch.isfinite(terms["tier1"])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="distill_mode"):
        DTFDMIL(in_dim=D, distill_mode="mean")
    with pytest.raises(ValueError, match="n_groups"):
        DTFDMIL(in_dim=D, n_groups=0)


# -- torchmil -------------------------------------------------------------------------------------


def torchmil_pair(**config):
    from mil_train.interop.torchmil import build_reference, from_torchmil

    config = {"in_dim": D, "att_dim": 8, **config}
    torch.manual_seed(3)
    reference = build_reference("DTFDMIL", **config)
    return reference, from_torchmil(reference, "DTFDMIL", **config)


def check_parity(n: int, **config) -> None:
    from mil_train.interop.torchmil import reference_outputs

    reference, model = torchmil_pair(**config)
    X = randn(1, n, D, seed=n)
    ref_logits, ref_attention = reference_outputs("DTFDMIL", reference, X)
    with torch.no_grad():
        out = model(X)
    assert_parity(out.logits, ref_logits, f"logits at {n}")
    assert_parity(out.attention, ref_attention, f"attention at {n}")


@pytest.mark.parametrize("n", [1, 7, 8, 9, 500])
@pytest.mark.parametrize("mode", MODES)
def test_torchmil_parity_on_the_fixed_partition(mode, n):
    check_parity(n, distill_mode=mode)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_torchmil_parity_large_bag(mode):
    check_parity(10_000, distill_mode=mode)


def test_reference_outputs_of_a_padded_batch_are_those_of_each_bag_alone():
    from mil_train.interop.torchmil import reference_outputs

    reference, model = torchmil_pair()
    bags = [randn(n, D, seed=n) for n in (3, 12)]
    X, mask = pad(bags)
    logits, attention = reference_outputs("DTFDMIL", reference, X, mask)
    with torch.no_grad():
        out = model(X, mask)
    assert_parity(out.logits, logits, "padded logits")
    assert_parity(out.attention, attention, "padded attention")


def test_afs_matches_torchmils_own_forward_and_losses_on_the_fixed_partition():
    """With the split patched to the strided partition, torchmil's literal forward is milkit's ("afs")."""
    from mil_train.interop.torchmil.dtfdmil import strided_split

    reference, model = torchmil_pair(distill_mode="afs")
    for n in (1, 5, 8, 30, 301):
        X, Y = randn(1, n, D, seed=n), torch.tensor([1.0])
        with torch.no_grad(), strided_split():
            torchmil_logits = reference(X, torch.ones(1, n, dtype=torch.bool))
            _, ref_terms = reference.compute_loss(Y, X, torch.ones(1, n, dtype=torch.bool))
        with torch.no_grad():
            logits, terms = model.compute_loss({"X": X, "Y": Y})
        assert_parity(logits[:, 0], torchmil_logits, f"logits vs torchmil forward at {n}")
        assert_parity(terms["cls"], ref_terms["BCEWithLogitsLoss_t1"], f"cls at {n}")  # torchmil's tier 2 is "_t1"
        assert_parity(terms["tier1"], ref_terms["BCEWithLogitsLoss_t2"], f"tier1 at {n}")


@pytest.mark.parametrize("mode", ["maxmin", "max"])
def test_torchmils_topk_keeps_whole_pseudo_bags(mode):
    """torchmil's bug (recorded in docs/models/DTFDMIL.md): its "top-k" takes every member of a pseudo-bag.

    Where each pseudo-bag holds one instance the bug cannot bite and torchmil's forward is milkit's;
    with larger pseudo-bags torchmil pools every instance in tier 2 and the logits part.
    """
    from mil_train.interop.torchmil.dtfdmil import strided_split

    reference, model = torchmil_pair(distill_mode=mode)
    differences = {}
    for n in (1, 7, 8, 9, 100):
        X = randn(1, n, D, seed=n)
        with torch.no_grad(), strided_split():
            torchmil_logits = reference(X, torch.ones(1, n, dtype=torch.bool))
        with torch.no_grad():
            differences[n] = float((model(X).logits[0, 0] - torchmil_logits[0]).abs())
    assert max(differences[n] for n in (1, 7, 8)) <= 1e-5, differences
    assert differences[100] > 1e-3, differences


def test_torchmils_maxmin_needs_a_mask_and_lets_padding_into_tier_two():
    """Two more torchmil bugs: mask=None raises in "maxmin"/"max"; padded rows join the tier-2 pool."""
    from mil_train.interop.torchmil.dtfdmil import strided_split

    reference, model = torchmil_pair(distill_mode="max")
    bag = randn(3, D, seed=10)  # 3 instances, 8 groups: one per pseudo-bag, so top-k is not the issue
    with torch.no_grad(), strided_split():
        with pytest.raises(TypeError):
            reference(bag.unsqueeze(0))
        alone = reference(bag.unsqueeze(0), torch.ones(1, 3, dtype=torch.bool))
        X, mask = pad([bag, randn(20, D, seed=11)])
        padded = reference(X, mask)
    with torch.no_grad():
        ours = model(X, mask).logits[0, 0]
    assert_parity(ours, alone[0], "milkit padded vs torchmil alone")
    assert (padded[0] - alone[0]).abs() > 1e-3


def test_torchmils_afs_gives_nan_for_a_short_bag_in_a_padded_batch():
    from mil_train.interop.torchmil.dtfdmil import strided_split

    reference, model = torchmil_pair(distill_mode="afs")
    X, mask = pad([randn(2, D, seed=12), randn(20, D, seed=13)])  # 8 groups of the padded 20: 6 all padding
    with torch.no_grad(), strided_split():
        padded = reference(X, mask)
    assert torch.isnan(padded[0])
    with torch.no_grad():
        assert torch.isfinite(model(X, mask).logits).all()
