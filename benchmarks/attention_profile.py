"""onnxruntime time, peak RSS and profile of exported models (by default the full self-attention ones).

    python benchmarks/attention_profile.py [--models TransformerABMIL,IIBMIL] [--sizes 1000,5000,10000]
                                           [--repeats 3] [--top 6] [--no-torchmil] [--no-profile]

Each model is built at its default widths (in_dim=1024, n_classes=1) with torchmil's weights
(`benchmarks/inference.py`'s `prepare_model`) and exported once with `mil_export.export_onnx`. Then,
per bag size N, one fresh process per variant on one bag of N random features:
  ort:      a CPU InferenceSession (default options, intra-op threads = os.cpu_count()) on the bare
            contract feeds; a warm-up call, then --repeats timed calls (median reported). Peak RSS
            is the process's high-water mark over all those calls (VmHWM, reset after the session
            is created), and in brackets its rise above the RSS before the first call. A second
            session with SessionOptions.enable_profiling runs once more; its node events summed per
            op type give the top ops (ms, share of all node time).
  torchmil: torchmil 1.0.2's model on the same weights and bag, eager, torch threads = os.cpu_count().
The table ends with ort / torchmil (< 1 is faster than torchmil). On a shared machine, repeat it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from inference import bag_inputs, current_rss_mb, peak_rss_mb, prepare_model, reset_peak_rss, setup_torchmil

DEFAULT_MODELS = ("TransformerABMIL", "IIBMIL")
DEFAULT_SIZES = (1_000, 5_000, 10_000)


def ort_feeds(spec: dict) -> dict[str, np.ndarray]:
    """The contract feeds of one bag, as `benchmarks/inference.py` builds them (graph models: the grid
    coords and the graph the runtime builds from them by the model's rule)."""
    from mil_runtime import load_model

    inputs = bag_inputs(spec["size"], spec)
    features = inputs["features"][None]  # (1, N, D)
    runner = load_model(spec["onnx"], device="cpu")
    return runner._feeds(features, np.ones(features.shape[:2], dtype=bool), [inputs["coords"]])


def top_ops(profile_path: str, top: int) -> list[tuple[str, float, float]]:
    """(op type, total ms, share of node time) of the `top` slowest op types in one profiled run."""
    events = json.loads(Path(profile_path).read_text())
    per_op: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 1000.0
    total = sum(per_op.values()) or 1.0
    return [(op, ms, ms / total) for op, ms in per_op.most_common(top)]


def ort_worker(spec: dict) -> dict:
    import onnxruntime as ort

    threads = os.cpu_count() or 1
    feeds = ort_feeds(spec)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(spec["onnx"], options, providers=["CPUExecutionProvider"])
    reset_peak_rss()
    before = current_rss_mb()
    session.run(None, feeds)
    seconds = []
    for _ in range(spec["repeats"]):
        time.sleep(0.05)  # let torch/ort worker threads of the previous call go idle
        start = time.perf_counter()
        session.run(None, feeds)
        seconds.append(time.perf_counter() - start)
    result = {"ms": 1000 * statistics.median(seconds), "peak_mb": peak_rss_mb(), "rise_mb": peak_rss_mb() - before}
    del session
    if spec["profile"]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(spec["folder"]) / f"{spec['name']}_{spec['size']}")
        session = ort.InferenceSession(spec["onnx"], options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        result["top_ops"] = top_ops(session.end_profiling(), spec["top"])
    return result


def torchmil_worker(spec: dict) -> dict:
    call = setup_torchmil(spec, bag_inputs(spec["size"], spec))
    reset_peak_rss()
    before = current_rss_mb()
    call()
    seconds = []
    for _ in range(spec["repeats"]):
        time.sleep(0.05)
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return {"ms": 1000 * statistics.median(seconds), "peak_mb": peak_rss_mb(), "rise_mb": peak_rss_mb() - before}


def run_worker(spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(name: str, size: int, ort_result: dict, torchmil_result: dict | None) -> None:
    def cell(result: dict | None) -> str:
        if result is None:
            return "-"
        if "error" in result:
            return f"error: {result['error']}"
        return f"{result['ms']:8.0f} ms  peak {result['peak_mb']:6.0f} MB (+{result['rise_mb']:.0f})"

    ratio = ""
    if torchmil_result and "ms" in torchmil_result and "ms" in ort_result:
        ratio = f"  ort/torchmil {ort_result['ms'] / torchmil_result['ms']:.2f}"
    print(f"{name:18s} N={size:6d}  ort {cell(ort_result)}  torchmil {cell(torchmil_result)}{ratio}", flush=True)
    for op, ms, share in ort_result.get("top_ops", []):
        print(f"{'':28s}{op:24s}{ms:9.1f} ms {100 * share:5.1f} %", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--no-torchmil", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        worker = ort_worker if spec["variant"] == "ort" else torchmil_worker
        print(json.dumps(worker(spec)))
        return 0
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            spec = prepare_model(name, Path(folder))
            spec.update(folder=folder, repeats=args.repeats, top=args.top, profile=not args.no_profile)
            for size in (int(s) for s in args.sizes.split(",")):
                ort_result = run_worker({**spec, "variant": "ort", "size": size})
                torchmil_result = None
                if not args.no_torchmil and "torchmil" not in spec["skip"]:
                    torchmil_result = run_worker({**spec, "variant": "torchmil", "size": size})
                report(name, size, ort_result, torchmil_result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
