"""Logger hook: any object with .log(dict, step) gets every epoch's row; CSV and TensorBoard loggers."""

from __future__ import annotations

import csv

import pytest
import torch
from tensordict import TensorDict

from mil_train.loggers import CSVLogger, TensorBoardLogger, tensorboard_available
from mil_train.models import ABMIL
from mil_train.trainer import Trainer, make_loader, seed_everything


class ListLogger:
    def __init__(self):
        self.calls = []

    def log(self, metrics, step):
        self.calls.append((step, metrics))


def bags(n=12):
    g = torch.Generator().manual_seed(0)
    return [TensorDict({"X": torch.randn(4, 3, generator=g) + (i % 2), "Y": torch.tensor(float(i % 2))}, batch_size=[])
            for i in range(n)]


def test_any_object_with_log_gets_each_epochs_row(tmp_path):
    seed_everything(0)
    model = ABMIL(in_dim=3, att_dim=4, embed_dims=(8,))
    hook, csv_path = ListLogger(), tmp_path / "m.csv"
    trainer = Trainer(model, epochs=3, progress=False, logger=[hook, CSVLogger(csv_path)])
    history = trainer.fit(make_loader(bags(), batch_size=4), make_loader(bags(6), batch_size=4))
    assert [step for step, _ in hook.calls] == [1, 2, 3]
    assert [metrics for _, metrics in hook.calls] == history  # the rows the Trainer keeps, unchanged
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert [float(r["val_loss"]) for r in rows] == pytest.approx([h["val_loss"] for h in history], rel=1e-12)


def test_a_single_logger_needs_no_list():
    seed_everything(0)
    hook = ListLogger()
    Trainer(ABMIL(in_dim=3, att_dim=4, embed_dims=(8,)), epochs=2, progress=False, logger=hook).fit(
        make_loader(bags(), batch_size=4))
    assert [step for step, _ in hook.calls] == [1, 2] and "train_loss" in hook.calls[0][1]


def test_csv_logger_adds_columns_that_appear_later(tmp_path):
    logger = CSVLogger(tmp_path / "log.csv")
    logger.log({"a": 1.0}, 1)
    logger.log({"a": 2.0, "b": 3.0}, 2)
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"step": "1", "a": "1.0", "b": ""}, {"step": "2", "a": "2.0", "b": "3.0"}]
    assert not (tmp_path / "log.csv.tmp").exists()


@pytest.mark.skipif(tensorboard_available(), reason="tensorboard is installed here")
def test_tensorboard_logger_says_what_to_install(tmp_path):
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardLogger(tmp_path)


@pytest.mark.skipif(not tensorboard_available(), reason="needs the tensorboard package")
def test_tensorboard_logger_writes_scalars_readable_by_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    logger.log({"train_loss": 0.5, "val_auroc": 0.75, "note": "text is skipped"}, 1)
    logger.log({"train_loss": 0.25, "val_auroc": 0.5}, 2)
    logger.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train_loss", "val_auroc"]
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [(1, 0.5), (2, 0.25)]


def test_mil_train_log_dir_writes_metrics_csv_and_a_resumed_run_continues_it(tmp_path):
    from train_cli_helpers import SMALL_ABMIL, planted_folder, run_cli

    data = planted_folder(tmp_path / "bags", [i % 2 for i in range(10)])
    common = [*SMALL_ABMIL, data, "-o", tmp_path / "m.pt", "--log-dir", tmp_path / "runs" / "a"]
    result = run_cli([*common, "--epochs", 2])
    assert result.exit_code == 0, result.output
    if not tensorboard_available():
        assert "writing metrics.csv only (pip install tensorboard" in result.output
    assert run_cli([*common, "--epochs", 3, "--resume"]).exit_code == 0
    with open(tmp_path / "runs" / "a" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(r["val_auroc"] != "" for r in rows)
