"""Trainer: learning, reproducibility, loss weighting, early stopping, best weights, logs, checkpoints."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from tensordict import TensorDict

from mil_train.checkpoint import load_checkpoint
from mil_train.models import ABMIL
from mil_train.models.registry import register_model
from mil_train.trainer import Trainer, make_loader, seed_everything

D = 6


def toy_bags(n_bags: int, seed: int, n_classes: int = 1) -> list[TensorDict]:
    """Bag label k > 0 <=> one instance carries a +5 shift in feature k-1 (witness instance)."""
    g = torch.Generator().manual_seed(seed)
    bags = []
    for i in range(n_bags):
        n = int(torch.randint(3, 9, (1,), generator=g))
        X = torch.randn(n, D, generator=g)
        label = i % (2 if n_classes == 1 else n_classes)
        if label > 0:
            X[int(torch.randint(0, n, (1,), generator=g)), label - 1] += 5.0
        Y = torch.tensor(float(label)) if n_classes == 1 else torch.tensor(label)
        bags.append(TensorDict({"X": X, "Y": Y}, batch_size=[]))
    return bags


def loader(bags, batch_size=4, shuffle=False, seed=0):
    return make_loader(bags, batch_size=batch_size, shuffle=shuffle, seed=seed)


def new_model(n_classes=1, seed=0, **kwargs):
    seed_everything(seed)
    return ABMIL(in_dim=D, n_classes=n_classes, att_dim=8, embed_dims=(16,), **kwargs)


@register_model
class AuxABMIL(ABMIL):
    """ABMIL plus an auxiliary term that pulls every weight towards 0 (to test loss weighting)."""

    name = "_TestAuxABMIL"

    def compute_loss(self, batch):
        logits, terms = super().compute_loss(batch)
        terms["aux"] = sum((p**2).sum() for p in self.parameters())
        return logits, terms


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; one thread avoids contention on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data():
    return toy_bags(40, seed=1), toy_bags(16, seed=2)


def test_learns_a_witness_task(data):
    train, val = data
    trainer = Trainer(new_model(), lr=1e-2, epochs=15, progress=False)
    history = trainer.fit(loader(train, shuffle=True), loader(val))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert trainer.evaluate(loader(val))["accuracy"] >= 0.9


def test_multiclass_runs_and_reports_metrics():
    train = toy_bags(30, seed=3, n_classes=3)
    trainer = Trainer(new_model(n_classes=3), lr=1e-2, epochs=3, progress=False, monitor="accuracy")
    history = trainer.fit(loader(train), loader(train))
    assert {"val_auroc", "val_accuracy", "val_balanced_accuracy", "val_f1", "val_loss", "train_cls"} <= set(history[0])
    assert trainer.monitor == "val_accuracy" and trainer.mode == "max"


def test_same_seed_same_run_other_seed_other_run(data):
    train, val = data

    def run(seed):
        model = new_model(seed=seed, dropout=0.3)
        trainer = Trainer(model, lr=1e-2, epochs=3, seed=seed, progress=False)
        history = trainer.fit(loader(train, shuffle=True, seed=seed), loader(val))
        return history, model.state_dict()

    h1, w1 = run(0)
    h2, w2 = run(0)
    h3, _ = run(1)
    assert h1 == h2
    for k in w1:
        assert torch.equal(w1[k], w2[k])
    assert h1 != h3


def test_total_loss_is_weighted_sum_and_zero_weight_has_no_effect(data):
    train, _ = data
    weights = {"cls": 2.0, "aux": 0.5}
    aux_model = AuxABMIL(in_dim=D, att_dim=8)
    trainer = Trainer(aux_model, lr=1e-3, epochs=2, loss_weights=weights, progress=False)
    for row in trainer.fit(loader(train)):
        assert row["train_loss"] == pytest.approx(2.0 * row["train_cls"] + 0.5 * row["train_aux"], rel=1e-5)

    seed_everything(5)
    plain = ABMIL(in_dim=D, att_dim=8)
    seed_everything(5)
    muted = AuxABMIL(in_dim=D, att_dim=8)
    Trainer(plain, lr=1e-2, epochs=2, progress=False).fit(loader(train))
    Trainer(muted, lr=1e-2, epochs=2, loss_weights={"aux": 0.0}, progress=False).fit(loader(train))
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(muted.state_dict()[k], v)


def test_early_stopping_with_nothing_to_improve(data):
    train, val = data
    trainer = Trainer(new_model(), lr=0.0, epochs=50, patience=2, progress=False)
    history = trainer.fit(loader(train), loader(val))
    # lr=0: val_loss never changes, so epoch 1 stays best and epochs 2, 3 exhaust the patience.
    assert len(history) == 3
    assert trainer.best_epoch == 1


def test_best_weights_restored_and_checkpointed(data, tmp_path):
    train, val = data
    ckpt = tmp_path / "best.pt"
    model = new_model()
    trainer = Trainer(
        model, lr=3e-2, epochs=8, progress=False, checkpoint_path=ckpt, class_names=["neg", "pos"],
        provenance={"dataset": "toy"},
    )
    history = trainer.fit(loader(train, shuffle=True), loader(val))
    best = min(history, key=lambda r: r["val_loss"])
    assert trainer.best_epoch == best["epoch"]
    # The model in memory is the best epoch's, not the last epoch's.
    assert trainer.evaluate(loader(val))["loss"] == pytest.approx(best["val_loss"], rel=1e-6)
    loaded, payload = load_checkpoint(ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert payload["class_names"] == ["neg", "pos"]
    assert payload["provenance"]["epoch"] == best["epoch"]
    assert payload["provenance"]["dataset"] == "toy"
    assert not list(tmp_path.glob("*.tmp"))


def test_csv_log_has_one_row_per_epoch(data, tmp_path):
    train, val = data
    log = tmp_path / "log.csv"
    trainer = Trainer(
        new_model(), lr=1e-2, epochs=3, progress=False, log_csv=log,
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )
    history = trainer.fit(loader(train), loader(val))
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert {"epoch", "train_loss", "train_cls", "val_loss", "val_auroc", "val_accuracy", "lr"} <= set(rows[0])
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-2, 5e-3, 2.5e-3])
    assert float(rows[1]["val_loss"]) == pytest.approx(history[1]["val_loss"])


def test_evaluate_is_deterministic_and_restores_training_mode(data):
    train, val = data
    model = new_model(dropout=0.5)
    trainer = Trainer(model, progress=False)
    model.train()
    first, second = trainer.evaluate(loader(val)), trainer.evaluate(loader(val))
    assert first == second
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_predict_returns_per_bag_attention_without_padding(data):
    _, val = data
    trainer = Trainer(new_model(), progress=False)
    out = trainer.predict(loader(val, batch_size=5))
    assert out["logits"].shape == (len(val), 1)
    torch.testing.assert_close(out["probabilities"], torch.sigmoid(out["logits"]))
    assert [a.shape[0] for a in out["attention"]] == [b["X"].shape[0] for b in val]
    for a in out["attention"]:
        assert math.isclose(float(a.sum()), 1.0, rel_tol=1e-5)


def test_undefined_metric_on_single_class_validation_still_checkpoints(data, tmp_path):
    train, val = data
    positives = [b for b in val if float(b["Y"]) == 1.0]
    trainer = Trainer(new_model(), lr=1e-2, epochs=2, monitor="auroc", progress=False, checkpoint_path=tmp_path / "m.pt")
    history = trainer.fit(loader(train), loader(positives))
    assert all(math.isnan(row["val_auroc"]) for row in history)
    assert trainer.best_epoch == 1 and (tmp_path / "m.pt").exists()


def test_without_validation_monitors_train_loss(data):
    train, _ = data
    trainer = Trainer(new_model(), lr=1e-2, epochs=3, progress=False)
    history = trainer.fit(loader(train))
    assert trainer.best_epoch == min(history, key=lambda r: r["train_loss"])["epoch"]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="monitor"):
        Trainer(new_model(), monitor="precision@k", progress=False)
    with pytest.raises(ValueError, match="epochs"):
        Trainer(new_model(), epochs=0, progress=False)
    with pytest.raises(ValueError, match="mode"):
        Trainer(new_model(), mode="up", progress=False)


def test_bf16_runs_the_products_in_bf16_keeps_float32_weights_and_learns_the_same(data):
    train, val = data
    seen = []
    results = {}
    for precision in ("fp32", "bf16"):
        model = new_model()
        hook = model.embed.register_forward_hook(lambda module, args, out: seen.append((precision, out.dtype)))
        trainer = Trainer(model, lr=1e-2, epochs=15, progress=False, precision=precision)
        history = trainer.fit(loader(train, shuffle=True), loader(val))
        hook.remove()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(math.isfinite(row["train_loss"]) for row in history)
        results[precision] = (history, trainer.evaluate(loader(val)))
    assert {dtype for precision, dtype in seen if precision == "fp32"} == {torch.float32}
    assert {dtype for precision, dtype in seen if precision == "bf16"} == {torch.bfloat16}
    (fp32_history, fp32_eval), (bf16_history, bf16_eval) = results["fp32"], results["bf16"]
    assert bf16_eval["accuracy"] >= 0.9 and bf16_eval["accuracy"] == fp32_eval["accuracy"]
    assert bf16_history[0]["train_loss"] == pytest.approx(fp32_history[0]["train_loss"], rel=0.05)


def test_fp16_needs_cuda_and_unknown_precisions_are_refused():
    with pytest.raises(ValueError, match="CUDA"):
        Trainer(new_model(), precision="fp16", progress=False)
    with pytest.raises(ValueError, match="precision"):
        Trainer(new_model(), precision="int8", progress=False)
