"""IIBMIL: torchmil parity, the instance loss vs torchmil's (sign bug fixed), prototype updates by hand."""

from __future__ import annotations

import pytest
import torch

from mil_train.models import IIBMIL, create_model, masked_softmax
from mil_train.nn.prototype_memory import PrototypeMemory

pytest.importorskip("torchmil")

from mil_train.interop.torchmil import build_reference, from_torchmil, reference_outputs  # noqa: E402

D = 12
ATT = 16
TOL = 1e-5


def assert_rule(actual, expected, tol: float = TOL) -> None:
    excess = (actual - expected).abs() - (tol + tol * expected.abs())
    assert excess.max() <= 0, f"max |a - b| = {(actual - expected).abs().max():.3e}"


def pair(**knobs):
    config = {"in_dim": D, "n_classes": 1, "att_dim": ATT, "n_heads": 4, **knobs}
    torch.manual_seed(0)
    reference = build_reference("IIBMIL", **config)
    with torch.no_grad():  # a non-zero class token and LayerNorms off identity, so mis-mapped keys show
        for name, p in reference.named_parameters():
            if "norm" in name or name == "cls_token":
                p.add_(torch.randn_like(p) * 0.3)
        reference.prototypes.copy_(torch.randn(2, ATT))
    return reference, from_torchmil(reference, "IIBMIL", **config)


def padded_batch(sizes, fill=0.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n_max = max(sizes)
    X = torch.randn(len(sizes), n_max, D, generator=generator)
    mask = torch.arange(n_max)[None, :] < torch.tensor(sizes)[:, None]
    return X.masked_fill(~mask[..., None], fill), mask


@pytest.mark.parametrize(
    "knobs",
    [{}, {"n_layers_encoder": 2, "n_layers_decoder": 2, "use_mlp_decoder": True}, {"use_mlp_encoder": False}],
    ids=["defaults", "deeper-mlp-decoder", "no-mlp-encoder"],
)
def test_matches_torchmil_alone_and_padded(knobs):
    reference, model = pair(**knobs)
    X, mask = padded_batch((10, 3, 1))
    ref_logits, ref_attention = reference_outputs("IIBMIL", reference, X, mask)
    with torch.no_grad():
        out = model(X, mask)
    assert_rule(out.logits, ref_logits)
    assert_rule(out.attention, ref_attention)


def test_instance_loss_is_torchmils_with_its_label_sign_fixed():
    """torchmil labels an instance near its row-0 prototype (fed by the top-scoring instances) 0.

    Fixing that inversion is BCE(logit, 1 - t) = BCE(-logit, t): torchmil's loss on negated instance
    logits. On positive bags (where milkit's candidate restriction does not bite) the two agree.
    """
    reference, model = pair()
    X, mask = padded_batch((9, 5, 7), seed=1)
    Y = torch.ones(3)
    with torch.no_grad():
        _, instance_pred, X_enc = reference(X, mask, return_inst_pred=True, return_X_enc=True)
        torchmil_fixed = reference._inst_loss(X_enc, -instance_pred, mask)
        torchmil_raw = reference._inst_loss(X_enc, instance_pred, mask)
        H, instance_logits, _ = model.encode(X, mask)
        ours = model.instance_loss(H, instance_logits, mask, Y)
    assert_rule(ours, torchmil_fixed)
    assert (ours - torchmil_raw).abs() > 1e-3  # the difference the card records


def test_negative_bags_label_every_instance_negative():
    model = create_model("IIBMIL", in_dim=D, att_dim=ATT, n_heads=4).eval()
    with torch.no_grad():
        model.prototypes.vectors.copy_(torch.stack([-torch.ones(ATT), torch.ones(ATT)]))
    X, mask = padded_batch((8, 8), seed=2)
    H, instance_logits, _ = model.encode(X, mask)
    labels_negative = model.prototypes.assign(H, model._candidates(torch.zeros(2), H.shape[:2]))
    labels_positive = model.prototypes.assign(H, model._candidates(torch.ones(2), H.shape[:2]))
    assert (labels_negative == 0).all()
    expected = (H @ model.prototypes.vectors.t()).argmax(-1)
    assert torch.equal(labels_positive, expected) and labels_positive.any()


def test_prototype_update_by_hand():
    memory = PrototypeMemory(2, 3, momentum=0.5)
    embeddings = torch.arange(60, dtype=torch.float32).reshape(20, 3)
    scores = torch.zeros(20, 2)
    scores[:, 1] = torch.arange(20.0)  # class-1 confidence grows with the row
    scores[:, 0] = -torch.arange(20.0)
    members = torch.zeros(20, 2, dtype=torch.bool)
    members[:10, 1] = True  # rows 0-9 come from positive bags: k = 1, top row 9
    members[10:, 0] = True  # rows 10-19 from negative bags: k = 1, top (most negative) row 10
    memory.update(embeddings, scores, members)
    torch.testing.assert_close(memory.vectors[1], 0.5 * embeddings[9])
    torch.testing.assert_close(memory.vectors[0], 0.5 * embeddings[10])
    members[:, 1] = True  # all 20 rows: k = 2, rows 19 and 18
    memory.update(embeddings, scores, members)
    torch.testing.assert_close(memory.vectors[1], 0.25 * embeddings[9] + 0.5 * embeddings[18:].mean(0))
    few = torch.zeros(20, 2, dtype=torch.bool)
    few[:9, 0] = True  # 9 members: k = 0, the prototype stays
    before = memory.vectors.clone()
    memory.update(embeddings, scores, few)
    assert torch.equal(memory.vectors, before)


def test_compute_loss_updates_prototypes_in_training_only():
    model = create_model("IIBMIL", in_dim=D, att_dim=ATT, n_heads=4)
    X, mask = padded_batch((20, 12), seed=3)
    batch = {"X": X, "mask": mask, "Y": torch.tensor([1.0, 0.0])}
    model.eval()
    _, terms = model.compute_loss(batch)
    assert set(terms) == {"cls", "instance"}
    assert (model.prototypes.vectors == 0).all()
    model.train()
    model.compute_loss(batch)
    norms = model.prototypes.vectors.norm(dim=1)
    assert (norms > 0).all()  # class 0 from the negative bag, class 1 from the positive one


def test_prototypes_never_change_inference():
    model = create_model("IIBMIL", in_dim=D, att_dim=ATT, n_heads=4).eval()
    X, mask = padded_batch((6, 4), seed=4)
    with torch.no_grad():
        before = model(X, mask)
        model.prototypes.vectors.normal_()
        after = model(X, mask)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.attention, after.attention)


def test_multiclass_attention_follows_the_predicted_class():
    model = create_model("IIBMIL", in_dim=D, n_classes=3, att_dim=ATT, n_heads=4).eval()
    X, mask = padded_batch((7, 3), seed=5)
    with torch.no_grad():
        out = model(X, mask)
        _, instance_logits, bag_logits = model.encode(X, mask)
    predicted = bag_logits.argmax(-1)
    log_p = torch.log_softmax(instance_logits, -1)[torch.arange(2), :, predicted]  # (batch, bag)
    torch.testing.assert_close(out.attention, masked_softmax(log_p, mask))
    torch.testing.assert_close(out.logits, bag_logits)


def test_declares_its_attention_bound():
    assert IIBMIL.max_bag_size == 16_383  # 4 heads x (N + 1)^2 float32 <= 4 GiB (decoder's class token)
