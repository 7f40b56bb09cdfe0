"""Training on bags whose outcome depends on planted instances: held-out c-index and R².

Bags from mil_train.tasks.synthetic: the planted instances carry each bag's grade, which sets its
survival time (or target). Split train / validation (early stopping) / test; the test bags are
seen only once, at the end. The true risk's c-index on these test bags is printed beside the model's.
"""

from __future__ import annotations

import numpy as np
import torch

from mil_train.metrics import concordance_index
from mil_train.models import create_model
from mil_train.tasks import survival_bin_edges
from mil_train.tasks.synthetic import planted_regression_bags, planted_survival_bags
from mil_train.trainer import Trainer, make_loader

N_TRAIN, N_VAL, N_TEST = 240, 60, 100


def split(bags):
    return bags[:N_TRAIN], bags[N_TRAIN:N_TRAIN + N_VAL], bags[N_TRAIN + N_VAL:]


def fit_and_test(task, bags, monitor: str, lr: float = 5e-3, epochs: int = 30, seed: int = 0):
    train, val, test = split(bags)
    torch.manual_seed(seed)
    model = create_model("ABMIL", in_dim=16, att_dim=16, task=task)
    trainer = Trainer(model, lr=lr, epochs=epochs, patience=8, monitor=monitor, seed=seed, progress=False)
    trainer.fit(make_loader(train, batch_size=8, shuffle=True, seed=seed), make_loader(val, batch_size=32))
    return trainer.evaluate(make_loader(test, batch_size=32)), trainer


def oracle_c_index(bags) -> float:
    Y = np.stack([bag["Y"].numpy() for bag in bags])
    return concordance_index(Y[:, 0], Y[:, 1], [float(bag["risk"]) for bag in bags])


def test_cox_head_ranks_held_out_bags():
    bags = planted_survival_bags(N_TRAIN + N_VAL + N_TEST, seed=0)
    report, _ = fit_and_test({"type": "survival", "loss": "cox"}, bags, "val_c_index")
    print(f"cox: test c-index {report['c_index']:.3f} (true risk {oracle_c_index(split(bags)[2]):.3f})")
    assert report["c_index"] >= 0.75


def test_discrete_hazard_head_ranks_held_out_bags():
    bags = planted_survival_bags(N_TRAIN + N_VAL + N_TEST, seed=0)
    train = split(bags)[0]
    Y = np.stack([bag["Y"].numpy() for bag in train])
    edges = survival_bin_edges(Y[:, 0], Y[:, 1], n_bins=4)
    report, _ = fit_and_test({"type": "survival", "n_bins": 4, "bin_edges": edges}, bags, "val_c_index")
    print(f"nll: test c-index {report['c_index']:.3f} (true risk {oracle_c_index(split(bags)[2]):.3f})")
    assert report["c_index"] >= 0.75


def test_regression_head_fits_held_out_bags():
    bags = planted_regression_bags(N_TRAIN + N_VAL + N_TEST, seed=0)
    targets = np.array([float(bag["Y"]) for bag in split(bags)[0]])
    task = {"type": "regression", "target_mean": [targets.mean()], "target_std": [targets.std()]}
    report, _ = fit_and_test(task, bags, "val_mae")
    print(f"regression: test MAE {report['mae']:.3f}, R² {report['r2']:.3f}")
    assert report["r2"] >= 0.6


def test_training_is_deterministic():
    bags = planted_survival_bags(60, seed=3)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create_model("ABMIL", in_dim=16, att_dim=8, task={"type": "survival", "loss": "cox"})
        trainer = Trainer(model, lr=5e-3, epochs=2, seed=0, progress=False)
        trainer.fit(make_loader(bags, batch_size=8, shuffle=True))
        runs.append(trainer.predict(make_loader(bags, batch_size=16))["risk"])
    assert torch.equal(runs[0], runs[1])
