"""Regression and survival tasks: losses, metrics and readers' labels against hand-computed cases;
every registered model takes `task=`; classification is left exactly as it was."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from mil_train.metrics import concordance_index, regression_metrics
from mil_train.models import create_model, list_models
from mil_train.tasks import (
    RegressionTask, SurvivalTask, cox_partial_nll, discrete_hazard_nll, make_task, survival_bin_edges, time_bins,
)

SMALL = {"att_dim": 16, "pool_att_dim": 16, "transf_att_dim": 16, "transf_n_heads": 2, "n_heads": 2,
         "nystrom_att_dim": 16, "n_landmarks": 4}


# -- metrics ------------------------------------------------------------------------------------

def test_concordance_index_hand_computed():
    times, events = [1, 2, 3, 4], [1, 0, 1, 1]
    # comparable: (0,1) (0,2) (0,3) from the event at t=1, (2,3) from t=3; bag 1 is censored
    assert concordance_index(times, events, [4, 3, 1, 2]) == pytest.approx(3 / 4)  # (2,3) discordant
    assert concordance_index(times, events, [4, 3, 2, 2]) == pytest.approx(3.5 / 4)  # (2,3) tied: 1/2
    assert math.isnan(concordance_index([1, 2], [0, 0], [1, 2]))  # no event, no comparable pair


def test_concordance_index_matches_a_pair_loop():
    rng = np.random.default_rng(0)
    times, events = rng.integers(1, 30, 200).astype(float), rng.random(200) < 0.6  # tied times included
    risk = rng.integers(0, 10, 200).astype(float)  # tied risks included
    concordant = comparable = 0.0
    for i in range(200):
        for j in range(200):
            if events[i] and times[i] < times[j]:
                comparable += 1
                concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    assert concordance_index(times, events, risk) == pytest.approx(concordant / comparable, abs=1e-12)


def test_regression_metrics_hand_computed():
    m = regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
    assert m["mae"] == pytest.approx(2 / 3)
    assert m["rmse"] == pytest.approx(math.sqrt(4 / 3))
    assert m["r2"] == pytest.approx(1 - 4 / 2)  # SS_res 4, SS_tot 2
    assert math.isnan(regression_metrics([1.0, 1.0], [1.0, 2.0])["r2"])  # constant target


# -- losses -------------------------------------------------------------------------------------

def test_discrete_hazard_nll_hand_computed():
    logits = torch.tensor([[0.0, math.log(3), -math.log(3)]] * 3)  # hazards 1/2, 3/4, 1/4
    # S = 1/2, 1/8, 3/32. Event in bin 1: S_0 h_1 = 3/8; censored in bin 1: S_1 = 1/8; censored in bin 0: 1/2
    bins, events = torch.tensor([1, 1, 0]), torch.tensor([1.0, 0.0, 0.0])
    expected = (-math.log(3 / 8) - math.log(1 / 8) - math.log(1 / 2)) / 3
    assert float(discrete_hazard_nll(logits, bins, events)) == pytest.approx(expected, rel=1e-6)
    # alpha weighs the uncensored term up: (1 - a) * all + a * uncensored
    expected_alpha = (-math.log(3 / 8) + 0.6 * (-math.log(1 / 8) - math.log(1 / 2))) / 3
    assert float(discrete_hazard_nll(logits, bins, events, alpha=0.4)) == pytest.approx(expected_alpha, rel=1e-6)


def test_discrete_hazard_nll_matches_the_product_formula():
    """Against the likelihood written with probabilities, bag by bag (the PatchGCN/MCAT form)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=generator, dtype=torch.float64)
    bins = torch.randint(0, 5, (16,), generator=generator)
    events = (torch.rand(16, generator=generator) < 0.6).double()
    hazards = torch.sigmoid(logits)
    total = 0.0
    for b in range(16):
        y = int(bins[b])
        survive = [float(torch.prod(1 - hazards[b, : k + 1])) for k in range(5)]
        before = 1.0 if y == 0 else survive[y - 1]
        total += -math.log(before * float(hazards[b, y])) if events[b] else -math.log(survive[y])
    assert float(discrete_hazard_nll(logits, bins, events)) == pytest.approx(total / 16, rel=1e-10)


def test_cox_partial_nll_hand_computed_with_ties():
    risk = torch.tensor([0.0, math.log(2), 0.0])
    times, events = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    # event at t=1: everyone at risk, 1 / (1 + 2 + 1); event at t=2: bags 1 and 2 (Breslow), 2 / (2 + 1)
    expected = -(math.log(1 / 4) + math.log(2 / 3)) / 2
    assert float(cox_partial_nll(risk, times, events)) == pytest.approx(expected, rel=1e-6)
    no_event = cox_partial_nll(risk.requires_grad_(), times, torch.zeros(3))
    assert float(no_event.detach()) == 0.0 and no_event.requires_grad


def test_bin_edges_and_bins():
    edges = survival_bin_edges(np.arange(1, 9), np.ones(8), n_bins=4)
    assert edges == pytest.approx([2.75, 4.5, 6.25])  # quantiles of the observed times
    assert survival_bin_edges([1, 2, 100], [1, 1, 0], 2) == pytest.approx([1.5])  # censored times left out
    assert time_bins(torch.tensor([0.5, 2.75, 5.0, 99.0]), edges).tolist() == [0, 1, 2, 3]  # bins are [a, b)
    with pytest.raises(ValueError, match="no bag has an observed event"):
        survival_bin_edges([1, 2], [0, 0], 2)


def test_regression_task_standardises_and_restores_units():
    task = RegressionTask(target_mean=[10.0], target_std=[2.0])
    logits = torch.tensor([[0.5]])
    assert float(task.loss(logits, torch.tensor([12.0]))) == pytest.approx((0.5 - 1.0) ** 2)
    assert float(task.outputs(logits)["values"]) == pytest.approx(11.0)
    huber = RegressionTask(loss="huber", delta=1.0)
    assert float(huber.loss(torch.tensor([[0.0]]), torch.tensor([3.0]))) == pytest.approx(3.0 - 0.5)


def test_survival_outputs():
    task = SurvivalTask(n_bins=3, bin_edges=[1.0, 2.0])
    out = task.outputs(torch.tensor([[0.0, math.log(3), -math.log(3)]]))
    assert out["hazards"][0].tolist() == pytest.approx([0.5, 0.75, 0.25])
    assert out["survival"][0].tolist() == pytest.approx([0.5, 0.125, 0.09375])
    assert float(out["risk"][0]) == pytest.approx(-(0.5 + 0.125 + 0.09375))
    cox = SurvivalTask(loss="cox")
    assert list(cox.outputs(torch.tensor([[1.5]]))) == ["risk"] and cox.head_dim == 1
    with pytest.raises(ValueError, match="bin_edges"):
        SurvivalTask(n_bins=3).loss(torch.zeros(1, 3), torch.tensor([[1.0, 1.0]]))


def test_make_task_rebuilds_from_its_config():
    for spec in ({"type": "survival", "n_bins": 3, "bin_edges": [1, 2], "alpha": 0.1},
                 {"type": "survival", "loss": "cox"}, {"type": "regression", "n_targets": 2, "loss": "huber"}):
        task = make_task(spec)
        assert make_task(task.to_config()).to_config() == task.to_config()
    with pytest.raises(ValueError, match="unknown task"):
        make_task("segmentation")


# -- every model takes task= --------------------------------------------------------------------

TASKS = {
    "survival": {"type": "survival", "n_bins": 4, "bin_edges": [0.5, 1.0, 2.0]},
    "cox": {"type": "survival", "loss": "cox"},
    "regression2": {"type": "regression", "n_targets": 2, "loss": "huber"},
}


def small_kwargs(name: str) -> dict:
    from mil_train.models import get_model_class
    import inspect

    accepted = inspect.signature(get_model_class(name).__init__).parameters
    return {"in_dim": 8, **{k: v for k, v in SMALL.items() if k in accepted}}


def model_batch(model, labels: torch.Tensor) -> dict:
    from mil_export.onnx_export import example_inputs

    generator = torch.Generator().manual_seed(0)
    inputs = example_inputs(model, [9, 7, 5], torch.randn(3, 9, 8, generator=generator))
    batch = {"X": inputs["features"], "mask": inputs["mask"], "Y": labels}
    for key in ("edge_index", "edge_weight", "coords"):
        if key in inputs:
            batch[key] = inputs[key]
    return batch


@pytest.mark.parametrize("name", list_models())
def test_every_model_takes_a_task(name):
    labels = {"survival": torch.tensor([[0.3, 1.0], [1.5, 0.0], [3.0, 1.0]]),
              "cox": torch.tensor([[0.3, 1.0], [1.5, 0.0], [3.0, 1.0]]), "regression2": torch.randn(3, 2)}
    for key, spec in TASKS.items():
        torch.manual_seed(0)
        model = create_model(name, task=spec, **small_kwargs(name)).train()
        assert model.task.type == spec["type"] and not model.is_classifier
        rebuilt = create_model(name, **model.config)  # what a checkpoint does
        assert rebuilt.config == model.config and rebuilt.n_classes == model.task.head_dim
        logits, terms = model.compute_loss(model_batch(model, labels[key]))
        assert logits.shape == (3, model.task.head_dim), key
        assert all(bool(torch.isfinite(v)) for v in terms.values()), (key, terms)
        sum(terms.values()).backward()
        unused = {k for k, p in model.named_parameters() if p.requires_grad and p.grad is None}
        assert not unused or model.ddp_find_unused_parameters, f"{key}: DDP would miss {sorted(unused)[:3]}"


@pytest.mark.parametrize("name", ["ABMIL", "CLAM_SB", "DSMIL"])
def test_classification_is_unchanged(name):
    """task="classification" builds the very model the default does: same config, same weights."""
    torch.manual_seed(0)
    default = create_model(name, n_classes=3, **small_kwargs(name))
    torch.manual_seed(0)
    explicit = create_model(name, n_classes=3, task="classification", **small_kwargs(name))
    assert "task" not in default.config and explicit.config == default.config
    assert default.is_classifier and default.task.head_dim == 3
    for (k, a), (_, b) in zip(default.state_dict().items(), explicit.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="does not fit"):
        create_model(name, n_classes=3, task={"type": "survival", "loss": "cox"}, **small_kwargs(name))


# -- the Trainer --------------------------------------------------------------------------------

def test_trainer_reports_task_metrics():
    from mil_train.tasks.synthetic import planted_regression_bags, planted_survival_bags
    from mil_train.trainer import Trainer, make_loader

    bags = planted_survival_bags(24, seed=1)
    model = create_model("ABMIL", in_dim=16, att_dim=8, task={"type": "survival", "loss": "cox"})
    trainer = Trainer(model, epochs=1, progress=False, monitor="c_index")
    assert trainer.monitor == "val_c_index" and trainer.mode == "max"
    report = trainer.evaluate(make_loader(bags, batch_size=8))
    predicted = trainer.predict(make_loader(bags, batch_size=8))
    assert set(predicted) >= {"risk", "Y", "attention"} and "probabilities" not in predicted
    Y = predicted["Y"].numpy()
    assert report["c_index"] == pytest.approx(concordance_index(Y[:, 0], Y[:, 1], predicted["risk"].numpy()))

    bags = planted_regression_bags(12, seed=1)
    model = create_model("ABMIL", in_dim=16, att_dim=8, task="regression")
    trainer = Trainer(model, epochs=1, progress=False, monitor="val_mae")
    assert trainer.mode == "min"  # lower MAE is better
    report = trainer.evaluate(make_loader(bags, batch_size=4))
    predicted = trainer.predict(make_loader(bags, batch_size=4))
    expected = regression_metrics(predicted["Y"].numpy(), predicted["values"].numpy())
    assert {k: report[k] for k in expected} == pytest.approx(expected)
