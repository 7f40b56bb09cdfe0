"""Training speed: milkit's Trainer vs torchmil 1.0.2's Trainer on the same model, data, optimiser, epochs.

    python benchmarks/training.py [--models ABMIL,TransMIL,SmABMIL]
                                  [--variants torchmil,milkit,milkit_bf16,floor,milkit_ddp2]
                                  [--train-bags 12] [--val-bags 8] [--epochs 3] [--bag-size 1000,10000]
                                  [--lr 1e-3] [--device cpu] [--threads N] [--markdown section.md] [--json out.json]

Data: `mil_train.data.synthetic_bags` with 1024-d features, bag sizes uniform in --bag-size, half the bags
positive, tiles on a grid with holes; 10 % of a positive bag's instances (clustered on the grid) are
witnesses, shifted by +2 in 4 features (synthetic_bags) and by a further +2 in the first 64 features here, so
that the models learn the task within a few epochs. The graph models (SmABMIL, PatchGCN) get the graph
torchmil's datasets build (`TORCHMIL_GRAPH_RULE`: grid8, D^-1/2 A D^-1/2), precomputed once for both sides:
milkit's edge list in its bag, torchmil's sparse adjacency `adj` in its bag. Bags live in memory; both
DataLoaders hold the same X tensors, batch size 1, shuffled by generators with the same seed (the same order).

Model: torchmil's model (`mil_train.interop.torchmil.build_reference`, seeded) and the milkit model holding
its weights (`from_torchmil`), with the milkit model's default constructor arguments (in_dim=1024,
n_classes=1; none of these has dropout by default, so both sides follow the same trajectory up to float
rounding). Optimiser: Adam(lr=--lr) on each side's parameters. Each variant trains --epochs epochs,
validating every epoch and keeping the best weights by validation accuracy:
  torchmil     torchmil.utils.trainer.Trainer(model, optimizer, metrics_dict={"accuracy": ...},
               obj_metric="accuracy", disable_pbar=True, verbose=False).train(epochs, train, val), with
               torchmil.data.collate_fn; the metric is torchmetrics' BinaryAccuracy on sigmoid(logits)
               (`logit_accuracy`: on raw logits it reads a logit in [0, 1] as a probability)
  milkit       mil_train.trainer.Trainer(model, optimizer=..., epochs=..., monitor="val_accuracy",
               progress=False).fit(train, val), with mil_train.data.collate
  milkit_bf16  the same with Trainer(precision="bf16"): forward and loss under torch.autocast(bfloat16),
               parameters, gradients and loss float32; CPUs with AVX512_BF16 / AMX run bf16 GEMMs faster,
               the others may be slower
  floor        the milkit model in a bare loop (zero_grad, compute_loss, backward, step; then a no-grad pass
               over the validation bags, keeping the best state), no Trainer: the Trainer's own cost is the
               difference between milkit and floor
  milkit_ddp2  the milkit Trainer data-parallel over 2 processes on this machine (mil_train.distributed:
               launch_local with torchrun's environment, gloo over loopback, DDP), each process with
               threads / 2 torch threads and its balanced share (by instances) of the training and
               validation bags: 1 vs 2 processes on the same cores. Gradients are averaged over the two
               ranks, so an epoch takes half the optimiser steps, each on two bags: the trajectory differs
               from (b), and so may the accuracy
Reported: fit wall time and training bags/s = epochs x training bags / fit wall (each epoch's validation
pass is in the wall: it is part of training). Accuracy check: each variant's best model scored in eval mode,
float32, on the validation bags by one rule (logit > 0); torchmil's and milkit's accuracies must be equal
(the table says so per model, with the largest validation-logit difference between the two).

One fresh process per (model, variant), run in the order of --variants, each with one untimed warm-up step
on a copy of its model on the smallest training bag. Threads: torch.set_num_threads(--threads, default
the usable cores). --device cuda runs the same on a GPU (where there is none, the table says so).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, Path(__file__).resolve().parent):  # milkit, and benchmarks/machine_info.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from machine_info import cpu_model, package_version, usable_cores  # noqa: E402

IN_DIM = 1024
DEFAULT_MODELS = ("ABMIL", "TransMIL", "SmABMIL")
VARIANTS = ("torchmil", "milkit", "milkit_bf16", "floor", "milkit_ddp2")
SEED = 0
EXTRA_SIGNAL_DIMS, EXTRA_SHIFT = 64, 2.0  # witnesses: + this in the first 64 features (synthetic_bags: +2 in 4)


# -- the machine --------------------------------------------------------------------------------




def machine(threads: int, device: str) -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu_model()}, {os.cpu_count()} cores ({usable_cores()} usable by this process), {gpu}, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch "
            f"{package_version('torch')}, torchmil {package_version('torchmil')}, torchmetrics "
            f"{package_version('torchmetrics')}; {threads} torch intra-op threads; device {device}")


# -- data ---------------------------------------------------------------------------------------


def generate_bags(n_bags: int, bag_size: tuple[int, int], seed: int = SEED) -> list[dict]:
    """The benchmark's bags as plain tensors: X (N, D), Y (), coords (N, 2), edge_index (2, E), edge_weight (E,)."""
    from mil_train.data.graphs import TORCHMIL_GRAPH_RULE, build_graph
    from mil_train.data.synthetic import synthetic_bags

    raw = []
    for bag in synthetic_bags(n_bags, feature_dim=IN_DIM, bag_size=bag_size, seed=seed, with_coords=True):
        X, coords = bag["X"], bag["coords"]  # (N, D), (N, 2)
        X[bag["y_inst"] == 1, :EXTRA_SIGNAL_DIMS] += EXTRA_SHIFT  # learnable within a few epochs
        edge_index, edge_weight = build_graph(coords, TORCHMIL_GRAPH_RULE["rule"], **TORCHMIL_GRAPH_RULE["params"])
        raw.append({"X": X, "Y": bag["Y"], "coords": coords, "edge_index": edge_index, "edge_weight": edge_weight})
    return raw


def make_data(raw: list[dict], n_train: int, graph: bool):
    """(milkit train bags, milkit val bags, torchmil train bags, torchmil val bags), sharing the X tensors.

    Graph models: milkit's bag holds the edge list, torchmil's the same graph as a sparse (N, N) `adj`.
    The other models get X and Y only on both sides.
    """
    from tensordict import TensorDict

    from mil_train.data.bag import make_bag
    from mil_train.interop.torchmil import torchmil_adjacency

    milkit, reference = [], []
    for bag in raw:
        X, Y = bag["X"], bag["Y"]
        if graph:
            edge_index, edge_weight = bag["edge_index"], bag["edge_weight"]
            milkit.append(make_bag(X, Y, coords=bag["coords"], edge_index=edge_index, edge_weight=edge_weight))
            adj = torchmil_adjacency(edge_index, edge_weight, 1, X.shape[0])[0].coalesce()  # sparse (N, N)
            reference.append(TensorDict({"X": X, "Y": Y, "adj": adj}, batch_size=[]))
        else:
            milkit.append(make_bag(X, Y))
            reference.append(TensorDict({"X": X, "Y": Y}, batch_size=[]))
    return milkit[:n_train], milkit[n_train:], reference[:n_train], reference[n_train:]


def loader(bags, side: str, shuffle: bool, seed: int = SEED):
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed)
    if side == "torchmil":
        from torchmil.data import collate_fn
    else:
        from mil_train.data.collate import collate as collate_fn
    return DataLoader(bags, batch_size=1, shuffle=shuffle, collate_fn=collate_fn, generator=generator)


# -- models -------------------------------------------------------------------------------------


def build_models(name: str):
    """(torchmil model, milkit model with its weights, milkit config), seeded."""
    import torch

    from mil_train.interop.torchmil import build_reference, from_torchmil
    from mil_train.models import create_model

    torch.manual_seed(SEED)
    config = dict(create_model(name, in_dim=IN_DIM, n_classes=1).config)
    reference = build_reference(name, **config)
    model = from_torchmil(reference, name, **config)
    return reference.train(), model.train(), config


def warm_up(model, batch, compute_loss) -> None:
    """One untimed forward/backward on a copy (first-call allocations, lazy kernels)."""
    model = copy.deepcopy(model)
    _, terms = compute_loss(model, batch)
    sum(terms.values()).backward()


def accuracy_and_logits(side: str, model, val_bags, device) -> tuple[float, list[float]]:
    """Eval-mode fp32 logits of `model` on the validation bags; accuracy = mean((logit > 0) == Y)."""
    import torch

    model.eval()
    logits, right = [], 0
    with torch.no_grad():
        for bag in val_bags:
            X = bag["X"][None].to(device)  # (1, N, D)
            keys = set(bag.keys())
            if side == "torchmil":
                out = model(X, bag["adj"][None].coalesce().to(device)) if "adj" in keys else model(X)
                logit = float(out.reshape(-1)[0])
            else:
                graph = {k: bag[k].to(device) for k in ("edge_index", "edge_weight") if k in keys}
                logit = float(model(X, None, **graph).logits.reshape(-1)[0])
            logits.append(logit)
            right += int((logit > 0) == bool(bag["Y"] > 0.5))
    return right / len(val_bags), logits


def logit_accuracy(torchmetrics):
    """torchmetrics' BinaryAccuracy on sigmoid(logits).

    Given logits, BinaryAccuracy applies the sigmoid only when some value of the update lies outside
    [0, 1]; with one bag per update a logit in [0, 1] is taken for a probability (logit 0.3, i.e.
    p = 0.57, counts as negative). torchmil's Trainer feeds it logits, so its model selection would
    use another rule than milkit's (p > 0.5); scoring sigmoid(logits) makes the two rules the same.
    """

    class LogitAccuracy(torchmetrics.classification.BinaryAccuracy):
        def update(self, preds, target):
            super().update(preds.sigmoid(), target)

    return LogitAccuracy()


# -- one variant in this process ------------------------------------------------------------------


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_variant(args) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    graph = args.model in GRAPH_MODELS
    raw = (torch.load(args.data, weights_only=True) if args.data
           else generate_bags(args.train_bags + args.val_bags, args.bag_size))
    train_m, val_m, train_t, val_t = make_data(raw, args.train_bags, graph)
    reference, model, _ = build_models(args.model)
    optimiser = lambda params: torch.optim.Adam(params, lr=args.lr)  # noqa: E731
    smallest = min(range(len(train_m)), key=lambda i: train_m[i]["X"].shape[0])

    if args.variant == "torchmil":
        import torchmetrics
        from torchmil.data import collate_fn
        from torchmil.models import MILModelWrapper
        from torchmil.utils.trainer import Trainer as TorchmilTrainer

        reference = reference.to(device)
        warm_up(MILModelWrapper(reference), collate_fn([train_t[smallest]]).to(device),
                lambda m, b: m.compute_loss(b))
        trainer = TorchmilTrainer(
            reference, torch.optim.Adam(reference.parameters(), lr=args.lr),
            metrics_dict={"accuracy": logit_accuracy(torchmetrics).to(device)}, obj_metric="accuracy",
            obj_metric_mode="max", device=str(device), disable_pbar=True, verbose=False,
        )
        train_loader, val_loader = loader(train_t, "torchmil", True), loader(val_t, "torchmil", False)
        sync(device)
        start = time.perf_counter()
        trainer.train(args.epochs, train_loader, val_loader)
        sync(device)
        wall = time.perf_counter() - start
        best = trainer.get_best_model()
        accuracy, logits = accuracy_and_logits("torchmil", best, val_t, device)
    elif args.variant in ("milkit", "milkit_bf16"):
        from mil_train.data.collate import collate
        from mil_train.trainer import Trainer

        model = model.to(device)
        precision = "bf16" if args.variant == "milkit_bf16" else "fp32"
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            warm_up(model, collate([train_m[smallest]]).to(device), lambda m, b: m.compute_loss(b))
        trainer = Trainer(model, optimizer=optimiser, epochs=args.epochs, monitor="val_accuracy", mode="max",
                          device=device, seed=SEED, progress=False, precision=precision)
        train_loader, val_loader = loader(train_m, "milkit", True), loader(val_m, "milkit", False)
        sync(device)
        start = time.perf_counter()
        trainer.fit(train_loader, val_loader)
        sync(device)
        wall = time.perf_counter() - start
        accuracy, logits = accuracy_and_logits("milkit", trainer.model, val_m, device)
    elif args.variant == "milkit_ddp2":
        return run_ddp_rank(args, model, train_m, val_m)
    else:  # floor: the bare loop
        from mil_train.data.collate import collate

        model = model.to(device)
        warm_up(model, collate([train_m[smallest]]).to(device), lambda m, b: m.compute_loss(b))
        opt = optimiser(model.parameters())
        train_loader, val_loader = loader(train_m, "milkit", True), loader(val_m, "milkit", False)
        sync(device)
        start = time.perf_counter()
        best_acc, best_state = None, None
        for _ in range(args.epochs):
            model.train()
            for batch in train_loader:
                batch = batch.to(device)
                _, terms = model.compute_loss(batch)
                opt.zero_grad(set_to_none=True)
                sum(terms.values()).backward()
                opt.step()
            model.eval()
            right = 0
            with torch.no_grad():
                for batch in val_loader:
                    batch = batch.to(device)
                    logits_b, _ = model.compute_loss(batch)
                    right += int(((logits_b.reshape(-1) > 0) == (batch["Y"].reshape(-1) > 0.5)).sum())
            if best_acc is None or right > best_acc:
                best_acc, best_state = right, copy.deepcopy(model.state_dict())
        sync(device)
        wall = time.perf_counter() - start
        model.load_state_dict(best_state)
        accuracy, logits = accuracy_and_logits("milkit", model, val_m, device)
    n_instances = sum(int(b["X"].shape[0]) for b in train_m)
    return {"model": args.model, "variant": args.variant, "wall_s": wall,
            "bags_per_s": args.epochs * len(train_m) / wall, "accuracy": accuracy, "logits": logits,
            "mean_train_bag": n_instances / len(train_m)}


GRAPH_MODELS = {"PatchGCN", "SmABMIL"}
DDP_PROCESSES = 2


def run_ddp_rank(args, model, train_m, val_m) -> dict[str, Any]:
    """One rank of the 2-process run: the milkit Trainer data-parallel (mil_train.distributed), each rank on
    its balanced share of the training and validation bags, threads / 2 torch threads per process."""
    import torch

    from mil_train import distributed as dist_utils
    from mil_train.data.collate import collate
    from mil_train.trainer import Trainer

    device = dist_utils.init_from_env(args.device)
    rank, n = dist_utils.rank(), dist_utils.world_size()
    share = lambda bags: [bags[i] for i in dist_utils.balanced_shards([b["X"].shape[0] for b in bags], n)[rank]]  # noqa: E731
    smallest = min(range(len(train_m)), key=lambda i: train_m[i]["X"].shape[0])
    model = model.to(device)
    warm_up(model, collate([train_m[smallest]]).to(device), lambda m, b: m.compute_loss(b))
    trainer = Trainer(model, optimizer=lambda params: torch.optim.Adam(params, lr=args.lr), epochs=args.epochs,
                      monitor="val_accuracy", mode="max", device=device, seed=SEED, progress=False)
    train_loader, val_loader = loader(share(train_m), "milkit", True), loader(share(val_m), "milkit", False)
    dist_utils.barrier()
    sync(device)
    start = time.perf_counter()
    trainer.fit(train_loader, val_loader)
    sync(device)
    dist_utils.barrier()
    wall = time.perf_counter() - start
    accuracy, logits = accuracy_and_logits("milkit", trainer.model, val_m, device)
    dist_utils.shutdown()
    n_instances = sum(int(b["X"].shape[0]) for b in train_m)
    result = {"model": args.model, "variant": args.variant, "wall_s": wall,
              "bags_per_s": args.epochs * len(train_m) / wall, "accuracy": accuracy, "logits": logits,
              "mean_train_bag": n_instances / len(train_m), "processes": n, "threads_per_process": args.threads}
    if rank == 0 and args.result is not None:
        args.result.write_text(json.dumps(result))
    return result


# -- driver -------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--train-bags", type=int, default=12)
    parser.add_argument("--val-bags", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bag-size", default="1000,10000")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    low, high = (int(v) for v in args.bag_size.split(","))
    args.bag_size = (low, high)
    args.threads = args.threads or usable_cores()
    return args


def worker_command(args, model: str, variant: str, data: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", model, "--variant", variant,
            "--data", str(data),
            "--train-bags", str(args.train_bags), "--val-bags", str(args.val_bags), "--epochs", str(args.epochs),
            "--bag-size", f"{args.bag_size[0]},{args.bag_size[1]}", "--lr", repr(args.lr),
            "--device", args.device, "--threads", str(args.threads)]


def run_worker(command: list[str]) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_ddp(args, model: str, data: Path) -> dict[str, Any]:
    """The 2-process run under mil_train.distributed.launch_local (torchrun's environment, gloo over loopback)."""
    try:
        from mil_train import distributed as dist_utils
    except ImportError as exc:
        return {"error": f"not run: no mil_train.distributed ({exc})"}
    threads = max(1, args.threads // DDP_PROCESSES)
    result = Path(data).with_name(f"{model}.ddp.json")
    command = worker_command(args, model, "milkit_ddp2", data) + ["--result", str(result)]
    command[command.index("--threads") + 1] = str(threads)
    code = dist_utils.launch_local(DDP_PROCESSES, command, env={"OMP_NUM_THREADS": str(threads)},
                                   timeout_s=1800)
    if code != 0 or not result.exists():
        return {"error": f"the 2-process run failed (exit {code})"}
    return json.loads(result.read_text())


def markdown(args, info: str, results: dict, total_s: float) -> str:
    command = (f"python benchmarks/training.py --models {','.join(results)} --train-bags {args.train_bags} "
               f"--val-bags {args.val_bags} --epochs {args.epochs} --bag-size {args.bag_size[0]},{args.bag_size[1]} "
               f"--lr {args.lr:g} --device {args.device} --threads {args.threads}")
    lines = [
        f"`{command}` ({total_s:.0f} s in all)",
        "",
        f"Machine: {info}.",
        "",
        f"{args.train_bags} training and {args.val_bags} validation bags of 1024-d features, "
        f"{args.bag_size[0]:,} to {args.bag_size[1]:,} instances, {args.epochs} epochs, Adam lr {args.lr:g}, "
        "batch 1. Cells: fit wall s (training bags/s = epochs x training bags / fit wall, validation every "
        "epoch included).",
        "",
        "| model | (a) torchmil Trainer | (b) milkit Trainer | (c) milkit Trainer, precision=bf16 | (d) bare loop "
        f"| (e) milkit Trainer, {DDP_PROCESSES} processes | (b)/(a) | (c)/(a) | (b) over (d) | (e)/(b) "
        "| val accuracy (a) / (b) / (c) / (e) | max logit diff (a)-(b) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ok(r):
        return r is not None and "error" not in r

    def cell(r):
        return f"{r['wall_s']:.1f} s ({r['bags_per_s']:.2f})" if ok(r) else (r or {}).get("error", "not run")

    def ratio(x, y):
        return f"{x['bags_per_s'] / y['bags_per_s']:.2f}x" if ok(x) and ok(y) else "-"

    for name, per in results.items():
        t, m, h, f, d = (per.get(v) for v in ("torchmil", "milkit", "milkit_bf16", "floor", "milkit_ddp2"))
        overhead = f"{100 * (m['wall_s'] / f['wall_s'] - 1):+.0f} %" if ok(m) and ok(f) else "-"
        accs = " / ".join(f"{r['accuracy']:.3f}" if ok(r) else "-" for r in (t, m, h, d))
        if ok(t) and ok(m):
            accs += " (a = b)" if t["accuracy"] == m["accuracy"] else " (**a != b**)"
            diff = f"{max(abs(a - b) for a, b in zip(t['logits'], m['logits'])):.1e}"
        else:
            diff = "-"
        lines.append(f"| {name} | {cell(t)} | {cell(m)} | {cell(h)} | {cell(f)} | {cell(d)} | {ratio(m, t)} "
                     f"| {ratio(h, t)} | {overhead} | {ratio(d, m)} | {accs} | {diff} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        result = run_variant(args)
        if args.variant != "milkit_ddp2":  # the ranks' stdout is the parent's; rank 0 writes --result
            print(json.dumps(result))
        return
    import torch

    info = machine(args.threads, args.device)
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    results: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    folder = tempfile.TemporaryDirectory(prefix="milkit-training-bench-")
    data = Path(folder.name) / "bags.pt"  # generated once, loaded by every worker
    torch.save(generate_bags(args.train_bags + args.val_bags, args.bag_size), data)
    for name in models:
        results[name] = {}
        for variant in variants:
            if args.device.startswith("cuda") and not torch.cuda.is_available():
                results[name][variant] = {"error": "not run: no GPU on this machine"}
                continue
            if variant == "milkit_ddp2":
                result = run_ddp(args, name, data)
            else:
                result = run_worker(worker_command(args, name, variant, data))
            results[name][variant] = result
            shown = (f"{result['wall_s']:.1f} s, {result['bags_per_s']:.2f} bags/s, accuracy {result['accuracy']:.3f}"
                     if "error" not in result else result["error"])
            print(f"{name} {variant}: {shown}", file=sys.stderr, flush=True)
    folder.cleanup()
    total = time.perf_counter() - start
    text = markdown(args, info, results, total)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
