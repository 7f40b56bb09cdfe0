"""Peak memory and time of each model on one large bag: onnxruntime vs eager milkit vs torchmil eager.

    python benchmarks/memory.py [--models SmABMIL,TransMIL] [--sizes 10000,50000,100000]
                                [--variants ort_session,milkit,torchmil] [--limit-gb 14]
                                [--markdown section.md]

Every registered model (default) with its default constructor arguments, in_dim=1024, n_classes=1, on
one bag of N random 1024-d features on a near-square grid (coords, and the model's graph rule for graph
models), N in --sizes. Weights, export and the variants are those of benchmarks/inference.py:
  ort_session  the exported model in a bare onnxruntime session, feeds built once (never imports torch)
  milkit       the milkit model in eager PyTorch under torch.inference_mode
  torchmil     torchmil 1.0.2's model on its deterministic eval path (where milkit has an adapter)
Each (model, N, variant) runs in a fresh process that sets up the variant and calls it twice, resetting
the kernel's peak-RSS mark before each call. The table gives the second (warm) call's wall time, then
the process's peak RSS during the first call (one bag in a fresh session: libraries, weights and input
included) and during the second. The second can be higher: onnxruntime's CPU memory arena keeps the
first call's blocks and, where they do not fit the second call's requests, takes more. The parent polls each worker's RSS every 20 ms and kills
it above --limit-gb, so that a model that builds N x N tensors cannot take the machine down; such a
cell says which limit killed it. Models that declare `max_bag_size` skip larger sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guarded  # noqa: E402  (a worker process per cell, killed past its limits)
import inference  # noqa: E402  (the shared setup: weights, export, variants, RSS helpers)

DEFAULT_SIZES = (10_000, 50_000, 100_000)
VARIANTS = ("ort_session", "milkit", "torchmil")
LABELS = {"ort_session": "ORT session", "milkit": "milkit eager", "torchmil": "torchmil eager"}


def worker(spec: dict) -> dict:
    inputs = inference.bag_inputs(spec["size"], spec)
    call = inference.SETUPS[spec["variant"]](spec, inputs)
    was_reset = inference.reset_peak_rss()
    call()  # cold: one bag in a fresh session
    first_peak = inference.peak_rss_mb()
    inference.reset_peak_rss()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "first_peak_mb": first_peak, "second_peak_mb": inference.peak_rss_mb(),
            "reset": was_reset, "torch_imported": "torch" in sys.modules}


def run_guarded(spec: dict, limit_mb: float, timeout: float) -> dict:
    """One worker process of this script, killed past `limit_mb` RSS or `timeout` s (benchmarks/guarded.py)."""
    return guarded.run_guarded(__file__, spec, limit_mb, timeout)


def cell(result: dict | None) -> str:
    if result is None:
        return "—"
    if "killed" in result:
        return result["killed"]
    if "error" in result:
        return f"failed ({result['error'][:80]})"
    star = "" if result.get("reset", True) else "*"
    return (f"{result['seconds'] * 1e3:,.0f} ms, {result['first_peak_mb'] / 1024:.2f} / "
            f"{result['second_peak_mb'] / 1024:.2f} GB{star}")


def markdown(rows: list[dict], variants: list[str], command: str, limit_gb: float) -> str:
    head = "| model | N | " + " | ".join(LABELS[v] for v in variants) + " |"
    lines = [
        f"Machine: {inference.machine()}. Command: `{command}`. Each cell: the second (warm) call's wall "
        f"time, then the process's peak RSS during the first call / during the second (* = the peak could "
        f"not be reset: whole-process peaks); workers killed above {limit_gb:g} GB.",
        "",
        head,
        "|" + "---|" * (len(variants) + 2),
    ]
    for row in rows:
        cells = [row["skip"].get(v) or cell(row["results"].get(v)) for v in variants]
        lines.append(f"| {row['model']} | {row['size']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated registry names (default: every registered model)")
    parser.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--limit-gb", type=float, default=14.0, help="kill a worker above this RSS")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    parser.add_argument("--markdown", type=Path, help="write the table (for docs/benchmarks.md) here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    from mil_train.models import list_models

    names = args.models.split(",") if args.models else list_models()
    sizes = inference.parse_list(args.sizes, int)
    variants = args.variants.split(",")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            spec = inference.prepare_model(name, Path(folder))
            for size in sizes:
                row = {"model": name, "size": size, "skip": {}, "results": {}}
                limit = spec["max_bag_size"]
                for variant in variants:
                    if limit is not None and size > limit:
                        row["skip"][variant] = f"exceeds max_bag_size ({limit:,})"
                    elif variant in spec["skip"]:
                        row["skip"][variant] = spec["skip"][variant]
                    else:
                        row["results"][variant] = run_guarded({**spec, "size": size, "variant": variant},
                                                              args.limit_gb * 1024, args.timeout)
                    print(f"{name} {size:,} {variant}: {row['skip'].get(variant) or cell(row['results'].get(variant))}",
                          file=sys.stderr, flush=True)
                rows.append(row)
    command = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(rows, variants, command.strip(), args.limit_gb)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
