"""Loss-weight schedules against torchmil's annealing schedulers, parsing, and the Trainer using them."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from mil_train.schedules import LossWeightSchedule, parse_schedule, weight_at
from mil_train.trainer import Trainer, make_loader, seed_everything

annealing = pytest.importorskip("torchmil.utils.annealing_scheduler")


def torchmil_weights(scheduler, n_steps: int) -> list[float]:
    """The coefficient torchmil's Trainer uses at each step: read before the step, then step()."""
    weights = []
    for _ in range(n_steps):
        weights.append(scheduler())
        scheduler.step()
    return weights


def test_linear_equals_torchmil_up_to_its_end_then_holds():
    ours = parse_schedule("linear:0:1:10")
    theirs = torchmil_weights(annealing.LinearAnnealingScheduler(0.0, 1.0, 10), 11)
    assert [ours.weight(s) for s in range(11)] == pytest.approx(theirs, abs=1e-12)
    assert ours.weight(10) == 1.0 and ours.weight(25) == 1.0  # torchmil's would be 2.5 at step 25
    down = parse_schedule("linear:2:0.5:4")
    assert [down.weight(s) for s in range(6)] == pytest.approx([2, 1.625, 1.25, 0.875, 0.5, 0.5])


@pytest.mark.parametrize("text, args", [
    ("cyclical:0:1:10", dict(cycle_len=10)),
    ("cyclical:0.2:3:7:0.4:5", dict(cycle_len=7, min_coef=0.2, max_coef=3.0, cycle_prop=0.4, warmup_steps=5)),
    ("cyclical:0:1:6:1", dict(cycle_len=6, cycle_prop=1.0)),
])
def test_cyclical_equals_torchmil(text, args):
    ours = parse_schedule(text)
    theirs = torchmil_weights(annealing.CyclicalAnnealingScheduler(**args), 40)
    assert [ours.weight(s) for s in range(40)] == pytest.approx(theirs, abs=1e-12)


def test_constant_and_plain_numbers():
    assert parse_schedule("0.3") == LossWeightSchedule("constant", 0.3)
    assert weight_at(parse_schedule("0.3"), 99) == 0.3 and weight_at(2.0, 5) == 2.0
    assert parse_schedule("linear:0:1:10").describe() == "linear:0:1:10"
    assert parse_schedule(parse_schedule("cyclical:0:1:8:0.25:3").describe()) == parse_schedule("cyclical:0:1:8:0.25:3")


@pytest.mark.parametrize("text", ["linear:0:1", "linear:a:1:10", "linear:0:1:2.5", "linear:0:1:0", "ramp:0:1:3",
                                  "-1", "nan", "cyclical:0:1:10:0", "linear:0:-1:3"])
def test_bad_schedules_are_refused(text):
    with pytest.raises(ValueError):
        parse_schedule(text)


class KLModel(torch.nn.Module):
    """A model whose "kl" term is constant 1 and "cls" 0: the weighted loss is the kl weight itself."""

    name = "_KL"

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def compute_loss(self, batch):
        logits = self.w.expand(batch["X"].shape[0], 1)  # (batch, 1)
        return logits, {"cls": 0.0 * self.w.sum(), "kl": 1.0 + 0.0 * self.w.sum()}


def test_trainer_weighs_each_step_by_the_schedule():
    """5 bags, batch 1, 3 epochs: the epoch's mean training loss is the mean weight of its 5 steps."""
    seed_everything(0)
    bags = [TensorDict({"X": torch.randn(3, 2), "Y": torch.tensor(float(i % 2))}, batch_size=[]) for i in range(5)]
    trainer = Trainer(KLModel(), epochs=3, progress=False, loss_weights={"kl": parse_schedule("linear:0:1:10")})
    history = trainer.fit(make_loader(bags, batch_size=1))
    for epoch, row in enumerate(history):
        steps = range(5 * epoch, 5 * epoch + 5)
        assert row["train_loss"] == pytest.approx(sum(min(s, 10) / 10 for s in steps) / 5, abs=1e-6)  # float32 loss
        assert row["weight_kl"] == pytest.approx(min(5 * (epoch + 1), 10) / 10)  # the weight at the epoch's end
    assert trainer.global_step == 15


def test_mil_train_loss_weight_schedule_is_logged_recorded_and_checked(tmp_path):
    import csv

    from train_cli_helpers import SMALL_ABMIL, planted_folder, run_cli

    from mil_runtime.errors import InvalidInputError
    from mil_train.checkpoint import load_checkpoint

    data = planted_folder(tmp_path / "bags", [i % 2 for i in range(10)])
    out, log = tmp_path / "m.pt", tmp_path / "log.csv"
    result = run_cli([*SMALL_ABMIL, data, "-o", out, "--epochs", 2, "--batch-size", 2, "--val-fraction", 0.2,
                      "--loss-weight", "cls=linear:0.5:1:8", "--log", log])
    assert result.exit_code == 0, result.output
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    # 8 training bags in batches of 2: 4 steps per epoch; the weight after 4 and 8 steps
    assert [float(r["weight_cls"]) for r in rows] == pytest.approx([0.75, 1.0])
    assert load_checkpoint(out)[1]["provenance"]["loss_weights"] == {"cls": "linear:0.5:1:8"}
    bad = run_cli([*SMALL_ABMIL, data, "-o", out, "--epochs", 1, "--loss-weight", "cls=linear:0:1"])
    assert bad.exit_code == InvalidInputError.exit_code
    assert "--loss-weight 'cls=linear:0:1': 'linear:0:1' is not a weight" in bad.output
