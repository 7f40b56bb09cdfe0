"""Class imbalance: auto class weights, the weighted loss the Trainer trains on, the balanced sampler."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from tensordict import TensorDict

from mil_train.models import ABMIL
from mil_train.sampling import auto_class_weights, balanced_sampler, class_weighted
from mil_train.trainer import Trainer, make_loader, seed_everything


def test_auto_weights_hand_computed():
    # 6 negatives, 2 positives: n / (2 n_c) = 8/12 and 8/4
    assert auto_class_weights([0, 0, 0, 0, 0, 0, 1, 1], n_classes=1) == pytest.approx([2 / 3, 2.0])
    # 3 classes with 1, 2, 3 bags: 6 / (3 n_c)
    assert auto_class_weights([2, 1, 2, 0, 2, 1], n_classes=3) == pytest.approx([2.0, 1.0, 2 / 3])
    with pytest.raises(ValueError, match=r"\[1\]"):
        auto_class_weights([0, 0, 2], n_classes=3)


@pytest.mark.parametrize("n_classes", [1, 3])
def test_weighted_loss_is_the_mean_of_weighted_bag_losses(n_classes):
    seed_everything(0)
    model = ABMIL(in_dim=4, n_classes=n_classes, att_dim=4, embed_dims=(8,))
    logits = torch.randn(5, n_classes)
    Y = torch.tensor([0, 1, 1, 0, 1]) if n_classes == 1 else torch.tensor([0, 2, 1, 2, 2])
    weights = [0.5, 3.0] if n_classes == 1 else [0.5, 3.0, 1.5]
    if n_classes == 1:  # each bag's BCE by hand
        p = torch.sigmoid(logits[:, 0])
        per_bag = -(Y * p.log() + (1 - Y) * (1 - p).log())
    else:
        per_bag = -torch.log_softmax(logits, dim=1)[torch.arange(5), Y]
    expected = (torch.tensor(weights)[Y] * per_bag).mean()
    unweighted = model.classification_loss(logits, Y.float() if n_classes == 1 else Y)
    with class_weighted(model, weights):
        weighted = model.classification_loss(logits, Y.float() if n_classes == 1 else Y)
    assert float(weighted) == pytest.approx(float(expected), rel=1e-6)
    assert float(unweighted) == pytest.approx(float(per_bag.mean()), rel=1e-6)
    assert float(model.classification_loss(logits, Y.float() if n_classes == 1 else Y)) == float(unweighted)
    with class_weighted(model, [1.0] * len(weights)):  # all ones: the model's own loss
        assert float(model.classification_loss(logits, Y.float() if n_classes == 1 else Y)) == pytest.approx(
            float(unweighted), rel=1e-6)


def test_trainer_trains_on_the_weighted_loss_and_leaves_validation_unweighted():
    """One bag per batch, lr 0: the epoch's train_cls is the weighted mean, val_cls the plain one."""
    g = torch.Generator().manual_seed(0)
    bags = [TensorDict({"X": torch.randn(3, 4, generator=g), "Y": torch.tensor(float(y))}, batch_size=[])
            for y in [0, 0, 0, 1]]
    seed_everything(0)
    model = ABMIL(in_dim=4, att_dim=4, embed_dims=(8,))
    with torch.no_grad():
        per_bag = torch.stack([torch.nn.functional.binary_cross_entropy_with_logits(
            model(b["X"][None]).logits.reshape(-1), b["Y"].reshape(-1)) for b in bags])  # (4,)
    weights = auto_class_weights([0, 0, 0, 1], 1)  # [2/3, 2]
    trainer = Trainer(model, lr=0.0, epochs=1, progress=False, class_weights=weights)
    row = trainer.fit(make_loader(bags), make_loader(bags))[0]
    expected = (torch.tensor(weights)[torch.tensor([0, 0, 0, 1])] * per_bag).mean()
    assert row["train_cls"] == pytest.approx(float(expected), rel=1e-5)
    assert row["val_cls"] == pytest.approx(float(per_bag.mean()), rel=1e-5)


def test_balanced_sampler_draws_classes_equally_and_repeats_under_a_seed():
    labels = [0] * 90 + [1] * 10
    sampler = balanced_sampler(labels, seed=3, num_samples=20000)
    counts = Counter(labels[i] for i in sampler)
    # each draw is class 1 with probability 1/2: 10,000 expected, sd 71
    assert abs(counts[1] - 10000) < 400
    first = list(balanced_sampler(labels, seed=3))
    assert first == list(balanced_sampler(labels, seed=3)) and first != list(balanced_sampler(labels, seed=4))
    assert len(first) == 100


def test_mil_train_class_weights_and_balanced_sampler_are_recorded(tmp_path):
    from train_cli_helpers import SMALL_ABMIL, planted_folder, run_cli

    from mil_train.checkpoint import load_checkpoint

    data = planted_folder(tmp_path / "bags", [0] * 15 + [1] * 5)
    out = tmp_path / "m.pt"
    result = run_cli([*SMALL_ABMIL, data, "-o", out, "--epochs", 2, "--val-fraction", 0, "--class-weights", "auto",
                      "--balanced-sampler"])
    assert result.exit_code == 0, result.output
    provenance = load_checkpoint(out)[1]["provenance"]
    assert provenance["class_weights"] == "auto" and provenance["balanced_sampler"] is True
    assert provenance["class_weight_values"] == pytest.approx([20 / 30, 20 / 10])
