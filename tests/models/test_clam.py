"""CLAM_SB / CLAM_MB: SmoothTop1SVM and the instance-clustering loss against torchmil and CLAM's code,
padding never picked, bag_weight, and CLAM_MB's branch invariants.

The registry-parametrised tests (test_registry_models.py) cover the shared contract, forward parity with
torchmil and ONNX. torchmil's own bugs (docs/models/CLAM_SB.md) are patched here where a comparison
needs them out of the way, and each one is shown to bite.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn import functional as F

from mil_train.models import CLAM_MB, CLAM_SB, create_model
from mil_train.nn import AttentionPool, ClassAttentionPool, InstanceClustering, SmoothTop1SVM
from bag_helpers import pad

D = 12
TOL = 1e-5  # the project's torchmil rule: |a - b| <= 1e-5 + 1e-5 |b|


def close(actual, expected, tol: float = TOL) -> None:
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)



def bags_of(sizes, seed: int = 0, dim: int = D) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=generator) for n in sizes]


@contextlib.contextmanager
def torchmil_svm_fixed():
    """torchmil's SmoothTop1SVM builds its margin from targets shaped (rows, 1), as torchmil's CLAM passes
    them, and so broadcasts to (rows, rows, classes). Flattening the targets inside its `delta` is the
    whole fix; everything else is torchmil's own code."""
    import torchmil.nn.utils as utils

    original = utils.delta
    utils.delta = lambda y, labels, alpha=None: original(y.reshape(-1), labels, alpha)
    try:
        yield
    finally:
        utils.delta = original


def branch_weights(out) -> torch.Tensor:
    """(batch, branches, bag): every branch's weights; a single-branch output has one row, `attention`."""
    return out.attention_by_class if out.attention_by_class is not None else out.attention.unsqueeze(1)


def torchmil_pair(seed: int = 0, **config):
    """A torchmil CLAM_SB and the milkit CLAM_SB holding its weights (binary, raw features)."""
    from mil_train.interop.torchmil import build_reference, from_torchmil

    config = {"in_dim": D, "n_classes": 1, "att_dim": 16, **config}
    torch.manual_seed(seed)
    reference = build_reference("CLAM_SB", **config)
    return reference, from_torchmil(reference, "CLAM_SB", **config)


# -- SmoothTop1SVM --------------------------------------------------------------------------------


def test_smooth_svm_hand_computed():
    """x = (2, 0), y = 1: tau * log(exp((2 + 1 - 0)/tau) + exp(0)) with tau = 1; y = 0: log(1 + e^(-1))."""
    loss = SmoothTop1SVM(2, reduction="none")
    values = loss(torch.tensor([[2.0, 0.0], [2.0, 0.0]]), torch.tensor([1, 0]))
    close(values, torch.tensor([torch.log(torch.tensor(torch.e**3 + 1.0)), torch.log(torch.tensor(1 + torch.e**-1))]))


def test_smooth_svm_takes_the_hard_form_for_rows_with_a_clear_winner():
    """Gap 10 >= log(1000): the hinge max_c(x_c + [c != y]) - x_y exactly, not the log-sum-exp."""
    values = SmoothTop1SVM(2, reduction="none")(torch.tensor([[10.0, 0.0], [0.0, 10.0]]), torch.tensor([1, 1]))
    assert values.tolist() == [11.0, 0.0]


@pytest.mark.parametrize("scale", [0.5, 4.0, 20.0])  # no hard rows; some; most
def test_smooth_svm_equals_torchmils_with_its_target_shape_fixed(scale):
    from torchmil.nn.utils import SmoothTop1SVM as TorchmilSVM

    generator = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(64, 2, generator=generator) * scale
    targets = torch.randint(0, 2, (64,), generator=generator)
    with torchmil_svm_fixed():
        expected = TorchmilSVM(n_classes=2)(logits, targets.unsqueeze(-1).float())
    close(SmoothTop1SVM(2)(logits, targets), expected)


def test_torchmils_svm_as_clam_calls_it_is_wrong_or_crashes():
    """The bug the fix above removes: wrong values without hard rows, an exception with three or more."""
    from torchmil.nn.utils import SmoothTop1SVM as TorchmilSVM

    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 2, (20,), generator=generator)
    soft = torch.randn(20, 2, generator=generator) * 0.5
    buggy = TorchmilSVM(n_classes=2)(soft, targets.unsqueeze(-1).float())
    assert abs(float(buggy) - float(SmoothTop1SVM(2)(soft, targets))) > 0.5
    confident = torch.tensor([[10.0, 0.0]] * 20)
    with pytest.raises(RuntimeError):
        TorchmilSVM(n_classes=2)(confident, targets.unsqueeze(-1).float())


def test_smooth_svm_gradient_is_finite_on_hard_and_soft_rows():
    logits = torch.tensor([[50.0, -50.0], [0.1, 0.2], [-3.0, 3.0]], requires_grad=True)
    SmoothTop1SVM(2)(logits, torch.tensor([1, 0, 1])).backward()
    assert torch.isfinite(logits.grad).all()


# -- instance selection and the instance loss -----------------------------------------------------


def test_selection_never_picks_padding():
    """Padded rows get the most extreme weights on both ends; they must never be at a valid rank."""
    block = InstanceClustering(D, n_classes=3, k_sample=4)
    lengths = torch.tensor([7, 2, 4, 1])
    mask = torch.arange(7)[None, :] < lengths[:, None]  # (batch, bag)
    weights = torch.rand(4, 3, 7, generator=torch.Generator().manual_seed(0))  # (batch, branches, bag)
    weights = torch.where(mask[:, None], weights, torch.tensor(1e9))
    weights[:, 1] = torch.where(mask, weights[:, 1], torch.tensor(-1e9))
    top, bottom, valid = block.select(weights, mask)
    assert valid.tolist() == [[r < n for r in range(4)] for n in lengths.tolist()]
    for indices in (top, bottom):
        picked = indices.masked_fill(~valid[:, None], 0)  # only valid ranks count
        assert (picked < lengths[:, None, None]).all()
    # The k most attended are the real top-k, in order.
    real = weights[0, 0]
    assert top[0, 0].tolist() == real.topk(4).indices.tolist()
    assert bottom[0, 0].tolist() == real.topk(4, largest=False).indices.tolist()


@pytest.mark.parametrize("name", ["CLAM_SB", "CLAM_MB"])
@pytest.mark.parametrize("n_classes", [1, 3])
@pytest.mark.parametrize("fill", [0.0, 1e30, float("nan")])
def test_instance_loss_of_a_padded_bag_equals_the_bag_alone(name, n_classes, fill):
    torch.manual_seed(0)
    model = create_model(name, in_dim=D, n_classes=n_classes, att_dim=16, k_sample=4, bag_weight=None)
    bags = bags_of((9, 3, 6), seed=1)
    labels = torch.tensor([1.0, 0.0, 1.0]) if n_classes == 1 else torch.tensor([2, 0, 1])
    X, mask = pad(bags, fill)
    H = model._embed(X, mask)
    out = model._pool_and_classify(H, mask)
    batched = model.instance(H, branch_weights(out), labels, mask)  # (batch,)
    assert torch.isfinite(batched).all()
    for i, bag in enumerate(bags):
        _, terms = model.compute_loss({"X": bag.unsqueeze(0), "Y": labels[i : i + 1]})
        close(batched[i], terms["instance"])


def test_padded_training_step_has_finite_gradients():
    model = CLAM_MB(in_dim=D, n_classes=3, att_dim=16, embed_dims=(8,)).train()
    X, mask = pad(bags_of((12, 3, 20), seed=2), fill=float("nan"))
    _, terms = model.compute_loss({"X": X, "mask": mask, "Y": torch.tensor([2, 0, 1])})
    sum(terms.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("n", [3, 7, 40])  # 3 < k_sample: k shrinks to the bag
@pytest.mark.parametrize("label", [0.0, 1.0])
@pytest.mark.parametrize("gated", [False, True])
def test_binary_instance_loss_equals_torchmils(n, label, gated):
    """torchmil's CLAM_SB.compute_inst_loss on one unpadded bag, its SmoothTop1SVM fixed."""
    reference, model = torchmil_pair(gated=gated, k_sample=5, bag_weight=None)
    X = torch.randn(1, n, D, generator=torch.Generator().manual_seed(n))
    Y = torch.tensor([label])
    with torchmil_svm_fixed():
        _, scores, emb = reference(X, return_att=True, return_emb=True)
        expected = reference.compute_inst_loss(scores, emb, Y)
    logits, terms = model.compute_loss({"X": X, "Y": Y})
    close(terms["instance"], expected)
    close(terms["cls"], F.binary_cross_entropy_with_logits(reference(X), Y))


def test_torchmil_sums_over_the_batch_milkit_averages():
    reference, model = torchmil_pair(k_sample=4, bag_weight=None)
    X = torch.randn(3, 10, D, generator=torch.Generator().manual_seed(0))
    Y = torch.tensor([1.0, 0.0, 1.0])
    with torchmil_svm_fixed():
        _, scores, emb = reference(X, return_att=True, return_emb=True)
        torchmil_sum = reference.compute_inst_loss(scores, emb, Y)
    _, terms = model.compute_loss({"X": X, "Y": Y})
    close(terms["instance"] * 3, torchmil_sum)


def test_torchmils_compute_loss_picks_padding_milkit_does_not():
    """torchmil's compute_loss leaves the mask out of the instance selection: padding whose scores rank
    first (or last) is picked and labelled. milkit's value equals torchmil's for the bag alone."""
    reference, model = torchmil_pair(k_sample=3, bag_weight=None)
    bag = torch.randn(5, D, generator=torch.Generator().manual_seed(3))
    # Padding rows that score high under this attention network: copies of the best real instance, scaled.
    with torch.no_grad():
        _, alone_scores = reference(bag.unsqueeze(0), return_att=True)
    padding = bag[alone_scores[0].argmax()].repeat(4, 1) * 3.0
    X = torch.cat([bag, padding]).unsqueeze(0)  # (1, 9, D)
    mask = torch.tensor([[True] * 5 + [False] * 4])
    Y = torch.tensor([1.0])
    with torchmil_svm_fixed():
        _, torchmil_padded = reference.compute_loss(Y, X, mask)
        _, scores, emb = reference(bag.unsqueeze(0), return_att=True, return_emb=True)
        torchmil_alone = reference.compute_inst_loss(scores, emb, Y)
    _, ours = model.compute_loss({"X": X, "mask": mask, "Y": Y})
    close(ours["instance"], torchmil_alone)
    assert abs(float(torchmil_padded["InstLoss"].detach()) - float(torchmil_alone.detach())) > 1e-3


def test_torchmils_bce_instance_loss_crashes_milkits_is_defined():
    reference, model = torchmil_pair(inst_loss_name="BCEWithLogitsLoss", k_sample=3, bag_weight=None)
    X = torch.randn(1, 8, D, generator=torch.Generator().manual_seed(0))
    Y = torch.tensor([1.0])
    with pytest.raises(ValueError, match="size"):
        reference.compute_loss(Y, X)
    _, terms = model.compute_loss({"X": X, "Y": Y})
    assert torch.isfinite(terms["instance"])


def clam_code_instance_loss(model, weights, H, label: int, loss_fn) -> torch.Tensor:
    """One bag's instance loss written after CLAM's code (models/model_clam.py, inst_eval /
    inst_eval_out): weights (branches, bag) softmax weights, H (bag, dim) embeddings, no padding."""
    block = model.instance
    k = min(block.k_sample, H.shape[0])
    total = torch.tensor(0.0)
    for c, classifier in enumerate(block.classifiers):
        branch = weights[c] if weights.shape[0] > 1 else weights[0]
        top = torch.topk(branch, k).indices
        if c == label:
            bottom = torch.topk(-branch, k).indices
            logits = classifier(torch.cat([H[top], H[bottom]]))
            targets = torch.cat([torch.ones(k), torch.zeros(k)]).long()
            total = total + loss_fn(logits, targets)
        elif block.subtyping:
            total = total + loss_fn(classifier(H[top]), torch.zeros(k).long())
    if block.subtyping and not block.binary:
        total = total / len(block.classifiers)
    return total


@pytest.mark.parametrize("name", ["CLAM_SB", "CLAM_MB"])
@pytest.mark.parametrize("n_classes", [1, 2, 3])
@pytest.mark.parametrize("subtyping", [True, False])
@pytest.mark.parametrize("inst_loss_name", ["SmoothTop1SVM", "CrossEntropyLoss"])
def test_instance_loss_follows_clams_code(name, n_classes, subtyping, inst_loss_name):
    torch.manual_seed(0)
    model = create_model(
        name, in_dim=D, n_classes=n_classes, att_dim=16, k_sample=4, embed_dims=(10,),
        subtyping=subtyping, inst_loss_name=inst_loss_name, bag_weight=None,
    )
    loss_fn = SmoothTop1SVM(2) if inst_loss_name == "SmoothTop1SVM" else F.cross_entropy
    bags = bags_of((9, 3, 6), seed=4)
    labels = torch.tensor([1.0, 0.0, 1.0]) if n_classes == 1 else torch.tensor([n_classes - 1, 0, 1])
    X, mask = pad(bags)
    _, terms = model.compute_loss({"X": X, "mask": mask, "Y": labels})
    expected = []
    with torch.no_grad():
        for i, bag in enumerate(bags):
            H = model.embed(bag)  # (bag, dim)
            out = model(bag.unsqueeze(0))
            expected.append(clam_code_instance_loss(model, branch_weights(out)[0], H, int(labels[i]), loss_fn))
    close(terms["instance"], torch.stack(expected).mean())


@pytest.mark.parametrize("bag_weight", [0.7, 0.25, None])
def test_bag_weight_scales_the_terms(bag_weight):
    torch.manual_seed(0)
    unweighted = CLAM_SB(in_dim=D, n_classes=3, att_dim=16, bag_weight=None)
    weighted = CLAM_SB(in_dim=D, n_classes=3, att_dim=16, bag_weight=bag_weight)
    weighted.load_state_dict(unweighted.state_dict())
    X, mask = pad(bags_of((9, 14), seed=5))
    batch = {"X": X, "mask": mask, "Y": torch.tensor([2, 0])}
    _, plain = unweighted.compute_loss(batch)
    _, terms = weighted.compute_loss(batch)
    w = 1.0 if bag_weight is None else bag_weight
    v = 1.0 if bag_weight is None else 1.0 - bag_weight
    close(terms["cls"], w * plain["cls"])
    close(terms["instance"], v * plain["instance"])


def test_default_bag_weight_is_clams_and_bad_arguments_are_refused():
    assert CLAM_SB(in_dim=D).bag_weight == 0.7 and CLAM_MB(in_dim=D).bag_weight == 0.7
    with pytest.raises(ValueError, match="bag_weight"):
        CLAM_SB(in_dim=D, bag_weight=1.5)
    with pytest.raises(ValueError, match="inst_loss_name"):
        CLAM_MB(in_dim=D, inst_loss_name="hinge")
    with pytest.raises(ValueError, match="k_sample"):
        CLAM_SB(in_dim=D, k_sample=0)


# -- forward --------------------------------------------------------------------------------------


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("att_act", ["tanh", "relu", "gelu"])
def test_forward_equals_torchmil_with_padding(gated, att_act):
    """The registry test runs the default plain tanh attention unpadded; here: gated, other activations,
    and a padded batch (torchmil masks its softmax, so forward parity holds with padding)."""
    from mil_train.interop.torchmil import reference_outputs

    reference, model = torchmil_pair(gated=gated, att_act=att_act)
    X, mask = pad(bags_of((7, 2, 13), seed=6))
    ref_logits, ref_attention = reference_outputs("CLAM_SB", reference, X, mask)
    with torch.no_grad():
        out = model(X, mask)
    close(out.logits, ref_logits)
    close(out.attention, ref_attention)


def test_class_attention_pool_with_one_branch_is_attention_pool():
    torch.manual_seed(0)
    multi = ClassAttentionPool(D, 16, "tanh", gated=True, n_branches=1)
    single = AttentionPool(D, 16, "tanh", gated=True)
    single.load_state_dict(multi.state_dict())
    X, mask = pad(bags_of((5, 8), seed=7))
    pooled, weights = multi(X, mask)
    expected_pooled, expected_weights = single(X, mask)
    close(pooled[:, 0], expected_pooled)
    close(weights[:, 0], expected_weights)


def branch_as_clam_sb(multi: CLAM_MB, c: int) -> CLAM_SB:
    """The CLAM_SB (binary head) holding branch c's weights: shared embedding and V/U, row c of w,
    class c's bag classifier."""
    config = {k: v for k, v in multi.config.items() if k != "n_classes"}
    single = CLAM_SB(**config, n_classes=1).eval()
    state = {k: v for k, v in multi.state_dict().items() if k.startswith(("embed.", "pool.V.", "pool.U."))}
    state["pool.w.weight"] = multi.pool.w.weight[c : c + 1]
    state["classifier.weight"] = multi.classifiers[c].weight
    state["classifier.bias"] = multi.classifiers[c].bias
    single.load_state_dict(state, strict=False)  # the instance classifiers are not part of a branch
    return single


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("n_classes", [1, 2, 4])
def test_each_branch_equals_a_clam_sb_with_its_weights(gated, n_classes):
    torch.manual_seed(0)
    multi = CLAM_MB(in_dim=D, n_classes=n_classes, att_dim=16, gated=gated, embed_dims=(10,)).eval()
    X, mask = pad(bags_of((6, 1, 11), seed=8))
    with torch.no_grad():
        out = multi(X, mask)
        for c in range(n_classes):
            single = branch_as_clam_sb(multi, c)(X, mask)
            close(out.logits[:, c], single.logits[:, 0], 1e-6)
            close(branch_weights(out)[:, c], single.attention, 1e-6)


def test_attention_by_class_rows_are_normalised_and_attention_is_the_predicted_row():
    torch.manual_seed(1)
    multi = CLAM_MB(in_dim=D, n_classes=3, att_dim=16).eval()
    X, mask = pad(bags_of((6, 1, 11, 4), seed=9), fill=1e30)
    with torch.no_grad():
        out = multi(X, mask)
    close(out.attention_by_class.sum(dim=-1), torch.ones(4, 3), 1e-6)
    assert (out.attention_by_class.transpose(1, 2)[~mask] == 0).all()
    predicted = out.logits.argmax(dim=-1)
    assert torch.equal(out.attention, out.attention_by_class[torch.arange(4), predicted])
    # The rows differ, so picking the predicted one is a real choice.
    assert not torch.allclose(out.attention_by_class[:, 0], out.attention_by_class[:, 1])


def test_binary_clam_mb_equals_clam_sb_from_the_same_seed():
    """n_classes=1: one branch, one classifier; the same seed gives the same weights (classifier renamed)."""
    torch.manual_seed(0)
    multi = CLAM_MB(in_dim=D, att_dim=16, k_sample=3, gated=True, embed_dims=(10,), bag_weight=None).eval()
    torch.manual_seed(0)
    single = CLAM_SB(in_dim=D, att_dim=16, k_sample=3, gated=True, embed_dims=(10,), bag_weight=None).eval()
    bag_head = "classifiers.0."
    renamed = {"classifier." + k[len(bag_head):] if k.startswith(bag_head) else k: v
               for k, v in multi.state_dict().items()}
    assert renamed.keys() == single.state_dict().keys()
    assert all(torch.equal(v, single.state_dict()[k]) for k, v in renamed.items())
    X, mask = pad(bags_of((6, 9), seed=10))
    batch = {"X": X, "mask": mask, "Y": torch.tensor([1.0, 0.0])}
    logits_mb, terms_mb = multi.compute_loss(batch)
    logits_sb, terms_sb = single.compute_loss(batch)
    close(logits_mb, logits_sb, 1e-6)
    close(terms_mb["instance"], terms_sb["instance"], 1e-6)
    with torch.no_grad():
        out = multi(X, mask)
        close(out.attention, single(X, mask).attention, 1e-6)
    assert out.attention_by_class is None  # one branch: its map is `attention`
