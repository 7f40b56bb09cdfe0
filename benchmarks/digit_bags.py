"""A small CNN trained end to end through ABMIL on digit bags: held-out AUROC against the number of
training bags, the experiment of Ilse et al.'s MNIST-bags (ICML 2018, section 5.2, mean bag size 10).

Data (mil_train.data.digits): scikit-learn's bundled 8x8 digits, target digit 9, bag sizes N(10, 2);
training and test bags draw from disjoint image pools (70% / 30%). How this differs from MNIST-bags:
8x8 images with 17 grey levels (MNIST: 28x28, 256), 1,797 digits in all (MNIST: 70,000), so a test
bag's images are unseen but the pool is small. The numbers are therefore beside Ilse et al.'s, not
comparable cell for cell.

Model: create_model("ABMIL", in_dim=32, att_dim=32, feat_ext={"name": "small_cnn", "out_dim": 32});
Adam lr 1e-3, weight decay 1e-4, one bag a step, a fixed 30 epochs (the Trainer keeps the lowest
training-loss epoch); scored once on `--test-bags` held-out bags: bag AUROC, and instance AUROC of the
attention weights against the digit labels (does attention find the 9s?). Mean ± std over `--seeds`.

    python benchmarks/digit_bags.py                       # 50, 100, 200, 500 training bags, 3 seeds
    python benchmarks/digit_bags.py --train-bags 50,200 --seeds 1
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import sys
import time

import numpy as np


def run(job: dict) -> dict:
    import torch
    from sklearn.metrics import roc_auc_score

    from mil_train.data.digits import digit_bags
    from mil_train.models import create_model
    from mil_train.trainer import Trainer, make_loader, seed_everything

    torch.set_num_threads(1)
    seed = job["seed"]
    seed_everything(seed)
    train = digit_bags(job["n_train"], seed=100 + seed)
    test = digit_bags(job["n_test"], split="test", seed=200 + seed)
    model = create_model("ABMIL", in_dim=32, n_classes=1, att_dim=32, feat_ext={"name": "small_cnn", "out_dim": 32})
    trainer = Trainer(model, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4),
                      epochs=job["epochs"], seed=seed, progress=False)
    started = time.perf_counter()
    trainer.fit(make_loader(train, batch_size=1, shuffle=True, seed=seed))
    seconds = time.perf_counter() - started
    predicted = trainer.predict(make_loader(test, batch_size=1))
    y_inst = np.concatenate([bag["y_inst"].numpy() for bag in test])
    attention = np.concatenate([a.numpy() for a in predicted["attention"]])
    return {**job, "bag_auroc": float(roc_auc_score(predicted["Y"].numpy(), predicted["probabilities"].reshape(-1))),
            "instance_auroc": float(roc_auc_score(y_inst, attention)), "seconds": seconds}


def table(results: list[dict], sizes: list[int]) -> str:
    lines = ["| training bags | bag AUROC | instance AUROC (attention) | fit time per run (s) |", "|---|---|---|---|"]
    for n in sizes:
        rows = [r for r in results if r["n_train"] == n]
        bag, inst = [r["bag_auroc"] for r in rows], [r["instance_auroc"] for r in rows]
        lines.append(f"| {n} | {np.mean(bag):.3f} ± {np.std(bag):.3f} | {np.mean(inst):.3f} ± {np.std(inst):.3f} "
                     f"| {np.mean([r['seconds'] for r in rows]):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-bags", default="50,100,200,500", help="comma-separated numbers of training bags")
    parser.add_argument("--test-bags", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.train_bags.split(",") if n.strip()]
    jobs = [{"n_train": n, "n_test": args.test_bags, "seed": s, "epochs": args.epochs}
            for n in sorted(sizes, reverse=True) for s in range(args.seeds)]
    started = time.perf_counter()
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            results = list(pool.imap_unordered(run, jobs))
    else:
        results = [run(job) for job in jobs]
    import torch

    print(f"small CNN + ABMIL on digit bags (target 9, mean size 10), {args.seeds} seed(s), {args.epochs} epochs, "
          f"{args.test_bags} test bags; torch {torch.__version__}; {platform.processor() or platform.machine()}; "
          f"{args.workers} worker(s); wall {time.perf_counter() - started:.0f} s")
    print(table(results, sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
