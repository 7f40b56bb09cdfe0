"""ABMIL on the classic MIL benchmarks MUSK1 and ELEPHANT, next to Ilse et al. (ICML 2018, Table 1).

Protocol: stratified 10-fold cross-validation repeated 5 times (fold seeds 0..4). In each fold the
features are standardised with statistics of the training bags only, the model trains for a fixed
40 epochs on all training bags (`--val-fraction 0.15 --patience 10` instead holds out a stratified
inner validation split and stops early on its loss), and the held-out fold is scored once. A repeat's
accuracy is the fraction of all bags classified right over its 10 folds; the table gives the mean
and the std over the repeats.

Model and optimiser follow Ilse et al.'s MUSK setup: embedding fc-256, fc-128, fc-64 (ReLU, dropout 0.5),
attention dim 64, Adam lr 5e-4, weight decay 5e-3, betas (0.9, 0.999), one bag per step.

    python benchmarks/musk.py                      # both datasets, 5 x 10 folds, plain attention
    python benchmarks/musk.py --gated --datasets musk1 --repeats 1
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mil"
PUBLISHED = {  # Ilse et al. 2018, Table 1: mean accuracy, std
    ("musk1", False): (0.892, 0.040),
    ("elephant", False): (0.868, 0.022),
    ("musk1", True): (0.900, 0.050),
    ("elephant", True): (0.857, 0.027),
}

_BAGS_CACHE: dict[str, list] = {}


def load_bags(dataset: str) -> list:
    """Bags of one dataset, read once per process."""
    from mil_train.data.readers import read_mil_csv

    if dataset not in _BAGS_CACHE:
        path = DATA / f"{dataset}.csv"
        if not path.is_file():
            sys.exit(f"musk.py: {path} is missing; it ships in ../shared/data/mil")
        _BAGS_CACHE[dataset] = read_mil_csv(path)
    return _BAGS_CACHE[dataset]


def bag_labels(bags: list) -> np.ndarray:
    return np.array([int(bag["Y"]) for bag in bags])


def standardised(bags: list, fit_on: np.ndarray) -> list:
    """Every bag with features scaled by mean/std of the instances of the bags in `fit_on`."""
    from sklearn.preprocessing import StandardScaler

    from mil_train.data.bag import make_bag

    scaler = StandardScaler().fit(np.concatenate([bags[i]["X"].numpy() for i in fit_on]))
    return [make_bag(scaler.transform(bag["X"].numpy()).astype(np.float32), bag["Y"]) for bag in bags]


def run_fold(job: dict) -> dict:
    """Train on one outer training fold, return the test fold's correct count and size."""
    import torch
    from sklearn.model_selection import train_test_split

    from mil_train.models import ABMIL
    from mil_train.trainer import Trainer, make_loader, seed_everything

    torch.set_num_threads(1)
    bags = load_bags(job["dataset"])
    train_idx, test_idx = np.asarray(job["train"]), np.asarray(job["test"])
    bags = standardised(bags, train_idx)
    labels = bag_labels(bags)
    seed = job["seed"]
    if job["val_fraction"] > 0:
        fit_idx, val_idx = train_test_split(
            train_idx, test_size=job["val_fraction"], stratify=labels[train_idx], random_state=seed
        )
    else:  # no inner validation: a fixed number of epochs (the Trainer keeps the lowest-train-loss epoch)
        fit_idx, val_idx = train_idx, None
    seed_everything(seed)
    model = ABMIL(
        in_dim=bags[0]["X"].shape[1], n_classes=1, att_dim=64, gated=job["gated"],
        embed_dims=(256, 128, 64), dropout=job["dropout"],
    )
    trainer = Trainer(
        model,
        optimizer=lambda params: torch.optim.Adam(
            params, lr=5e-4, betas=(0.9, 0.999), weight_decay=5e-3, foreach=True
        ),
        epochs=job["epochs"],
        patience=job["patience"],
        monitor="val_loss",
        seed=seed,
        progress=False,
    )
    trainer.fit(
        make_loader([bags[i] for i in fit_idx], batch_size=1, shuffle=True, seed=seed),
        None if val_idx is None else make_loader([bags[i] for i in val_idx], batch_size=1),
    )
    test = trainer.evaluate(make_loader([bags[i] for i in test_idx], batch_size=1))
    return {**job, "correct": round(test["accuracy"] * len(test_idx)), "n": len(test_idx), "best_epoch": trainer.best_epoch}


def jobs_for(dataset: str, args: argparse.Namespace) -> list[dict]:
    from sklearn.model_selection import StratifiedKFold

    labels = bag_labels(load_bags(dataset))
    jobs = []
    for repeat in range(args.repeats):
        folds = StratifiedKFold(n_splits=args.folds, shuffle=True, random_state=repeat)
        for fold, (train, test) in enumerate(folds.split(np.zeros(len(labels)), labels)):
            jobs.append({
                "dataset": dataset, "repeat": repeat, "fold": fold, "seed": 1000 * repeat + fold,
                "train": train.tolist(), "test": test.tolist(), "gated": args.gated,
                "epochs": args.epochs, "patience": args.patience, "val_fraction": args.val_fraction,
                "dropout": args.dropout,
            })
    return jobs


def summarise(results: list[dict], dataset: str, gated: bool) -> dict:
    repeats = sorted({r["repeat"] for r in results if r["dataset"] == dataset})
    per_repeat = []
    for repeat in repeats:
        rows = [r for r in results if r["dataset"] == dataset and r["repeat"] == repeat]
        per_repeat.append(sum(r["correct"] for r in rows) / sum(r["n"] for r in rows))
    epochs = [r["best_epoch"] for r in results if r["dataset"] == dataset]
    return {
        "dataset": dataset, "mean": float(np.mean(per_repeat)), "std": float(np.std(per_repeat)),
        "per_repeat": per_repeat, "median_best_epoch": float(np.median(epochs)),
        "published": PUBLISHED[(dataset, gated)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="musk1,elephant", help="comma-separated: musk1, elephant")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--gated", action="store_true", help="gated attention instead of plain")
    parser.add_argument("--epochs", type=int, default=40, help="(maximum) epochs per fold")
    parser.add_argument("--patience", type=int, default=None, help="early-stopping patience (epochs)")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="inner validation share of training bags; 0 = none")
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=2, help="processes, one fold each at a time")
    args = parser.parse_args(argv)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    for dataset in datasets:
        if (dataset, False) not in PUBLISHED:
            parser.error(f"unknown dataset {dataset!r}; choose from musk1, elephant")

    import torch

    start = time.perf_counter()
    jobs = [job for dataset in datasets for job in jobs_for(dataset, args)]
    # Longest jobs first so the pool does not end waiting on one straggler.
    jobs.sort(key=lambda j: -len(j["train"]))
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            results = list(pool.imap_unordered(run_fold, jobs))
    else:
        results = [run_fold(job) for job in jobs]
    wall = time.perf_counter() - start

    attention = "gated attention" if args.gated else "attention"
    print(f"ABMIL ({attention}), {args.repeats} x {args.folds}-fold CV; torch {torch.__version__}; "
          f"{platform.processor() or platform.machine()}; {args.workers} worker(s); wall {wall:.0f} s")
    print(f"{'dataset':<10} {'milkit accuracy':>18} {'Ilse et al. 2018':>18} {'within 1 std':>13} {'median best epoch':>18}")
    ok = True
    for dataset in datasets:
        s = summarise(results, dataset, args.gated)
        ref_mean, ref_std = s["published"]
        within = s["mean"] >= ref_mean - ref_std
        ok &= within
        print(f"{dataset:<10} {s['mean']:>10.3f} ± {s['std']:.3f} {ref_mean:>10.3f} ± {ref_std:.3f} "
              f"{'yes' if within else 'NO':>13} {s['median_best_epoch']:>18.0f}")
        print(f"{'':<10} per repeat: {', '.join(f'{a:.3f}' for a in s['per_repeat'])}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
