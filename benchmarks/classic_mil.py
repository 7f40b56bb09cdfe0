"""Every registered model without spatial structure on the classic MIL benchmarks (MUSK1, ELEPHANT, or
any CSV in that format), under one protocol, beside published figures where a model's paper has them.

Protocol, the same for every model and dataset (that of benchmarks/musk.py):
- stratified 10-fold cross-validation repeated 5 times (fold seeds 0..4): the same folds for every model;
- features standardised with the instances of the training bags only;
- each model with its default arguments (milkit's defaults are torchmil 1.0.2's) at `in_dim` of the
  data, one output (binary), and no per-model setting;
- the same optimiser for all: Adam, lr 5e-4, weight decay 5e-3 (Ilse et al.'s MUSK setup), one bag a
  step, a fixed budget of `--epochs` (default 20) on all training bags, no early stopping and nothing
  chosen on the test folds (the Trainer keeps the lowest-training-loss epoch);
- each held-out fold scored once; a repeat's accuracy and AUROC are over its pooled out-of-fold
  predictions; the table gives mean ± std over the repeats, and the models' summed fold time.

Models whose published form needs spatial structure (graph or coordinates: CAMIL, GTP, PatchGCN, SETMIL,
SmABMIL, SmTransformerABMIL) have none on these datasets; they are listed, not run, and naming one in
`--models` is an error: they are measured on slides, whose tiles have coordinates.

    python benchmarks/classic_mil.py                           # every model, MUSK1 + ELEPHANT, 5 x 10 folds
    python benchmarks/classic_mil.py --models ABMIL,DSMIL --repeats 1 --csv fox=path/to/fox.csv
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from musk import DATA, bag_labels, standardised  # noqa: E402  (the same standardisation as musk.py)

LR, WEIGHT_DECAY = 5e-4, 5e-3
# Published figures on these datasets (mean accuracy ± std, 5 x 10-fold CV) where a model's own paper
# reports them. Ilse et al. 2018 (ICML), Table 1: ABMIL's attention pooling.
PUBLISHED = {
    ("ABMIL", "musk1"): (0.892, 0.040, "Ilse et al. 2018, Table 1"),
    ("ABMIL", "elephant"): (0.868, 0.022, "Ilse et al. 2018, Table 1"),
    # Li, Li & Eliceiri 2021 (CVPR), the MIL-benchmark table (5 x 10-fold CV, their own training setup)
    ("DSMIL", "musk1"): (0.932, 0.023, "Li et al. 2021"),
    ("DSMIL", "elephant"): (0.925, 0.007, "Li et al. 2021"),
}

NOT_BY_DEFAULT = {"Composed"}

_TABLES: dict[str, list] = {}


def spatial(name: str) -> bool:
    """The model's published form needs a graph or coordinates."""
    from mil_train.models import get_model_class

    cls = get_model_class(name)
    return bool(cls.uses_graph or cls.uses_coords)


def split_models(names: list[str] | None) -> tuple[list[str], list[str]]:
    """(models to run, spatial models listed but not run); a named spatial model is a ValueError."""
    from mil_train.models import list_models

    registered = list_models()
    if names is None:  # Composed is a way to build models (by default it is ABMIL), not a published one
        run = [n for n in registered if not spatial(n) and n not in NOT_BY_DEFAULT]
        return run, [n for n in registered if spatial(n)]
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(registered)}")
    needs = [n for n in names if spatial(n)]
    if needs:
        raise ValueError(f"{', '.join(needs)} need(s) a graph or coordinates, which MUSK-style bags do not have; "
                         "they are measured on slides instead")
    return names, []


def load_table(path: str) -> list:
    """The bags of one CSV (mil_train.data.readers.read_mil_csv's format), read once per process."""
    from mil_train.data.readers import read_mil_csv

    if path not in _TABLES:
        _TABLES[path] = read_mil_csv(path)
    return _TABLES[path]


def run_fold(job: dict) -> dict:
    """Train one model on one outer training fold; the held-out fold's labels and probabilities."""
    import torch

    from mil_train.models import create_model
    from mil_train.trainer import Trainer, make_loader, seed_everything

    torch.set_num_threads(1)
    bags = load_table(job["path"])
    train_idx, test_idx = np.asarray(job["train"]), np.asarray(job["test"])
    bags = standardised(bags, train_idx)
    seed_everything(job["seed"])
    model = create_model(job["model"], in_dim=int(bags[0]["X"].shape[1]), n_classes=1)
    trainer = Trainer(
        model,
        optimizer=lambda params: torch.optim.Adam(params, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True),
        epochs=job["epochs"], seed=job["seed"], progress=False,
    )
    started = time.perf_counter()
    trainer.fit(make_loader([bags[i] for i in train_idx], batch_size=1, shuffle=True, seed=job["seed"]))
    predicted = trainer.predict(make_loader([bags[i] for i in test_idx], batch_size=1))
    return {**{k: job[k] for k in ("model", "dataset", "repeat", "fold")},
            "y": predicted["Y"].numpy().astype(int).tolist(),
            "p": predicted["probabilities"].reshape(-1).numpy().astype(float).tolist(),
            "seconds": time.perf_counter() - started}


def jobs_for(models: list[str], datasets: dict[str, str], repeats: int, folds: int, epochs: int,
             first_repeat: int = 0) -> list[dict]:
    """One job per (model, dataset, repeat, fold); the folds depend on the dataset and repeat only."""
    from sklearn.model_selection import StratifiedKFold

    jobs = []
    for dataset, path in datasets.items():
        labels = bag_labels(load_table(path))
        for repeat in range(first_repeat, first_repeat + repeats):
            splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=repeat)
            for fold, (train, test) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
                for model in models:
                    jobs.append({"model": model, "dataset": dataset, "path": path, "repeat": repeat, "fold": fold,
                                 "seed": 1000 * repeat + fold, "train": train.tolist(), "test": test.tolist(),
                                 "epochs": epochs})
    return jobs


def summarise(results: list[dict], model: str, dataset: str, folds: int = 10) -> dict:
    """Mean ± std over repeats of accuracy (threshold 0.5) and AUROC on the pooled out-of-fold predictions.

    Only complete repeats (all `folds` folds) count while there is one; a run cut short before its first
    repeat finished is summarised over the folds it has, and marked partial.
    """
    from sklearn.metrics import roc_auc_score

    rows = [r for r in results if r["model"] == model and r["dataset"] == dataset]
    by_repeat = {rep: [r for r in rows if r["repeat"] == rep] for rep in sorted({r["repeat"] for r in rows})}
    complete = {rep: group for rep, group in by_repeat.items() if len({r["fold"] for r in group}) >= folds}
    chosen = complete or by_repeat
    accuracy, auroc = [], []
    for group in chosen.values():
        y = np.concatenate([r["y"] for r in group])
        p = np.concatenate([r["p"] for r in group])
        accuracy.append(float(np.mean((p >= 0.5) == (y == 1))))
        auroc.append(float(roc_auc_score(y, p)))
    used = [r for group in chosen.values() for r in group]
    return {"model": model, "dataset": dataset, "accuracy": accuracy, "auroc": auroc, "repeats": len(accuracy),
            "folds": len(used), "partial": not complete, "of_folds": folds,
            "seconds": float(sum(r["seconds"] for r in used)), "published": PUBLISHED.get((model, dataset))}


def table(rows: list[dict], skipped: list[str]) -> str:
    """Mean ± std over repeats; with one repeat there is no spread to give, so none is printed."""
    lines = ["| model | dataset | repeats x folds | accuracy | AUROC | published accuracy | fold time (s) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        pub = row["published"]
        published = f"{pub[0]:.3f} ± {pub[1]:.3f} ({pub[2]})" if pub else "-"
        repeats = row.get("repeats", len(row["accuracy"]))
        folds = row.get("folds", 0) // max(repeats, 1)
        done = f"{row['folds']} of {row['of_folds']} folds (partial)" if row.get("partial") else f"{repeats} x {folds}"
        lines.append(f"| {row['model']} | {row['dataset']} | {done} | {_spread(row['accuracy'])} "
                     f"| {_spread(row['auroc'])} | {published} | {row['seconds']:.0f} |")
    for name in skipped:
        lines.append(f"| {name} | - | - | needs spatial structure (graph or coords) | | | |")
    return "\n".join(lines)


def _spread(values: list[float]) -> str:
    return f"{np.mean(values):.3f}" if len(values) < 2 else f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def read_fold_log(path: Path | None) -> list[dict]:
    """Finished folds of an earlier (maybe interrupted) run: one JSON object per line."""
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _key(row: dict) -> tuple:
    return row["model"], row["dataset"], row["repeat"], row["fold"]


def parse_csvs(pairs: list[str]) -> dict[str, str]:
    datasets = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not Path(path).is_file():
            raise ValueError(f"--csv takes NAME=PATH of an existing file, got {pair!r}")
        datasets[name] = path
    return datasets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="comma-separated registered names; default: every model "
                                                       "without spatial structure")
    parser.add_argument("--datasets", default="musk1,elephant", help=f"comma-separated CSVs of {DATA}; '' for none")
    parser.add_argument("--csv", action="append", default=[], metavar="NAME=PATH", help="another dataset (repeatable)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--first-repeat", type=int, default=0, help="run repeats FIRST .. FIRST+REPEATS-1 (fold "
                                                                    "seeds), to add repeats to an earlier run")
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="processes, one fold each at a time")
    parser.add_argument("--json", type=Path, default=None, help="also write the per-fold results and the table here")
    parser.add_argument("--fold-log", type=Path, default=None,
                        help="append each finished fold here (JSON lines) and skip the folds it already holds, so "
                             "an interrupted run resumes; the table covers every fold in it")
    parser.add_argument("--combine", type=Path, nargs="+", default=None, metavar="LOG",
                        help="print the table of these fold logs or --json files, run nothing")
    args = parser.parse_args(argv)
    try:
        models, skipped = split_models(None if args.models is None else [m.strip() for m in args.models.split(",")])
        datasets = {d: str(DATA / f"{d}.csv") for d in args.datasets.split(",") if d.strip()}
        missing = [p for p in datasets.values() if not Path(p).is_file()]
        if missing:
            raise ValueError(f"{', '.join(missing)} missing; musk1 and elephant ship in ../shared/data/mil")
        datasets.update(parse_csvs(args.csv))
    except ValueError as exc:
        parser.error(str(exc))

    if args.combine:
        print(table(combined(args.combine, args.folds), skipped if args.models is None else []))
        return 0

    import torch

    started = time.perf_counter()
    done = read_fold_log(args.fold_log)
    finished = {_key(row) for row in done}
    jobs = [job for job in jobs_for(models, datasets, args.repeats, args.folds, args.epochs, args.first_repeat)
            if _key(job) not in finished]
    results = done + list(run_jobs(jobs, args.workers, args.fold_log))
    wall = time.perf_counter() - started
    ran = {(r["model"], r["dataset"]) for r in results}
    rows = [summarise(results, model, dataset, args.folds) for model in models for dataset in datasets
            if (model, dataset) in ran]
    text = table(rows, skipped)
    print(f"{args.repeats} x {args.folds}-fold CV, {args.epochs} epochs; torch {torch.__version__}; "
          f"{platform.processor() or platform.machine()}; {args.workers} worker(s); wall {wall:.0f} s")
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps({"results": results, "rows": rows, "table": text}, indent=1))
    return 0


def run_jobs(jobs: list[dict], workers: int, fold_log: Path | None):
    """Each finished fold, in the order they finish; appended to `fold_log` as soon as it is done."""
    def logged(result: dict) -> dict:
        if fold_log is not None:
            with open(fold_log, "a") as handle:
                handle.write(json.dumps(result) + "\n")
        return result

    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap_unordered(run_fold, jobs):
                yield logged(result)
    else:
        for job in jobs:
            yield logged(run_fold(job))


def combined(paths: list[Path], folds: int = 10) -> list[dict]:
    """Table rows of several runs' folds (fold logs or --json files); a fold present twice counts once."""
    results: dict[tuple, dict] = {}
    for path in paths:
        rows = json.loads(path.read_text())["results"] if path.suffix == ".json" else read_fold_log(path)
        results.update({_key(row): row for row in rows})
    pairs = sorted({(r["model"], r["dataset"]) for r in results.values()})
    return [summarise(list(results.values()), model, dataset, folds) for model, dataset in pairs]


if __name__ == "__main__":
    sys.exit(main())
