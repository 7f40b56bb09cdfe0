"""Tile encoders: tiles/s of milkit's exported graph against the eager timm/transformers model, FLOPs, fp16 error.

    python benchmarks/encoders.py [--encoders phikon,uni_v1] [--depth N] [--batch 8] [--tiles 32]
                                  [--repeats 3] [--device cpu|cuda] [--threads T] [--peak-tflops 989]
                                  [--memory-limit-gb 10] [--json out.json] [--markdown section.md]

Per encoder (default: every foundation entry of `mil_export.foundation`; `timm:<model>` names work too,
`--depth` then keeps the first N blocks), on real tiles of tests/data/CMU-1-Small-Region.svs read with
OpenSlide at the entry's tile size (its paper's tile px where the registry states one, else its input px):
  eager  the backbone (timm / transformers model + the entry's token selection, i.e. `TileEncoder.backbone`)
         under torch.inference_mode on tensors preprocessed once beforehand, so the eager figure leaves out
         resizing and normalisation (TRIDENT does those in DataLoader workers) while the ONNX figure includes
         them: the comparison favours eager. On CUDA: fp16 weights and inputs; timm's attention runs
         F.scaled_dot_product_attention (its `fused_attn`), transformers' the "sdpa" implementation, on CPU and
         CUDA alike (`use_sdpa`: torch's fastest attention, not the plain attention the export traces).
  ort    milkit's exported graph (`export_encoder`, defaults as `mil-export encoder` writes it) through
         `mil_runtime.load_encoder(path, device, threads).encode(uint8 tiles)`: preprocessing in the graph.
         CPU: fp32 timed (fp16 run for its features, and timed as well); CUDA: fp16 on the CUDA provider
         timed against eager fp16 (fp32 alongside).
Time: each side warms up on one tile, then --repeats passes over all tiles in batches of --batch; tiles/s is
tiles / the median pass. Same thread count for torch (set_num_threads) and onnxruntime (intra-op threads).
Every phase (export fp32, export fp16, eager, ort) runs in its own worker process, killed past
--memory-limit-gb of RSS (`guarded.run_guarded`), so full-size ViT-g entries run one at a time and a kill is
reported, not a swapped machine; "peak RSS" is the largest worker's ru_maxrss (what `/usr/bin/time -v` says).
FLOPs per tile: torch.utils.flop_counter.FlopCounterMode over one tile through the backbone (matmul,
convolution and SDPA; a multiply-add counts 2 FLOPs, so MACs = FLOPs / 2; elementwise ops, LayerNorm,
softmax and the in-graph preprocessing are not counted). "GFLOP/s" = FLOPs per tile x tiles/s; on CUDA its
share of the chip's dense fp16 rate (H100 / H200: 989 TFLOP/s; --peak-tflops for another chip), on CPU its
share of this CPU's fp32 GEMM rate measured here (torch.mm of 2048 x 2048, same threads).
fp16 error: the fp16 graph's features against the fp32 graph's on the same tiles: per-tile relative L2
||f16 - f32|| / ||f32|| (median and max), and through an ABMIL (mil_train's ABMIL, seeded random init,
in_dim = the encoder's dim) run on both feature sets as one bag: the overlap of the k tiles of highest
attention (k = 10, or tiles // 2 when fewer than 20 tiles), as a fraction of k. Without real weights the
encoders are seeded random inits (as in the tests): the features mean nothing, the numbers (time, FLOPs,
rounding error of this architecture) do. "fp32 check": the fp32 graph's features against eager fp32 (CPU),
relative L2 of the whole feature matrix, which shows both sides computed the same thing.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # benchmarks/machine_info.py, benchmarks/guarded.py
    sys.path.insert(0, str(HERE))
from guarded import run_guarded  # noqa: E402
from machine_info import cpu_model, package_version, usable_cores  # noqa: E402

ROOT = HERE.parent
SLIDE = ROOT / "tests" / "data" / "CMU-1-Small-Region.svs"
FALLBACK_ENCODERS = ("timm:vit_small_patch16_224",)  # before the foundation registry has entries
HOPPER_DENSE_FP16_TFLOPS = 989.0  # H100 / H200 SXM, dense (no sparsity)
BACKGROUND_MEAN = 220  # a tile whose mean grey level is above this is glass, not tissue
TOPK = 10
SEED = 0
GEMM_SIDE = 2048
PHASE_ORDER = ("export", "eager", "ort")


# -- arguments ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--encoders", default=None, help="comma-separated names (default: every foundation entry)")
    parser.add_argument("--depth", type=_positive, default=None, help="reduced depth (blocks) for a smoke run")
    parser.add_argument("--batch", type=_positive, default=8, help="tiles per call (default 8)")
    parser.add_argument("--tiles", type=_positive, default=32, help="tiles per pass (default 32)")
    parser.add_argument("--repeats", type=_positive, default=3, help="timed passes per side (default 3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=_positive, default=None, help="torch and onnxruntime threads "
                        "(default: the cores this process may use)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense fp16 TFLOP/s "
                        f"(default {HOPPER_DENSE_FP16_TFLOPS:g} on an H100/H200)")
    parser.add_argument("--no-fp16", action="store_true", help="skip the fp16 graph (and its error)")
    parser.add_argument("--no-fuse", action="store_true", help="export without attention fusion (fuse=False)")
    parser.add_argument("--phases", default=",".join(PHASE_ORDER), help="which of export,eager,ort to run "
                        "(ort needs export; eager alone gives eager tiles/s and FLOPs where an export does not fit)")
    parser.add_argument("--memory-limit-gb", type=float, default=10.0, help="RSS limit of each worker")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker phase")
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table section here")
    parser.add_argument("--keep", type=Path, default=None, help="keep the exported graphs in this folder")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.encoders = [n.strip() for n in args.encoders.split(",") if n.strip()] if args.encoders else None
    args.threads = args.threads or usable_cores()
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(args.phases) - set(PHASE_ORDER)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {','.join(PHASE_ORDER)}")
    return args


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def default_encoders() -> list[str]:
    from mil_export.encoders import foundation_names

    return foundation_names() or list(FALLBACK_ENCODERS)


# -- tiles ----------------------------------------------------------------------------------------


def entry_tile_px(name: str) -> int:
    """The tile px of the entry's paper (registry), a timm model's default input px, else 224."""
    if name.startswith("timm:"):
        import timm

        return int(timm.get_pretrained_cfg(name[len("timm:"):]).input_size[-1])
    from mil_export.foundation import FOUNDATION

    spec = FOUNDATION.get(name)
    px = getattr(spec, "paper_tile_px", None) or getattr(spec, "input_px", None)
    return int(px) if px else 224


def slide_tiles(tile_px: int, count: int) -> np.ndarray:
    """uint8 (count, tile_px, tile_px, 3) tissue tiles of the test slide, level 0, grid order (cycled)."""
    import openslide

    slide = openslide.OpenSlide(str(SLIDE))
    width, height = slide.dimensions
    tiles = []
    for y in range(0, height - tile_px + 1, tile_px):
        for x in range(0, width - tile_px + 1, tile_px):
            tile = np.asarray(slide.read_region((x, y), 0, (tile_px, tile_px)).convert("RGB"))  # (px, px, 3)
            if tile.mean() <= BACKGROUND_MEAN:
                tiles.append(tile)
    slide.close()
    if not tiles:
        raise RuntimeError(f"no tissue tile of {tile_px} px in {SLIDE}")
    return np.stack([tiles[i % len(tiles)] for i in range(count)])  # (count, px, px, 3)


# -- inside a worker --------------------------------------------------------------------------------


def build(name: str, depth: int | None):
    """The registered encoder with its seeded random init (the same weights in every worker)."""
    from mil_export.encoders import build_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "no pretrained weights" warning, once per worker
        if not name.startswith("timm:"):
            return build_encoder(name, depth=depth)[0]
        encoder = build_encoder(name)[0]
    if depth is not None:  # a timm ViT at reduced depth: its first `depth` blocks
        encoder.backbone.blocks = encoder.backbone.blocks[:depth]
    return encoder


def backbone_inputs(encoder, tiles: np.ndarray):
    """What the encoder's own preprocessing hands its backbone: float32 (batch, 3, px, px)."""
    import torch

    captured = []
    hook = encoder.backbone.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        with torch.inference_mode():
            encoder(torch.from_numpy(tiles))
    finally:
        hook.remove()
    return captured[0].clone()  # (batch, 3, px, px)


def flops_per_tile(backbone, one_tile) -> int:
    """FLOPs of one tile through the backbone, attention included.

    FlopCounterMode has no formula for the CPU's fused SDPA kernel (it would count attention as 0), so
    the count runs SDPA's math backend, whose matmuls it counts.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        backbone(one_tile)
    return int(counter.get_total_flops())


def use_sdpa(backbone) -> None:
    """Eager attention through F.scaled_dot_product_attention: timm's fused_attn, transformers' "sdpa".

    The registry builds transformers models with plain matmul-softmax attention (it exports as such); the
    eager baseline gets torch's fastest attention instead, so the comparison does not favour the graph.
    """
    for module in backbone.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
        if hasattr(module, "set_attn_implementation") and hasattr(module, "config"):
            module.set_attn_implementation("sdpa")


def attention_kernels(backbone) -> str:
    """Which attention the eager model runs: timm's fused_attn flags, transformers' attn implementation."""
    fused = {getattr(m, "fused_attn") for m in backbone.modules() if hasattr(m, "fused_attn")}
    if fused:
        return "sdpa" if fused == {True} else ("eager" if fused == {False} else "mixed")
    configs = [getattr(m, "config") for m in backbone.modules() if hasattr(m, "config")]
    impl = {getattr(c, "_attn_implementation", None) for c in configs} - {None}
    return ",".join(sorted(impl)) or "unknown"


def timed_passes(call: Callable[[Any], Any], batches: list, repeats: int, sync: Callable[[], None]):
    """(outputs of the last pass, median seconds per pass): a one-tile warm-up, then `repeats` passes.

    One tile, not a batch, warms up: a full-size ViT-g tile costs tens of seconds on a small CPU.
    """
    call(batches[0][:1])
    sync()
    seconds, outputs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = [call(batch) for batch in batches]
        sync()
        seconds.append(time.perf_counter() - start)
    return outputs, statistics.median(seconds)


def _batches(array, batch: int) -> list:
    return [array[i:i + batch] for i in range(0, len(array), batch)]


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # kB on Linux


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def phase_export(spec: dict) -> dict:
    """Export the encoder at one precision into spec["path"]: time, size on disk, peak RSS."""
    from mil_export.encoders import export_encoder

    _set_torch_threads(spec["threads"])
    encoder = build(spec["name"], spec["depth"])
    out: dict[str, Any] = {}
    kwargs = {"precision": spec["precision"]} if spec["precision"] != "fp32" else {}
    if spec.get("no_fuse"):
        kwargs["fuse"] = False
    missing = set(kwargs) - set(inspect.signature(export_encoder).parameters)
    if missing:
        raise NotImplementedError(f"export_encoder has no {', '.join(sorted(missing))}= yet")
    start = time.perf_counter()
    path = export_encoder(encoder, spec["path"], name=spec["name"], **kwargs)
    out["export_s"] = time.perf_counter() - start
    out["graph_mb"] = sum(f.stat().st_size for f in Path(path).parent.iterdir()) / 1024 ** 2
    out["peak_rss_gb"] = _peak_rss_gb()
    return out


def phase_eager(spec: dict) -> dict:
    """The eager backbone on preprocessed tiles: tiles/s, FLOPs per tile, features saved for the comparisons."""
    import torch

    _set_torch_threads(spec["threads"])
    encoder = build(spec["name"], spec["depth"])
    tiles = np.load(spec["tiles"])  # (n, px, px, 3)
    inputs = backbone_inputs(encoder, tiles)  # (n, 3, px, px)
    model = encoder.backbone.eval()
    use_sdpa(model)
    sync = lambda: None  # noqa: E731
    if spec["device"] == "cuda":
        dtype = torch.float16 if spec["precision"] == "fp16" else torch.float32
        model, inputs = model.to("cuda", dtype), inputs.to("cuda", dtype)
        sync = torch.cuda.synchronize

    def call(batch):
        with torch.inference_mode():
            return model(batch).flatten(1)  # (batch, D)

    outputs, seconds = timed_passes(call, _batches(inputs, spec["batch"]), spec["repeats"], sync)
    features = torch.cat(outputs).float().cpu().numpy()  # (n, D)
    np.save(spec["features"], features)
    return {"tiles_per_s": len(tiles) / seconds, "attention": attention_kernels(model),
            "output_dim": encoder.output_dim, "input_px": encoder.input_px,
            "params": sum(p.numel() for p in model.parameters()), "flops_per_tile": flops_per_tile(model, inputs[:1]),
            "peak_rss_gb": _peak_rss_gb(), **_gpu_memory(spec["device"])}


def phase_ort(spec: dict) -> dict:
    """milkit's graph through the runtime on uint8 tiles: tiles/s, features saved."""
    from mil_runtime.encoder import load_encoder

    runner = load_encoder(spec["path"], device=spec["device"], threads=spec["threads"])
    tiles = np.load(spec["tiles"])  # (n, px, px, 3)
    outputs, seconds = timed_passes(runner.encode, _batches(tiles, spec["batch"]), spec["repeats"], lambda: None)
    np.save(spec["features"], np.concatenate(outputs))  # (n, D)
    config = runner.metadata.model_config
    return {"tiles_per_s": len(tiles) / seconds, "ran_on": runner.device, "peak_rss_gb": _peak_rss_gb(),
            "fusion": config.get("fusion"), "precision": config.get("precision", "fp32")}


def _gpu_memory(device: str) -> dict:
    if device != "cuda":
        return {}
    import torch

    return {"gpu_peak_gb": torch.cuda.max_memory_allocated() / 1024 ** 3, "gpu": torch.cuda.get_device_name()}


PHASES = {"export": phase_export, "eager": phase_eager, "ort": phase_ort}


def worker(spec_json: str) -> int:
    spec = json.loads(spec_json)
    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was around each phase
    result = PHASES[spec["phase"]](spec)
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# -- comparisons (in the parent) -----------------------------------------------------------------------


def relative_l2_per_tile(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """||approx - exact|| / ||exact|| of each row: (n,)."""
    diff = np.linalg.norm(approx.astype(np.float64) - exact, axis=1)
    return diff / np.maximum(np.linalg.norm(exact.astype(np.float64), axis=1), 1e-30)


def relative_l2(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(approx.astype(np.float64) - exact) / max(np.linalg.norm(exact), 1e-30))


def topk_size(n_tiles: int) -> int:
    return TOPK if n_tiles >= 2 * TOPK else max(1, n_tiles // 2)


def abmil_topk_overlap(fp32: np.ndarray, fp16: np.ndarray) -> tuple[float, int]:
    """Share of the k highest-attention tiles a seeded ABMIL picks in both feature sets, and k."""
    import torch

    from mil_train.models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        abmil = create_model("ABMIL", in_dim=fp32.shape[1]).eval()
    k = topk_size(len(fp32))
    picks = []
    with torch.inference_mode():
        for features in (fp32, fp16):
            attention = abmil(torch.from_numpy(features.astype(np.float32))[None]).attention[0]  # (n,)
            picks.append(set(torch.topk(attention, k).indices.tolist()))
    return len(picks[0] & picks[1]) / k, k


def cpu_gemm_gflops(threads: int) -> float:
    """fp32 torch.mm rate of this CPU at `threads` threads (best of 3), GFLOP/s."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(GEMM_SIDE, GEMM_SIDE), torch.randn(GEMM_SIDE, GEMM_SIDE)  # (n, n) each
    torch.mm(a, b)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    torch.set_num_threads(previous)
    return 2 * GEMM_SIDE ** 3 / best / 1e9


# -- one encoder ---------------------------------------------------------------------------------------


class Bench:
    """Runs the phases of one encoder in guarded workers and gathers what they return."""

    def __init__(self, args: argparse.Namespace, name: str, folder: Path) -> None:
        self.args, self.name, self.folder = args, name, folder
        self.row: dict[str, Any] = {"encoder": name, "depth": args.depth, "batch": args.batch, "failed": {}}
        self.script = Path(__file__).resolve()

    def phase(self, key: str, **spec: Any) -> dict | None:
        spec = {"name": self.name, "depth": self.args.depth, "threads": self.args.threads, "batch": self.args.batch,
                "repeats": self.args.repeats, "device": self.args.device, "no_fuse": self.args.no_fuse, **spec}
        result = run_guarded(self.script, spec, self.args.memory_limit_gb * 1024, self.args.timeout)
        if "killed" in result or "error" in result:
            self.row["failed"][key] = result.get("killed") or result.get("error")
            print(f"  {key}: {self.row['failed'][key]}", flush=True)
            return None
        self.row[key] = result
        print(f"  {key}: {_brief(result)}", flush=True)
        return result

    def graph(self, precision: str) -> Path:
        return self.folder / precision / f"{self.name.replace(':', '_')}.onnx"

    def run(self) -> dict:
        """Export (fp32, fp16), eager, ORT: a failed phase is recorded and the independent ones still run."""
        args = self.args
        precisions = ["fp32"] if args.no_fp16 else ["fp32", "fp16"]
        tile_px = entry_tile_px(self.name)
        self.row.update(tile_px=tile_px, tiles=args.tiles)
        tiles = str(self._tiles(tile_px, args.tiles))
        for precision in precisions if "export" in args.phases else []:
            self.phase(f"export_{precision}", phase="export", precision=precision, path=str(self._prepare(precision)))
        for precision in ["fp32"] if args.device == "cpu" else ["fp16", "fp32"]:
            if "eager" not in args.phases:
                break
            self.phase(f"eager_{precision}", phase="eager", precision=precision, tiles=tiles,
                       features=str(self.folder / f"eager_{precision}.npy"))
        for precision in precisions:
            if "ort" in args.phases and f"export_{precision}" in self.row:
                self.phase(f"ort_{precision}", phase="ort", path=str(self.graph(precision)), tiles=tiles,
                           features=str(self.folder / f"ort_{precision}.npy"))
        self._compare()
        return self.row

    def _prepare(self, precision: str) -> Path:
        path = self.graph(precision)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _tiles(self, tile_px: int, count: int) -> Path:
        """`count` tiles of `tile_px`, saved once for every worker to read."""
        path = self.folder / f"tiles_{tile_px}.npy"
        np.save(path, slide_tiles(tile_px, count))
        return path

    def _compare(self) -> None:
        load = lambda key: np.load(self.folder / f"{key}.npy") if (self.folder / f"{key}.npy").exists() else None  # noqa: E731
        ort32, ort16, eager32 = load("ort_fp32"), load("ort_fp16"), load("eager_fp32")
        if ort32 is not None and eager32 is not None:
            self.row["fp32_check_rel_l2"] = relative_l2(ort32, eager32)
        if ort32 is not None and ort16 is not None:
            per_tile = relative_l2_per_tile(ort16, ort32)
            overlap, k = abmil_topk_overlap(ort32, ort16)
            self.row.update(fp16_rel_l2_median=float(np.median(per_tile)), fp16_rel_l2_max=float(per_tile.max()),
                            abmil_topk_overlap=overlap, topk=k)


def _brief(result: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
                     if not isinstance(v, dict))


# -- the table -----------------------------------------------------------------------------------------


def machine(args: argparse.Namespace, gemm: float | None) -> str:
    ort = "onnxruntime-gpu" if package_version("onnxruntime-gpu") != "not installed" else "onnxruntime"
    text = (f"{cpu_model()}, {os.cpu_count()} cores ({usable_cores()} usable), {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch {package_version('torch')}, "
            f"timm {package_version('timm')}, transformers {package_version('transformers')}, {ort} "
            f"{package_version(ort)}; {args.threads} torch and onnxruntime threads; load average at start "
            f"{os.getloadavg()[0]:.2f}")
    if gemm is not None:
        text += f"; fp32 GEMM rate here {gemm:.0f} GFLOP/s ({GEMM_SIDE}x{GEMM_SIDE} torch.mm)"
    return text


def _num(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def table(rows: list[dict], args: argparse.Namespace, peak: float | None, gemm: float | None) -> str:
    fast, base = ("fp16", "fp16") if args.device == "cuda" else ("fp32", "fp32")
    rate_of = f"% of {peak:g} TFLOP/s" if peak else ("% of GEMM rate" if gemm else "% of peak")
    header = ["encoder", "dim", "params (M)", "GFLOP/tile", "tile px", f"eager {base} tiles/s",
              f"ORT {fast} tiles/s", "ORT / eager", f"ORT {fast} GFLOP/s", rate_of,
              "ORT fp16 tiles/s" if args.device == "cpu" else "ORT fp32 tiles/s", "fp32 check", "fp16 rel L2 median / max",
              "ABMIL top-k overlap", "fused (ORT optimizer)", "peak RSS GB", "not run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("-" * (len(h) + 2) for h in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cells(row, fast, base, peak, gemm, args.device)) + " |")
    return "\n".join(lines)


def _cells(row: dict, fast: str, base: str, peak: float | None, gemm: float | None, device: str) -> list[str]:
    model = next((row[k] for k in ("eager_fp32", "eager_fp16") if row.get(k)), {})  # dims and FLOPs
    eager = (row.get(f"eager_{base}") or {}).get("tiles_per_s")
    ort = (row.get(f"ort_{fast}") or {}).get("tiles_per_s")
    other = (row.get("ort_fp16" if device == "cpu" else "ort_fp32") or {}).get("tiles_per_s")
    flops = model.get("flops_per_tile")
    achieved = flops * ort / 1e9 if flops and ort else None
    ceiling = peak * 1e3 if peak else gemm
    share = 100 * achieved / ceiling if achieved and ceiling else None
    fp16 = (f"{row['fp16_rel_l2_median']:.1e} / {row['fp16_rel_l2_max']:.1e}"
            if "fp16_rel_l2_median" in row else "")
    overlap = f"{row['abmil_topk_overlap']:.2f} (k={row['topk']})" if "topk" in row else ""
    rss = [r.get("peak_rss_gb") for k, r in row.items() if isinstance(r, dict) and "peak_rss_gb" in r]
    name = row["encoder"] + (f" (depth {row['depth']})" if row.get("depth") else "")
    return [name, str(model.get("output_dim", "")), _num(model.get("params") and model["params"] / 1e6, ".1f"),
            _num(flops and flops / 1e9, ".1f"), str(row.get("tile_px", "")), _num(eager, ".2f"), _num(ort, ".2f"),
            _num(ort / eager if ort and eager else None, ".2f") + ("x" if ort and eager else ""),
            _num(achieved, ".0f"), _num(share, ".0f"), _num(other, ".2f"),
            _num(row.get("fp32_check_rel_l2"), ".1e"), fp16, overlap, _fusion((row.get(f"ort_{fast}") or {}).get("fusion")),
            _num(max(rss) if rss else None, ".1f"),
            "; ".join(f"{k}: {v}" for k, v in row["failed"].items())]


def _fusion(record: dict | None) -> str:
    """The fusions export_encoder recorded in the graph's metadata: "off", or e.g. "Attention 24, LayerNorm 49"."""
    if not record:
        return ""
    if not record.get("applied"):
        return "off"
    fused = record.get("fused") or {}
    return ", ".join(f"{op} {count}" for op, count in sorted(fused.items()) if count) or "none matched"


def section(rows: list[dict], args: argparse.Namespace, peak: float | None, gemm: float | None,
            command: str) -> str:
    return (f"## Benchmark\n\nMachine: {machine(args, gemm)}.\n\nCommand: `{command}` (--batch {args.batch}, "
            f"--tiles {args.tiles}, --repeats {args.repeats}, --device {args.device}).\n\n"
            f"{table(rows, args, peak, gemm)}\n")


def gpu_peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops is not None or args.device != "cuda":
        return args.peak_tflops
    import torch

    name = torch.cuda.get_device_name()
    return HOPPER_DENSE_FP16_TFLOPS if any(chip in name for chip in ("H100", "H200")) else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)
    names = args.encoders or default_encoders()
    peak = gpu_peak_tflops(args)
    gemm = cpu_gemm_gflops(args.threads) if args.device == "cpu" else None
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="milkit-encoders-"))
    try:
        for name in names:
            print(f"{name}:", flush=True)
            folder = (args.keep or scratch) / name.replace(":", "_")
            folder.mkdir(parents=True, exist_ok=True)
            rows.append(Bench(args, name, folder).run())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    command = "python benchmarks/encoders.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = section(rows, args, peak, gemm, command)
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine(args, gemm), "peak_tflops": peak,
                                         "cpu_gemm_gflops": gemm, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
