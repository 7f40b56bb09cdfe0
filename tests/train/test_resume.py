"""Resuming: an interrupted run continued from its last checkpoint ends exactly where an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from mil_train.checkpoint import load_checkpoint_payload
from mil_train.models import ABMIL
from mil_train.sampling import balanced_sampler
from mil_train.trainer import Trainer, make_loader, seed_everything


def bags(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        X = torch.randn(5, 4, generator=g)
        if i % 3 == 0:
            X[0] += 2.0
        out.append(TensorDict({"X": X, "Y": torch.tensor(float(i % 3 == 0))}, batch_size=[]))
    return out


class Interrupt(Exception):
    pass


class StopAt:
    """A logger that stops the run at a given epoch, as a crash or a killed job would."""

    def __init__(self, epoch):
        self.epoch = epoch

    def log(self, metrics, step):
        if step == self.epoch:
            raise Interrupt


def run(tmp_path, epochs=4, stop_at=None, resume=False, sampler=False, patience=None):
    """Dropout, shuffling (or a balanced sampler), an LR scheduler and Adam: every state resuming must carry."""
    seed_everything(7)  # a fresh process would build the model from another RNG position: resume must not care
    model = ABMIL(in_dim=4, att_dim=4, embed_dims=(8,), dropout=0.3)
    train_bags = bags(18, 1)
    if sampler:
        labels = [int(b["Y"]) for b in train_bags]
        train = make_loader(train_bags, batch_size=2, sampler=balanced_sampler(labels, seed=5))
    else:
        train = make_loader(train_bags, batch_size=2, shuffle=True, seed=5)
    trainer = Trainer(model, lr=1e-2, epochs=epochs, progress=False, seed=11, patience=patience,
                      scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7),
                      logger=StopAt(stop_at) if stop_at else None, last_checkpoint_path=tmp_path / "last.pt",
                      checkpoint_path=tmp_path / "best.pt")
    try:
        trainer.fit(train, make_loader(bags(8, 2), batch_size=4), resume=resume)
    except Interrupt:
        return None
    return trainer


@pytest.mark.parametrize("sampler", [False, True])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, sampler):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    whole = run(tmp_path / "a", sampler=sampler)
    assert run(tmp_path / "b", stop_at=3, sampler=sampler) is None  # epochs 1, 2 saved; 3 redone on resume
    assert load_checkpoint_payload(tmp_path / "b" / "last.pt")["training_state"]["epoch"] == 2
    resumed = run(tmp_path / "b", resume=True, sampler=sampler)
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4]
    assert resumed.history == whole.history  # float equality: the same computation, bit for bit
    assert resumed.best_epoch == whole.best_epoch
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    last_a = load_checkpoint_payload(tmp_path / "a" / "last.pt")
    last_b = load_checkpoint_payload(tmp_path / "b" / "last.pt")
    for name, value in last_a["state_dict"].items():  # the last epoch's weights too, not only the best
        assert torch.equal(last_b["state_dict"][name], value), name


def test_resuming_a_finished_run_restores_its_best_and_extending_it_goes_on(tmp_path):
    whole = run(tmp_path, epochs=3)
    again = run(tmp_path, epochs=3, resume=True)
    assert again.history == whole.history
    for name, value in whole.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], value)
    longer = run(tmp_path, epochs=5, resume=True)
    assert [row["epoch"] for row in longer.history] == [1, 2, 3, 4, 5]


def test_resume_without_a_last_checkpoint_starts_afresh_and_refuses_another_model(tmp_path):
    fresh = run(tmp_path, epochs=2, resume=True)
    assert len(fresh.history) == 2
    seed_everything(0)
    other = Trainer(ABMIL(in_dim=4, att_dim=8), epochs=2, progress=False, seed=11,
                    last_checkpoint_path=tmp_path / "last.pt")
    with pytest.raises(ValueError, match="not of this model"):
        other.fit(make_loader(bags(4, 1)), resume=True)


def test_mil_train_resume_continues_to_the_uninterrupted_weights_and_refuses_other_settings(tmp_path):
    from train_cli_helpers import SMALL_ABMIL, planted_folder, run_cli

    from mil_runtime.errors import InvalidInputError
    from mil_train.checkpoint import load_checkpoint

    data = planted_folder(tmp_path / "bags", [i % 2 for i in range(16)])
    common = [*SMALL_ABMIL, data, "--lr", 1e-2, "--batch-size", 2, "--model-arg", "dropout=0.2", "--seed", 4]
    assert run_cli([*common, "-o", tmp_path / "whole.pt", "--epochs", 4]).exit_code == 0
    assert run_cli([*common, "-o", tmp_path / "part.pt", "--epochs", 2]).exit_code == 0  # stopped after epoch 2
    assert (tmp_path / "part.last.pt").exists()
    refused = run_cli([*common, "-o", tmp_path / "part.pt", "--epochs", 4, "--resume", "--weight-decay", 0.1])
    assert refused.exit_code == InvalidInputError.exit_code
    assert "weight_decay was 0.0, now 0.1" in refused.output
    resumed = run_cli([*common, "-o", tmp_path / "part.pt", "--epochs", 4, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    for name in ("", ".last"):
        whole, _ = load_checkpoint(tmp_path / f"whole{name}.pt")
        part, payload = load_checkpoint(tmp_path / f"part{name}.pt")
        for key, value in whole.state_dict().items():
            assert torch.equal(part.state_dict()[key], value), (name, key)
    assert payload["training_state"]["epoch"] == 4


def test_mil_train_folds_resume_goes_on_fold_by_fold(tmp_path):
    import json

    from train_cli_helpers import SMALL_ABMIL, planted_folder, run_cli

    from mil_train.checkpoint import load_checkpoint

    data = planted_folder(tmp_path / "bags", [i % 2 for i in range(12)])
    common = [*SMALL_ABMIL, data, "--lr", 1e-2, "--folds", 2, "--seed", 1]
    assert run_cli([*common, "-o", tmp_path / "whole.pt", "--epochs", 3]).exit_code == 0
    assert run_cli([*common, "-o", tmp_path / "part.pt", "--epochs", 1]).exit_code == 0
    resumed = run_cli([*common, "-o", tmp_path / "part.pt", "--epochs", 3, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    whole = json.loads((tmp_path / "whole.folds.json").read_text())
    part = json.loads((tmp_path / "part.folds.json").read_text())
    assert [f["test"] for f in part["folds"]] == [f["test"] for f in whole["folds"]]
    for fold in (1, 2):
        a, _ = load_checkpoint(tmp_path / f"whole.fold{fold}.last.pt")
        b, _ = load_checkpoint(tmp_path / f"part.fold{fold}.last.pt")
        for key, value in a.state_dict().items():
            assert torch.equal(b.state_dict()[key], value), (fold, key)


@pytest.mark.slow
def test_a_killed_mil_train_process_resumes_to_the_uninterrupted_weights(tmp_path):
    """The real interruption: SIGKILL mid-run (atomic writes leave a whole last checkpoint), then --resume."""
    import os
    import subprocess
    import sys
    import time

    from train_cli_helpers import SMALL_ABMIL, planted_folder

    from mil_train.checkpoint import load_checkpoint

    data = planted_folder(tmp_path / "bags", [i % 2 for i in range(120)])
    epochs = 20
    command = [sys.executable, "-m", "mil_train.cli", *SMALL_ABMIL, str(data), "--epochs", str(epochs), "--lr", "1e-2",
               "--model-arg", "dropout=0.2", "--seed", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*command, "-o", str(tmp_path / "whole.pt")], check=True, env=env, capture_output=True)
    last = tmp_path / "part.last.pt"
    process = subprocess.Popen([*command, "-o", str(tmp_path / "part.pt")], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert process.returncode < 0, "the run ended before it could be killed; give it more work"
    stopped_at = load_checkpoint(last)[1]["training_state"]["epoch"]
    assert 1 <= stopped_at < epochs
    subprocess.run([*command, "-o", str(tmp_path / "part.pt"), "--resume"], check=True, env=env, capture_output=True)
    for name in ("", ".last"):
        whole, _ = load_checkpoint(tmp_path / f"whole{name}.pt")
        part, _ = load_checkpoint(tmp_path / f"part{name}.pt")
        for key, value in whole.state_dict().items():
            assert torch.equal(part.state_dict()[key], value), (name, key)
