"""Peak training memory and training bags/s of every registered model at large bag sizes (the seed paper's
open check), each (model, size) in its own process.

    python benchmarks/training_memory.py [--models ABMIL,TransMIL] [--sizes 1000,10000,50000]
                                         [--limit-gb 6] [--timeout 90] [--steps 2] [--device cpu|cuda]
                                         [--markdown table.md] [--json out.json]

Each worker builds the model with its default arguments at in_dim 1024 (the width of common slide
encoders), n_classes 1, and one positive bag of N random 1024-d features on a near-square grid of coords
(graph models get their own `graph_rule`'s graph, built before timing, as mil-train builds it). It trains
with `mil_train.trainer.Trainer` (Adam, lr 1e-4, batch 1): one untimed warm-up epoch of one bag, then the
kernel's peak-RSS mark is reset and one epoch of --steps copies of the bag is timed.

Reported per cell: training bags/s (steps / timed epoch) and the peak RSS during the timed epoch (the
process's whole peak, imports and the bag included, beside it); on CUDA, torch's peak allocated memory.
A cell that cannot train says what limits it:
- "N x N attention": the model declares `max_bag_size` (its full self-attention would not fit) below N;
- "memory limit": the parent polls the worker's RSS every 20 ms and kills it above --limit-gb;
- "time limit": the worker ran past --timeout seconds (setup included);
- "not run: limited at N": a smaller size already hit a limit, so larger ones are not tried.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import guarded  # noqa: E402  (a worker process per cell, killed past its limits)
from inference import peak_rss_mb, reset_peak_rss  # noqa: E402  (the kernel's peak-RSS mark)

IN_DIM = 1024
DEFAULT_SIZES = (1_000, 10_000, 50_000)
LR = 1e-4


# -- inside a worker ----------------------------------------------------------------------------------


def grid_coords(n: int):
    """(n, 2) int64 (row, col) of a near-square grid, row by row."""
    import numpy as np

    side = int(np.ceil(np.sqrt(n)))
    rows, cols = np.divmod(np.arange(n), side)
    return np.stack([rows, cols], axis=1).astype(np.int64)


def make_training_bag(model, n: int, seed: int = 0):
    import numpy as np

    from mil_train.data import make_bag, with_graph

    rng = np.random.default_rng(seed)
    bag = make_bag(rng.standard_normal((n, IN_DIM), dtype=np.float32), 1.0, coords=grid_coords(n))
    if model.uses_graph and model.graph_rule is not None:
        bag = with_graph(bag, model.graph_rule)
    return bag


def worker(spec: dict) -> dict:
    import torch

    from mil_train.models import create_model
    from mil_train.trainer import Trainer, make_loader, seed_everything

    torch.set_num_threads(spec["threads"])
    seed_everything(0)
    model = create_model(spec["model"], in_dim=IN_DIM, n_classes=1)
    bag = make_training_bag(model, spec["size"])
    trainer = Trainer(model, lr=LR, epochs=1, progress=False, device=spec["device"])
    trainer.fit(make_loader([bag], batch_size=1))  # warm-up: first-call allocations and kernel choices
    cuda = spec["device"].startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_up_peak_mb = peak_rss_mb()  # imports, model, bag and the warm-up epoch
    was_reset = reset_peak_rss()
    started = time.perf_counter()
    trainer.fit(make_loader([bag] * spec["steps"], batch_size=1))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"bags_per_s": spec["steps"] / seconds, "seconds": seconds, "peak_mb": peak_rss_mb(),
            "process_peak_mb": max(warm_up_peak_mb, peak_rss_mb()), "reset": was_reset,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


# -- the parent ---------------------------------------------------------------------------------------


def run_guarded(spec: dict, limit_mb: float, timeout: float) -> dict:
    """One worker process of this script, killed past `limit_mb` RSS or `timeout` s (benchmarks/guarded.py)."""
    return guarded.run_guarded(__file__, spec, limit_mb, timeout)


def attention_limit(name: str, size: int) -> str | None:
    """Why a model declares it cannot take `size` instances (its class's `max_bag_size`), else None."""
    from mil_train.models import get_model_class

    limit = getattr(get_model_class(name), "max_bag_size", None)
    if limit is not None and size > limit:
        return f"N x N attention (declares max_bag_size {limit:,})"
    return None


def cell(result: dict) -> str:
    if "skip" in result:
        return result["skip"]
    if "killed" in result:
        return result["killed"]
    if "error" in result:
        return f"failed ({result['error'][:100]})"
    memory = (f"{result['cuda_peak_mb'] / 1024:.2f} GB CUDA, " if result.get("cuda_peak_mb") is not None else "")
    star = "" if result.get("reset", True) else "*"
    return (f"{result['bags_per_s']:.3g} bags/s, {memory}{result['peak_mb'] / 1024:.2f} GB{star} "
            f"({result['process_peak_mb'] / 1024:.2f} GB process)")


def measure(names: list[str], sizes: list[int], args, log=print) -> list[dict]:
    """One row per model: {size: result}; once a size hits a limit, larger sizes are not tried."""
    rows = []
    for name in names:
        row: dict[str, Any] = {"model": name, "cells": {}}
        limited_at = None
        for size in sorted(sizes):
            reason = attention_limit(name, size)
            if reason is not None:
                result = {"skip": reason}
            elif limited_at is not None:
                result = {"skip": f"not run: limited at {limited_at:,}"}
            else:
                spec = {"model": name, "size": size, "steps": args.steps, "device": args.device, "threads": args.threads}
                result = run_guarded(spec, args.limit_gb * 1024, args.timeout)
                if "killed" in result or "error" in result:
                    limited_at = size
            row["cells"][size] = result
            log(f"{name} {size:,}: {cell(result)}")
        rows.append(row)
    return rows


def markdown(rows: list[dict], sizes: list[int], command: str, args) -> str:
    lines = [
        f"Command: `{command}` ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} torch thread(s), device {args.device}). Each cell: training bags/s, then the peak RSS "
        f"during the timed epoch of {args.steps} bag(s) (and the process's whole peak); in_dim {IN_DIM}, default "
        f"arguments, Trainer with Adam. Workers killed above {args.limit_gb:g} GB RSS or after {args.timeout:g} s.",
        "",
        "| model | " + " | ".join(f"N = {s:,}" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for row in rows:
        lines.append(f"| {row['model']} | " + " | ".join(cell(row["cells"][s]) for s in sizes) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated registry names (default: every registered model)")
    parser.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES))
    parser.add_argument("--steps", type=int, default=2, help="bags in the timed epoch")
    parser.add_argument("--limit-gb", type=float, default=6.0, help="kill a worker above this RSS")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per worker, setup included")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    from mil_train.models import list_models

    names = [n.strip() for n in args.models.split(",")] if args.models else list_models()
    unknown = sorted(set(names) - set(list_models()))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(list_models())}")
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    rows = measure(names, sizes, args, log=lambda text: print(text, file=sys.stderr, flush=True))
    command = "python benchmarks/training_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(rows, sizes, command.strip(), args)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"rows": [{**r, "cells": {str(k): v for k, v in r["cells"].items()}}
                                                  for r in rows], "table": text}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
