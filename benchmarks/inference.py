"""Inference time and peak memory of every registered model: torchmil eager, milkit eager, milkit onnxruntime.

    python benchmarks/inference.py [--models ABMIL,CLAM_SB] [--sizes 1000,10000,50000] [--repeats 5]
                                   [--markdown section.md] [--no-memory]

Every registered model (`mil_train.models.list_models()`, so models registered later are included)
with its default constructor arguments, in_dim=1024, n_classes=1, in eval mode, on one bag of N random
1024-d float32 features, N in --sizes. Four variants of the same weights:
  (a) torchmil eager: torchmil 1.0.2's model (`mil_train.interop.torchmil.build_reference`) on its
      deterministic eval path, the adapter's `reference_outputs` (how the parity tests call it);
      skipped where milkit has no adapter ("no torchmil counterpart")
  (b) milkit eager: the milkit model holding torchmil's weights (`from_torchmil`; seeded init where
      there is no counterpart); (a) and (b) run under torch.inference_mode, without a mask
  (c) milkit onnxruntime: `mil_runtime.load_model(path).predict(features)`, i.e. input checks
      (NaN/Inf pass), padding into a batch with its mask, and the Prediction
  (d) bare onnxruntime session: `runner.session.inference.run` on feeds prepared once, the floor that
      (c) can reach (DESIGN.md section 7: report the bare session beside predict)
Each model is exported once with `mil_export.export_onnx` into a temporary folder. Models that declare
`max_bag_size` (full self-attention) skip larger sizes ("exceeds max_bag_size").

Time: one fresh process per (model, N). Each variant is set up and called once (warm-up; the outputs
are compared with (b), reported as max |diff|), then --repeats rounds each run a, b, c, d in turn, so
load drift on a shared machine hits every variant alike (with 50 ms idle before each timed call, so that
the previous library's spinning worker threads do not steal cores); the table gives the median per variant.
Memory: one fresh process per (model, N, variant) that loads only what that variant needs (the
onnxruntime variants never import torch, as in a deployment), resets the kernel's peak-RSS mark
(/proc/self/clear_refs) and calls the variant twice. Reported: the process's peak RSS during those
calls (everything resident: libraries, weights, the input features, the call's working memory), and in
brackets how far that peak rose above the RSS just before the first call (the call's own working memory).

Threads: torch.set_num_threads(os.cpu_count()) and onnxruntime intra-op threads = os.cpu_count().
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # benchmarks/machine_info.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import cpu_model, package_version, usable_cores  # noqa: E402

IN_DIM = 1024
DEFAULT_SIZES = (1_000, 10_000, 50_000)
VARIANTS = ("torchmil", "milkit", "ort_predict", "ort_session")
VARIANT_LABELS = {
    "torchmil": "(a) torchmil eager",
    "milkit": "(b) milkit eager",
    "ort_predict": "(c) ORT predict",
    "ort_session": "(d) ORT session",
}
NO_COUNTERPART = "no torchmil counterpart"
SEED = 0
PAUSE_S = 0.05  # idle time before each timed call: the previous library's worker threads stop spinning


# -- the machine --------------------------------------------------------------------------------


def machine() -> str:
    return (f"{cpu_model()}, {os.cpu_count()} cores ({usable_cores()} usable by this process), {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch {package_version('torch')}, "
            f"onnxruntime {package_version('onnxruntime')}, torchmil {package_version('torchmil')}; "
            f"{os.cpu_count()} torch and onnxruntime intra-op threads")


# -- memory of this process ---------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def peak_rss_mb() -> float:
    """Peak RSS since the last reset (VmHWM), else since the process started (ru_maxrss, kB on Linux)."""
    kb = _status_kb("VmHWM")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def current_rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


# -- the variants (inside a worker process) -----------------------------------------------------

Call = Callable[[], tuple[np.ndarray, np.ndarray]]  # -> (logits (1, C), attention (1, N))


def bag_inputs(size: int, spec: dict) -> dict[str, Any]:
    """One bag of random features (N, D), and grid coords (N, 2) for graph and spatial models."""
    rng = np.random.default_rng(SEED + size)
    features = rng.standard_normal((size, IN_DIM), dtype=np.float32)  # (N, D)
    coords = None
    if spec["uses_coords"] or spec["graph_rule"] is not None:
        side = int(np.ceil(np.sqrt(size)))
        index = np.arange(size)
        coords = np.stack([index // side, index % side], axis=1).astype(np.int64)  # (N, 2) (y, x)
    return {"features": features, "coords": coords}


def _torch_kwargs(spec: dict, coords: np.ndarray | None) -> dict[str, Any]:
    """edge_index / edge_weight / coords keyword inputs of the eager models for one bag."""
    import torch

    kwargs: dict[str, Any] = {}
    if coords is None:
        return kwargs
    if spec["graph_rule"] is not None:
        from mil_train.data.graphs import build_graph

        rule = spec["graph_rule"]
        kwargs["edge_index"], kwargs["edge_weight"] = build_graph(
            torch.from_numpy(coords), rule["rule"], **(rule.get("params") or {})
        )
    if spec["uses_coords"]:
        kwargs["coords"] = torch.from_numpy(coords)[None]  # (1, N, 2)
    return kwargs


def _torch_threads() -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)


def setup_torchmil(spec: dict, inputs: dict) -> Call:
    import inspect

    import torch

    from mil_train.interop.torchmil import build_reference, get_adapter

    _torch_threads()
    adapter = get_adapter(spec["name"])
    reference = build_reference(spec["name"], **spec["config"])
    reference.load_state_dict(torch.load(spec["torchmil_state"], weights_only=True))
    reference.eval()
    X = torch.from_numpy(inputs["features"])[None]  # (1, N, D)
    kwargs = _torch_kwargs(spec, inputs["coords"])
    accepted = inspect.signature(adapter.reference_outputs).parameters
    if any(key not in accepted for key in kwargs):
        raise NotImplementedError(f"the adapter's reference_outputs takes no {sorted(kwargs)}")

    def call():
        with torch.inference_mode():
            logits, attention = adapter.reference_outputs(reference, X, None, **kwargs)
        return logits.numpy(), attention.numpy()

    return call


def setup_milkit(spec: dict, inputs: dict) -> Call:
    import torch

    from mil_train.models import create_model

    _torch_threads()
    model = create_model(spec["name"], **spec["config"])
    model.load_state_dict(torch.load(spec["milkit_state"], weights_only=True))
    model.eval()
    X = torch.from_numpy(inputs["features"])[None]  # (1, N, D)
    kwargs = _torch_kwargs(spec, inputs["coords"])

    def call():
        with torch.inference_mode():
            out = model(X, None, **kwargs)
        return out.logits.numpy(), out.attention.numpy()

    return call


def _runner(spec: dict):
    from mil_runtime import load_model

    return load_model(spec["onnx"], device="cpu", threads=os.cpu_count())


def setup_ort_predict(spec: dict, inputs: dict) -> Call:
    runner = _runner(spec)
    features, coords = inputs["features"], inputs["coords"]

    def call():
        prediction = runner.predict(features, coords=coords)
        return prediction.logits[None], prediction.attention[None]

    return call


def setup_ort_session(spec: dict, inputs: dict) -> Call:
    from mil_runtime import contract

    runner = _runner(spec)
    features = inputs["features"][None]  # (1, N, D), a view
    mask = np.ones(features.shape[:2], dtype=bool)  # (1, N)
    feeds = runner._feeds(features, mask, [inputs["coords"]])  # exactly what predict feeds, built once
    session = runner.session.inference
    names = [output.name for output in session.get_outputs()]
    logits_at, attention_at = names.index(contract.LOGITS), names.index(contract.ATTENTION)

    def call():
        outputs = session.run(names, feeds)
        return outputs[logits_at], outputs[attention_at]

    return call


SETUPS = {"torchmil": setup_torchmil, "milkit": setup_milkit, "ort_predict": setup_ort_predict,
          "ort_session": setup_ort_session}


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _max_diff(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(a, b))


def time_worker(spec: dict) -> dict:
    """Warm-up + agreement check, then interleaved repetitions; medians in seconds."""
    inputs = bag_inputs(spec["size"], spec)
    calls: dict[str, Call] = {}
    outputs: dict[str, tuple] = {}
    errors: dict[str, str] = {}
    for variant in spec["variants"]:
        try:
            calls[variant] = SETUPS[variant](spec, inputs)
            outputs[variant] = calls[variant]()  # warm-up: sessions, allocators, thread pools
        except Exception as exc:
            calls.pop(variant, None)
            errors[variant] = _first_line(exc)
    times: dict[str, list[float]] = {variant: [] for variant in calls}
    for _ in range(spec["repeats"]):
        for variant, call in calls.items():
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            call()
            times[variant].append(time.perf_counter() - start)
    reference = outputs.get("milkit")
    diffs = {v: _max_diff(out, reference) for v, out in outputs.items() if v != "milkit" and reference is not None}
    return {"median_s": {v: statistics.median(t) for v, t in times.items()}, "times_s": times,
            "max_diff_vs_milkit": diffs, "errors": errors}


def memory_worker(spec: dict) -> dict:
    """Peak RSS of this process during two calls of one variant, and its rise over the RSS before them."""
    inputs = bag_inputs(spec["size"], spec)
    call = SETUPS[spec["variant"]](spec, inputs)
    before = current_rss_mb()
    was_reset = reset_peak_rss()
    call()
    call()
    peak = peak_rss_mb()
    return {"peak_mb": peak, "rise_mb": peak - before, "reset": was_reset, "torch_imported": "torch" in sys.modules}


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    result = time_worker(spec) if spec["mode"] == "time" else memory_worker(spec)
    print("RESULT " + json.dumps(result), flush=True)


# -- the parent: build, export, dispatch ---------------------------------------------------------


def prepare_model(name: str, folder: Path) -> dict:
    """Build the model (with torchmil's weights where there is a counterpart), save weights, export once."""
    import torch

    from mil_export import export_onnx
    from mil_train.interop.torchmil import build_reference, from_torchmil, get_adapter
    from mil_train.models import create_model

    torch.manual_seed(SEED)
    model = create_model(name, in_dim=IN_DIM, n_classes=1).eval()
    config = dict(model.config)
    spec: dict[str, Any] = {"name": name, "config": config, "uses_coords": bool(model.uses_coords),
                            "graph_rule": model.graph_rule if model.uses_graph else None,
                            "max_bag_size": model.max_bag_size, "skip": {}}
    try:
        get_adapter(name)
    except KeyError:
        spec["skip"]["torchmil"] = NO_COUNTERPART
    else:
        try:
            reference = build_reference(name, **config)
            model = from_torchmil(reference, name, **config)
            spec["torchmil_state"] = str(folder / f"{name}.torchmil.pt")
            torch.save(reference.state_dict(), spec["torchmil_state"])
        except Exception as exc:
            spec["skip"]["torchmil"] = f"torchmil build failed ({_first_line(exc)})"
    spec["milkit_state"] = str(folder / f"{name}.milkit.pt")
    torch.save(model.state_dict(), spec["milkit_state"])
    try:
        spec["onnx"] = str(export_onnx(model, folder / f"{name}.onnx"))
    except Exception as exc:
        spec["skip"]["ort_predict"] = spec["skip"]["ort_session"] = f"export failed ({_first_line(exc)})"
    return spec


def run_worker(spec: dict, timeout: float) -> dict:
    """Run one measurement in a fresh Python process; {"error": ...} when it fails or dies."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:200]
    killed = " (killed: out of memory?)" if done.returncode in (-9, 137) else ""
    return {"error": f"worker failed{killed}: {last}"}


def measure(spec: dict, size: int, repeats: int, memory: bool, timeout: float) -> dict:
    """One table row: timings (one process) and per-variant memory (one process each)."""
    row: dict[str, Any] = {"model": spec["name"], "size": size, "skip": dict(spec["skip"]), "median_s": {},
                           "memory": {}, "max_diff_vs_milkit": {}, "note": ""}
    limit = spec["max_bag_size"]
    if limit is not None and size > limit:
        row["note"] = f"exceeds max_bag_size ({limit:,})"
        return row
    variants = [v for v in VARIANTS if v not in row["skip"]]
    base = {**spec, "size": size, "repeats": repeats, "variants": variants}
    timing = run_worker({**base, "mode": "time"}, timeout)
    if "error" in timing:
        row["note"] = timing["error"]
        return row
    row["median_s"], row["max_diff_vs_milkit"] = timing["median_s"], timing["max_diff_vs_milkit"]
    for variant, error in timing["errors"].items():
        row["skip"][variant] = f"failed ({error})"
    if memory:
        for variant in row["median_s"]:
            row["memory"][variant] = run_worker({**base, "mode": "memory", "variant": variant}, timeout)
    return row


# -- reporting ----------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:,.0f}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return "—" if numerator is None or denominator is None else f"{numerator / denominator:.2f}x"


def _notes(row: dict) -> str:
    notes = [row["note"]] if row["note"] else []
    notes += [f"{VARIANT_LABELS[v][:3]} {reason}" for v, reason in row["skip"].items()]
    return "; ".join(notes).replace("|", "/")  # a table cell


def time_table(rows: list[dict]) -> str:
    header = ("| model | instances | (a) torchmil eager ms | (b) milkit eager ms | (c) ORT predict ms | "
              "(d) ORT session ms | (a)/(c) torchmil / predict | (c)/(d) predict / session | max abs diff vs (b) "
              "| note |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    for row in rows:
        t = row["median_s"]
        diff = max(row["max_diff_vs_milkit"].values(), default=None)
        cells = [row["model"], f"{row['size']:,}", *(_ms(t.get(v)) for v in VARIANTS),
                 _ratio(t.get("torchmil"), t.get("ort_predict")), _ratio(t.get("ort_predict"), t.get("ort_session")),
                 "—" if diff is None else f"{diff:.1e}", _notes(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _memory_cell(result: dict | None) -> str:
    if not result:
        return "—"
    if "error" in result:
        return result["error"].replace("|", "/")
    mark = "" if result["reset"] else "*"
    return f"{result['peak_mb']:,.0f}{mark} (+{result['rise_mb']:,.0f})"


def _check_runtime_without_torch(rows: list[dict]) -> None:
    """The memory table says the onnxruntime processes never import torch; hold it to that."""
    for row in rows:
        for variant in ("ort_predict", "ort_session"):
            if row["memory"].get(variant, {}).get("torch_imported"):
                raise RuntimeError(f"{row['model']}: the {variant} process imported torch; mil_runtime must not")


def memory_table(rows: list[dict]) -> str:
    header = ("| model | instances | (a) torchmil eager | (b) milkit eager | (c) ORT predict | (d) ORT session |\n"
              "|---|---|---|---|---|---|")
    lines = [header]
    for row in rows:
        cells = " | ".join(_memory_cell(row["memory"].get(v)) for v in VARIANTS)
        lines.append(f"| {row['model']} | {row['size']:,} | {cells} |")
    return "\n".join(lines)


def markdown(rows: list[dict], info: str, command: str, repeats: int, memory: bool) -> str:
    memory_part = f"""
Peak RSS in MB, one fresh process per (model, instances, variant) that loads only what the variant needs
(the onnxruntime processes never import torch), resets the kernel's peak-RSS mark through
/proc/self/clear_refs and calls the variant twice: the process's peak RSS during those calls (libraries,
weights, the {IN_DIM}-d input features and the call's working memory), and in brackets how far it rose
above the RSS just before the first call (the call's own working memory). * = the reset was refused, the
figure is the whole process's peak including set-up.

{memory_table(rows)}
""" if memory else "\nMemory not measured (--no-memory).\n"
    return f"""
## Inference time and memory: torchmil vs milkit (eager, onnxruntime)

`{command}`

Every registered model with its default constructor arguments (in_dim={IN_DIM}, n_classes=1, eval mode),
torchmil's weights loaded into milkit's model where milkit has a torchmil adapter; one bag of random
{IN_DIM}-d float32 features. (a) torchmil 1.0.2 eager on its deterministic eval path, (b) milkit eager,
both under torch.inference_mode; (c) `mil_runtime.load_model(path).predict(features)` (input checks,
padding, Prediction); (d) the bare onnxruntime session on feeds prepared once. Each model is exported once
with `mil_export.export_onnx`. Time: median ms of {repeats} repetitions after a warm-up, in one fresh
process per (model, instances), each repetition running (a), (b), (c), (d) in turn (50 ms idle before each
call). (a)/(c) > 1: predict is faster than torchmil; (c)/(d): predict's overhead over its session. Max abs
diff: the largest logit or attention difference of (a), (c), (d) from (b) in the warm-up call.

Machine: {info}.

{time_table(rows)}
{memory_part}"""


def parse_list(text: str, kind: type) -> list:
    return [kind(item.replace("_", "").strip()) if kind is int else item.strip()
            for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated registry names (default: every registered model)")
    parser.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES),
                        help="comma-separated bag sizes (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per variant (default: %(default)s)")
    parser.add_argument("--markdown", type=Path, help="write the results section (for docs/benchmarks.md) here")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-RSS processes")
    parser.add_argument("--worker-timeout", type=float, default=3600, help="seconds per measuring process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0

    from mil_train.models import list_models

    registered = list_models()
    models = parse_list(args.models, str) if args.models else registered
    unknown = [m for m in models if m not in registered]
    if unknown:
        parser.error(f"unknown models {unknown}; registered: {', '.join(registered)}")
    try:
        sizes = parse_list(args.sizes, int)
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if not sizes or min(sizes) < 1 or args.repeats < 1:
        parser.error("--sizes must be >= 1 and --repeats >= 1")

    info = machine()
    print(info, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="milkit-inference-") as tmp:
        for name in models:
            start = time.perf_counter()
            try:
                spec = prepare_model(name, Path(tmp))
            except Exception as exc:  # one model that cannot be built must not cost the others' figures
                failed = {"median_s": {}, "memory": {}, "max_diff_vs_milkit": {}, "skip": {}}
                note = f"could not build with default arguments ({_first_line(exc)})"
                rows += [{"model": name, "size": size, **failed, "note": note} for size in sizes]
                print(f"{name}: {note}", flush=True)
                continue
            print(f"{name}: built and exported in {time.perf_counter() - start:.0f} s", flush=True)
            for size in sizes:
                row = measure(spec, size, args.repeats, not args.no_memory, args.worker_timeout)
                rows.append(row)
                times = ", ".join(f"{v} {_ms(s)} ms" for v, s in row["median_s"].items())
                print(f"  {size:>7,}: {times or '-'} {_notes(row)}", flush=True)
    command = "python benchmarks/inference.py " + " ".join(sys.argv[1:] if argv is None else argv)
    _check_runtime_without_torch(rows)
    section = markdown(rows, info, command.strip(), args.repeats, not args.no_memory)
    print(section)
    if args.markdown:
        args.markdown.write_text(section)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
