"""Every registered model on a CAMELYON16-style whole-slide benchmark: tumour detection and localisation on
synthetic slides with planted lesions whose masks are known.

Slides (generated once, cached under --cache, keyed by the generation settings):
- `mil_runtime.demo.write_synthetic_slide`, --slides slides of --slide-px x --slide-px level-0 px at 0.5 um/px,
  tissue cover uniform in [0.4, 0.75]; even-numbered slides carry 1-3 lesions, odd ones none;
- lesion radii log-uniform in [40, 300] um, so a lesion covers from ~0.1 % to ~10 % of the tissue: many lie
  under 1 % of it (CAMELYON16's micro-metastases), each centred on tissue;
- features: the demo bundle's encoder (models/demo/tiny_cnn.onnx, 64-d) through the real pipeline,
  `mil_runtime.pipeline.run_slide` (tissue detection, grid at the demo model's tiling: 128 px at 1 um/px,
  reads, encoder), with the tiles' grid coords; the slide file is deleted once encoded (--keep-slides keeps it);
- each tile's lesion fraction comes from the known discs (`SyntheticSlide.lesion_fractions`).

Protocol, the same for every model:
- stratified 5-fold CV over the slides (`mil_train.folds.stratified_folds`, seed 0): the same folds for all;
- features standardised with the mean and std of the training fold's tiles;
- each model with its default arguments at in_dim 64, one output (binary: lesion / clean); graph and spatial
  models get coords and their graph the way mil-train gives them (`mil_train.cli.with_spatial_inputs`,
  the model's own `graph_rule`);
- Adam, lr 5e-4, weight decay 5e-3 (benchmarks/classic_mil.py's setting), one slide a step, --epochs epochs on
  the training folds, no early stopping and nothing chosen on the test fold (the Trainer keeps the
  lowest-training-loss epoch);
- one fresh process per model (its 5 folds in turn), so that its peak RSS is its own.

Reported per model:
- slide AUROC over the pooled out-of-fold probabilities;
- instance AUROC: per lesion slide, the model's attention ranking tiles that touch a lesion (lesion fraction
  > 0) above lesion-free tiles, averaged over the lesion slides (out of fold);
- top-tile hit: the share of lesion slides whose top-attention tile touches a lesion, over all lesion slides
  and over those whose lesions are all under 1 % of the tissue;
- training time (the 5 fits, summed) and the worker process's peak RSS.

    python benchmarks/wsi_mil.py                                   # 200 slides of 4096 px, 15 models
    python benchmarks/wsi_mil.py --slides 20 --slide-px 2048 --models ABMIL,PatchGCN --epochs 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEMO = ROOT / "models" / "demo"
DEMO_MODEL, DEMO_ENCODER = DEMO / "abmil_demo.onnx", DEMO / "tiny_cnn.onnx"
SLIDE_MPP = 0.5
LESION_RADIUS_UM = (40.0, 300.0)
TISSUE_COVER = (0.4, 0.75)
SMALL_LESION = 0.01  # share of the tissue under which a lesion counts as small (micro-metastasis)
LR, WEIGHT_DECAY = 5e-4, 5e-3
FOLDS, FOLD_SEED = 5, 0
NOT_BY_DEFAULT = {"Composed"}  # a way to build models (by default it is ABMIL), not a published one
GENERATION_VERSION = 1  # bump when what a cached slide holds changes
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "milkit-bench" / "wsi"


# -- slides -----------------------------------------------------------------------------------------


def slide_spec(index: int, slide_px: int, seed0: int = 0) -> dict[str, Any]:
    """Even indices: 1-3 lesions of log-uniform radius; odd: clean. Everything follows from the seed."""
    seed = seed0 + index
    rng = np.random.default_rng([seed, 17])  # not the slide's own stream: that one draws the tissue
    n_lesions = int(rng.integers(1, 4)) if index % 2 == 0 else 0
    low, high = np.log(LESION_RADIUS_UM)
    radii_um = np.exp(rng.uniform(low, high, size=n_lesions))
    return {"index": index, "seed": seed, "slide_px": slide_px, "tissue": float(rng.uniform(*TISSUE_COVER)),
            "radii_px": [int(r / SLIDE_MPP) for r in radii_um], "centre_draws": rng.random((n_lesions, 1)).tolist()}


def tissue_mask_of(spec: dict) -> np.ndarray:
    """The mask-scale tissue the slide's seed draws (write_synthetic_slide draws it first, from the same
    stream), so that lesion centres can be put on tissue before the slide is written."""
    from mil_runtime.demo import synthetic_slide as synthetic

    shape = (spec["slide_px"], spec["slide_px"])
    small = (-(-shape[0] // synthetic.MASK_SCALE), -(-shape[1] // synthetic.MASK_SCALE))
    return synthetic._tissue_mask(np.random.default_rng(spec["seed"]), small, spec["tissue"])


def plant_lesions(spec: dict) -> list[tuple[int, int, int]]:
    """(cy, cx, radius) level-0 discs centred on tissue pixels picked by the spec's draws."""
    from mil_runtime.demo.synthetic_slide import MASK_SCALE

    ys, xs = np.nonzero(tissue_mask_of(spec))
    lesions = []
    for radius, (draw,) in zip(spec["radii_px"], spec["centre_draws"]):
        pick = min(int(draw * ys.size), ys.size - 1)
        cy = int(np.clip(ys[pick] * MASK_SCALE + MASK_SCALE // 2, radius, spec["slide_px"] - radius))
        cx = int(np.clip(xs[pick] * MASK_SCALE + MASK_SCALE // 2, radius, spec["slide_px"] - radius))
        lesions.append((cy, cx, int(radius)))
    return lesions


def cache_dir(cache: Path, slide_px: int, seed0: int) -> Path:
    """One folder per generation setting (the slide count only adds files)."""
    key = json.dumps({"v": GENERATION_VERSION, "px": slide_px, "mpp": SLIDE_MPP, "seed0": seed0,
                      "radius_um": LESION_RADIUS_UM, "tissue": TISSUE_COVER,
                      "encoder": hashlib.sha256(DEMO_ENCODER.read_bytes()).hexdigest()[:16]}, sort_keys=True)
    return Path(cache) / f"px{slide_px}-seed{seed0}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def encode_slide(spec: dict, folder: Path, runners, keep_slide: bool = False) -> Path:
    """Write one slide, run the pipeline on it and cache what the benchmark needs as an .npz."""
    from mil_runtime.demo import write_synthetic_slide
    from mil_runtime.pipeline import run_slide

    target = folder / f"slide{spec['index']:04d}.npz"
    if target.is_file():
        return target
    model, encoder = runners
    lesions = plant_lesions(spec)
    slide = write_synthetic_slide(folder / f"slide{spec['index']:04d}.svs", height=spec["slide_px"],
                                  width=spec["slide_px"], mpp=SLIDE_MPP, lesions=lesions or None,
                                  tissue=spec["tissue"], seed=spec["seed"])
    result = run_slide(slide.path, model, encoder, workers=1)
    tile = result.plan.tile_level0
    tissue_px = float(slide.tissue_mask.sum()) * 16 ** 2 if slide.tissue_mask is not None else 0.0
    lesion_share = [np.pi * r * r / tissue_px for _, _, r in lesions] if tissue_px else []
    tmp = folder / f".{target.stem}.tmp{os.getpid()}.npz"
    np.savez(tmp, features=result.features, grid_yx=result.grid_yx, xy_level0=result.xy_level0,
             tile_level0=tile, label=int(bool(lesions)),
             lesion_fraction=slide.lesion_fractions(result.xy_level0[:, ::-1], tile),  # (N,) in [0, 1]
             lesions=np.asarray(lesions, dtype=np.int64).reshape(-1, 3),
             lesion_share_of_tissue=np.asarray(lesion_share, dtype=np.float64))
    os.replace(tmp, target)
    if not keep_slide:
        slide.path.unlink()
    return target


def generate(n_slides: int, slide_px: int, cache: Path, seed0: int = 0, keep_slides: bool = False,
             log=print) -> list[Path]:
    """Every slide's cached .npz (generating the missing ones), in index order."""
    from mil_runtime.encoder import load_encoder
    from mil_runtime.model import load_model

    folder = cache_dir(cache, slide_px, seed0)
    folder.mkdir(parents=True, exist_ok=True)
    runners = None
    paths, started = [], time.perf_counter()
    for index in range(n_slides):
        spec = slide_spec(index, slide_px, seed0)
        if runners is None and not (folder / f"slide{index:04d}.npz").is_file():
            runners = (load_model(DEMO_MODEL, device="cpu"), load_encoder(DEMO_ENCODER, device="cpu"))
        paths.append(encode_slide(spec, folder, runners, keep_slides))
        if (index + 1) % 10 == 0:
            log(f"slides: {index + 1}/{n_slides} cached in {folder} ({time.perf_counter() - started:.0f} s)")
    return paths


def load_slides(paths: list[Path]) -> list[dict[str, np.ndarray]]:
    slides = []
    for path in paths:
        with np.load(path) as data:
            slides.append({key: data[key] for key in data.files})
    return slides


# -- training (one worker process per model) ----------------------------------------------------------


def tile_truth(slide: dict) -> np.ndarray:
    """1 = the tile touches a lesion, 0 = lesion-free: (N,) int64."""
    return (slide["lesion_fraction"] > 0).astype(np.int64)


def to_bags(model, slides: list[dict], data_name: str, scaling=None) -> list:
    """Bags with coords (grid units), and the model's graph where it reads one, as mil-train builds them.

    `scaling`: (mean, std) of the training fold's instances, applied to every bag's features."""
    from mil_train.cli import with_spatial_inputs
    from mil_train.data import make_bag

    mean, std = scaling if scaling is not None else (0.0, 1.0)
    bags = [make_bag(((s["features"] - mean) / std).astype(np.float32), float(s["label"]), y_inst=tile_truth(s),
                     coords=s["grid_yx"]) for s in slides]
    return with_spatial_inputs(model, bags, Path(data_name))


def training_scaling(slides: list[dict], train: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over the training slides' tiles: the demo encoder's features span very
    different scales (stds from ~1e-4 to ~0.25), so, as benchmarks/classic_mil.py does, they are
    standardised with the training fold only."""
    features = np.concatenate([slides[i]["features"] for i in train]).astype(np.float64)  # (tiles, D)
    return features.mean(axis=0), np.maximum(features.std(axis=0), 1e-6)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_model(job: dict) -> dict:
    """The model's 5 folds in this process: out-of-fold probabilities and attention, fit times, peak RSS."""
    import torch

    from mil_train.folds import stratified_folds
    from mil_train.models import create_model
    from mil_train.trainer import Trainer, make_loader, seed_everything

    torch.set_num_threads(1)
    slides = load_slides([Path(p) for p in job["paths"]])
    labels = [int(s["label"]) for s in slides]
    probabilities, attention = [None] * len(slides), [None] * len(slides)
    fit_seconds = []
    for fold, (train, test) in enumerate(stratified_folds(labels, job["folds"], seed=FOLD_SEED)):
        seed_everything(fold)
        model = create_model(job["model"], in_dim=int(slides[0]["features"].shape[1]), n_classes=1)
        bags = to_bags(model, slides, job["cache"], training_scaling(slides, train))
        trainer = Trainer(model, optimizer=lambda params: torch.optim.Adam(params, lr=LR, weight_decay=WEIGHT_DECAY),
                          epochs=job["epochs"], seed=fold, progress=False)
        started = time.perf_counter()
        trainer.fit(make_loader([bags[i] for i in train], batch_size=1, shuffle=True, seed=fold))
        fit_seconds.append(time.perf_counter() - started)
        predicted = trainer.predict(make_loader([bags[i] for i in test], batch_size=1))
        for row, i in enumerate(test):
            probabilities[i] = float(predicted["probabilities"].reshape(-1)[row])
            att = predicted["attention"][row] if predicted.get("attention") is not None else None
            attention[i] = None if att is None else np.asarray(att, dtype=np.float64).reshape(-1).tolist()
    return {"model": job["model"], "epochs": job["epochs"], "probabilities": probabilities, "attention": attention,
            "fit_seconds": fit_seconds, "peak_rss_mb": peak_rss_mb()}


def run_guarded(job: dict, timeout: float) -> dict:
    """run_model in a fresh process (`--worker`), killed past `timeout` seconds."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(job, handle)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", handle.name]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": job["model"], "epochs": job["epochs"], "error": f"stopped after {timeout:.0f} s (time limit)"}
    finally:
        os.unlink(handle.name)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:200]
    return {"model": job["model"], "epochs": job["epochs"], "error": f"failed: {last}"}


# -- scores -------------------------------------------------------------------------------------------


def localisation(slides: list[dict], attention: list) -> dict[str, float]:
    """Instance AUROC of attention per lesion slide (mean), top-attention-tile hits (all, small-only)."""
    from mil_runtime.demo import rank_auroc

    aurocs, hits, small_hits = [], [], []
    for slide, att in zip(slides, attention):
        if not slide["label"]:
            continue
        truth = tile_truth(slide)
        if att is None or len(att) != len(truth):
            return {"instance_auroc": float("nan"), "top_hit": float("nan"), "top_hit_small": float("nan")}
        att = np.asarray(att)
        if truth.any() and not truth.all():
            aurocs.append(rank_auroc(att, truth))
        hit = float(truth[int(np.argmax(att))] == 1)
        hits.append(hit)
        if slide["lesion_share_of_tissue"].size and slide["lesion_share_of_tissue"].max() < SMALL_LESION:
            small_hits.append(hit)
    mean = lambda values: float(np.mean(values)) if values else float("nan")  # noqa: E731
    return {"instance_auroc": mean(aurocs), "top_hit": mean(hits), "top_hit_small": mean(small_hits),
            "n_small": len(small_hits)}


def score(slides: list[dict], result: dict) -> dict:
    from mil_runtime.demo import rank_auroc

    if "error" in result:
        return result
    labels = np.array([int(s["label"]) for s in slides])
    return {"model": result["model"], "epochs": result["epochs"], "slide_auroc": rank_auroc(np.asarray(result["probabilities"]), labels),
            **localisation(slides, result["attention"]), "train_seconds": float(sum(result["fit_seconds"])),
            "peak_rss_mb": result["peak_rss_mb"]}


def describe(slides: list[dict]) -> str:
    tiles = np.array([len(s["features"]) for s in slides])
    shares = np.concatenate([s["lesion_share_of_tissue"] for s in slides]) if slides else np.zeros(0)
    lesion_slides = sum(int(s["label"]) for s in slides)
    small = sum(1 for s in slides if s["label"] and s["lesion_share_of_tissue"].max() < SMALL_LESION)
    return (f"{len(slides)} slides ({lesion_slides} with lesions, {small} of them with only lesions under "
            f"{SMALL_LESION:.0%} of the tissue); {tiles.min()}-{tiles.max()} tiles a slide (mean {tiles.mean():.0f}); "
            f"{shares.size} lesions covering {100 * shares.min():.2f}-{100 * shares.max():.1f} % of the tissue "
            f"(median {100 * np.median(shares):.2f} %)" if shares.size else f"{len(slides)} slides")


def table(rows: list[dict]) -> str:
    fmt = lambda v, spec=".3f": "n/a" if v is None or not np.isfinite(v) else format(v, spec)  # noqa: E731
    lines = ["| model | epochs | slide AUROC | instance AUROC (attention) | top tile in lesion "
             "| top tile in lesion (lesions < 1 %) | training time (s, all folds) | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row.get('epochs', '')} | {row['error']} | | | | | |")
            continue
        lines.append(f"| {row['model']} | {row['epochs']} | {fmt(row['slide_auroc'])} | {fmt(row['instance_auroc'])} "
                     f"| {fmt(row['top_hit'])} | {fmt(row['top_hit_small'])} (n={row['n_small']}) "
                     f"| {row['train_seconds']:.0f} | {row['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def parse_epochs_for(text: str) -> dict[str, int]:
    """'TransMIL=1,CAMIL=2' -> {'TransMIL': 1, 'CAMIL': 2}: per-model epoch budgets, stated in the table."""
    budgets = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = pair.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--epochs-for takes NAME=EPOCHS pairs, got {pair!r}")
        budgets[name.strip()] = int(value)
    return budgets


def seconds_left(deadline: str | None) -> float:
    """Seconds until the UTC wall-clock time HH:MM today (inf without a deadline)."""
    if deadline is None:
        return float("inf")
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    hour, minute = map(int, deadline.split(":"))
    return (now.replace(hour=hour, minute=minute, second=0, microsecond=0) - now).total_seconds()


def default_models() -> list[str]:
    from mil_train.models import list_models

    return [name for name in list_models() if name not in NOT_BY_DEFAULT]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="comma-separated registered names; default: every model but Composed")
    parser.add_argument("--slides", type=int, default=200)
    parser.add_argument("--slide-px", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0, help="slide i has seed SEED + i")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--keep-slides", action="store_true", help="keep the .svs files next to their features")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--epochs-for", default="", metavar="NAME=E,...", help="per-model epoch budgets (stated in the table)")
    parser.add_argument("--folds", type=int, default=FOLDS)
    parser.add_argument("--deadline", default=None, metavar="HH:MM", help="UTC time after which no model starts and "
                        "a running one is stopped (its row says so)")
    parser.add_argument("--workers", type=int, default=1, choices=[1], help="models trained at a time (one process each)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per model (its folds together)")
    parser.add_argument("--json", type=Path, default=None, help="also write the per-slide results and the table here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_model(json.loads(Path(args.worker).read_text()))), flush=True)
        return 0
    from mil_train.models import list_models

    models = default_models() if args.models is None else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(list_models()))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(list_models())}")
    try:
        epochs_for = parse_epochs_for(args.epochs_for)
    except ValueError as exc:
        parser.error(str(exc))
    started = time.perf_counter()
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    paths = generate(args.slides, args.slide_px, args.cache, args.seed, args.keep_slides, log=log)
    slides = load_slides(paths)
    log(f"data: {describe(slides)} ({time.perf_counter() - started:.0f} s)")
    jobs = [{"model": m, "paths": [str(p) for p in paths], "epochs": epochs_for.get(m, args.epochs),
             "folds": args.folds, "cache": str(args.cache)} for m in models]
    command = "python benchmarks/wsi_mil.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows, results = [], []
    for job in jobs:  # one model at a time: --workers 1 is the only setting (each model its own process)
        left = seconds_left(args.deadline)
        if left <= 0:
            result = {"model": job["model"], "epochs": job["epochs"], "error": f"not run (deadline {args.deadline} UTC)"}
        else:
            result = run_guarded(job, min(args.timeout, left))
        results.append(result)
        rows.append(score(slides, result))
        log(f"{job['model']}: {table(rows[-1:]).splitlines()[-1]}")
        write_outputs(args, command, slides, rows, results, time.perf_counter() - started)
    print(write_outputs(args, command, slides, rows, results, time.perf_counter() - started))
    return 0


def write_outputs(args, command: str, slides: list[dict], rows: list[dict], results: list[dict], wall: float) -> str:
    """The table so far (rewritten after every model, so a stopped run still leaves its rows)."""
    header = (f"`{command.strip()}`: {args.folds}-fold stratified CV (fold seed {FOLD_SEED}), Adam lr {LR:g} wd "
              f"{WEIGHT_DECAY:g}, batch 1, features standardised on the training fold, epochs per model as in the table; {args.slide_px} px slides at "
              f"{SLIDE_MPP} um/px, demo encoder (64-d, 128 px tiles at 1 um/px). Data: {describe(slides)}. "
              f"Wall {wall:.0f} s.")
    text = header + "\n\n" + table(rows) + "\n"
    if args.markdown is not None:
        args.markdown.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "results": results, "table": text}, indent=1))
    return text


if __name__ == "__main__":
    sys.exit(main())
