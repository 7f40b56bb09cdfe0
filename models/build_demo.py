"""Build the demo bundle in models/demo/: a tiny tile encoder and an ABMIL trained on synthetic slides.

    python models/build_demo.py            # ~2 min on 2 CPU cores, same files every run (fixed seeds)

Steps:
1. Export the `tiny_cnn` encoder (seeded random init, no pretrained weights) at 128 px tiles.
2. Write synthetic H&E-like slides (mil_runtime.demo) at 0.5 um/px: half with planted lesions, half clean.
3. Encode every slide through `mil_runtime.pipeline.run_slide`, the code `mil-infer` runs, so training
   features are exactly the features the runtime computes at inference (tissue, grid, reads, encoder).
   run_slide needs a MIL model that names the tiling and the encoder, so an untrained ABMIL with the
   final metadata serves as a placeholder for this step; only its features are kept.
4. Train ABMIL (binary: clean / lesion) on slide labels only, keep the best epoch by validation loss.
5. Export it to models/demo/abmil_demo.onnx with the encoder reference (name, dim, sha256) and tiling,
   and write the model card models/demo/README.md with the measured validation numbers.

The result is a toy: it has seen synthetic slides only and is NOT a diagnostic model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mil_export import export_onnx
from mil_export.encoders import build_encoder, export_encoder
from mil_runtime.contract import EncoderRef, Tiling
from mil_runtime.demo import rank_auroc, write_synthetic_slide
from mil_runtime.encoder import encoder_filename, load_encoder
from mil_runtime.model import load_model
from mil_runtime.pipeline import run_slide
from mil_train.data import make_bag
from mil_train.models import ABMIL
from mil_train.trainer import Trainer, make_loader, seed_everything

HERE = Path(__file__).resolve().parent
DEMO_DIR = HERE / "demo"
ENCODER_NAME = "tiny_cnn"
MODEL_FILE = "abmil_demo.onnx"
CLASS_NAMES = ["clean", "lesion"]
TILING = Tiling(tile_px=128, mpp=1.0, overlap=0.0)  # 128 um tiles: CMU-1-Small-Region gives < 100
SLIDE_MPP = 0.5
SLIDE_PX = 2560  # 1.28 mm square: about 100 candidate tiles per slide
TRAIN_SLIDES, VAL_SLIDES = 32, 12
TRAIN_SEED, VAL_SEED = 1000, 2000  # slide seeds: train 1000.., val 2000.. (tests use other seeds)
MODEL_SEED = 0
ABMIL_CONFIG = {"att_dim": 32, "embed_dims": [32], "gated": False, "dropout": 0.0}
TRAINING = {"lr": 2e-3, "weight_decay": 3e-3, "epochs": 80, "patience": 15, "batch_size": 4}


def slide_spec(index: int, seed0: int) -> dict:
    """Even indices: 1-3 random lesions; odd: clean. Tissue cover varies with the seed."""
    seed = seed0 + index
    rng = np.random.default_rng(seed)
    lesions = f"random {int(rng.integers(1, 4))}" if index % 2 == 0 else None
    return {"seed": seed, "lesions": lesions, "tissue": float(rng.uniform(0.4, 0.75))}


def export_tiny_encoder(out_dir: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no pretrained weights": intended, the model card says so
        encoder, _ = build_encoder(ENCODER_NAME, input_px=TILING.tile_px)
    provenance = {"weights": "seeded random init (no pretrained weights)", "purpose": "milkit demo"}
    return export_encoder(encoder, out_dir / encoder_filename(ENCODER_NAME), name=ENCODER_NAME,
                          tile_px=TILING.tile_px, provenance=provenance)


def new_abmil() -> ABMIL:
    seed_everything(MODEL_SEED)
    return ABMIL(in_dim=64, n_classes=1, **ABMIL_CONFIG)


def export_abmil(model: ABMIL, path: Path, encoder_path: Path, provenance: dict) -> Path:
    encoder = load_encoder(encoder_path, device="cpu")
    ref = EncoderRef(name=encoder.name, output_dim=encoder.output_dim, sha256=encoder.sha256)
    return export_onnx(model, path, class_names=CLASS_NAMES, encoder=ref, tiling=TILING, provenance=provenance)


def encode_slides(specs: list[dict], work: Path, placeholder: Path, encoder_path: Path) -> list[dict]:
    """Write each synthetic slide and encode it with run_slide: features, coords, labels."""
    model = load_model(placeholder, device="cpu")
    encoder = load_encoder(encoder_path, device="cpu")
    slides = []
    for spec in specs:
        info = write_synthetic_slide(work / f"s{spec['seed']}.svs", height=SLIDE_PX, width=SLIDE_PX,
                                     mpp=SLIDE_MPP, lesions=spec["lesions"], tissue=spec["tissue"],
                                     seed=spec["seed"])
        result = run_slide(info.path, model, encoder, workers=2)
        slides.append({
            "features": result.features, "grid_yx": result.grid_yx, "label": int(info.is_lesion_slide),
            "tile_labels": info.tile_labels(result.xy_level0, result.plan.tile_level0),
        })
        info.path.unlink()
    return slides


def to_bags(slides: list[dict]) -> list:
    return [make_bag(s["features"], float(s["label"]), y_inst=s["tile_labels"], coords=s["grid_yx"])
            for s in slides]


def evaluate_export(model_path: Path, encoder_path: Path, slides: list[dict]) -> dict:
    """Slide AUROC and separation, and attention instance AUROC, from the exported file (onnxruntime)."""
    runner = load_model(model_path, device="cpu")
    probs, inst = [], []
    for s in slides:
        prediction = runner.predict(s["features"], coords=s["grid_yx"])
        probs.append(float(prediction.class_probabilities[1]))
        if s["label"]:
            inst.append(rank_auroc(prediction.attention, s["tile_labels"]))
    labels = np.array([s["label"] for s in slides])
    probs = np.array(probs)
    return {
        "slide_auroc": round(rank_auroc(probs, labels), 4),
        "min_lesion_prob": round(float(probs[labels == 1].min()), 4),
        "max_clean_prob": round(float(probs[labels == 0].max()), 4),
        "attention_instance_auroc_mean": round(float(np.nanmean(inst)), 4),
        "attention_instance_auroc_min": round(float(np.nanmin(inst)), 4),
    }


def build(out_dir: Path = DEMO_DIR, verbose: bool = True) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(2)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = print if verbose else (lambda *a, **k: None)

    encoder_path = export_tiny_encoder(out_dir)
    log(f"encoder: {encoder_path}")
    with tempfile.TemporaryDirectory(prefix="milkit-demo-build-") as tmp:
        work = Path(tmp)
        placeholder = export_abmil(new_abmil(), work / "placeholder.onnx", encoder_path, {})
        train = encode_slides([slide_spec(i, TRAIN_SEED) for i in range(TRAIN_SLIDES)], work, placeholder,
                              encoder_path)
        val = encode_slides([slide_spec(i, VAL_SEED) for i in range(VAL_SLIDES)], work, placeholder,
                            encoder_path)
    log(f"encoded {len(train)} + {len(val)} synthetic slides ({time.perf_counter() - started:.0f} s)")

    model = new_abmil()
    trainer = Trainer(model, lr=TRAINING["lr"], weight_decay=TRAINING["weight_decay"], epochs=TRAINING["epochs"],
                      patience=TRAINING["patience"], monitor="val_loss", seed=MODEL_SEED, progress=False)
    batch = TRAINING["batch_size"]
    trainer.fit(make_loader(to_bags(train), batch_size=batch, shuffle=True, seed=MODEL_SEED),
                make_loader(to_bags(val), batch_size=batch))
    log(f"trained ABMIL: best epoch {trainer.best_epoch}, val loss {trainer.best_value:.4f}")

    provenance = {
        "dataset": "milkit synthetic H&E-like slides (mil_runtime.demo.write_synthetic_slide)",
        "train_slides": TRAIN_SLIDES, "val_slides": VAL_SLIDES, "train_seeds": f"{TRAIN_SEED}..",
        "val_seeds": f"{VAL_SEED}..", "slide_px": SLIDE_PX, "slide_mpp": SLIDE_MPP,
        "labels": "slide level: clean (0) / lesion (1)", "best_epoch": trainer.best_epoch,
        "training": TRAINING, "model_seed": MODEL_SEED, "command": "python models/build_demo.py",
        "diagnostic": False,
    }
    model_path = out_dir / MODEL_FILE
    export_abmil(model, model_path, encoder_path, provenance)
    metrics = evaluate_export(model_path, encoder_path, val)
    metrics["best_epoch"] = trainer.best_epoch
    write_model_card(out_dir, metrics)  # no timings in the card: the build rewrites it byte for byte
    log(f"model: {model_path}\nvalidation: {json.dumps(metrics)}")
    log(f"built in {time.perf_counter() - started:.0f} s")
    return metrics


def write_model_card(out_dir: Path, metrics: dict) -> None:
    sizes = {p.name: p.stat().st_size for p in sorted(out_dir.glob("*.onnx"))}
    files = "\n".join(f"| {name} | {size / 1024:.0f} KiB |" for name, size in sizes.items())
    text = CARD.format(files=files, metrics=json.dumps(metrics, indent=2), cfg=json.dumps(ABMIL_CONFIG),
                       training=json.dumps(TRAINING), train=TRAIN_SLIDES, val=VAL_SLIDES, px=SLIDE_PX,
                       mpp=SLIDE_MPP, tile=TILING.tile_px, tile_mpp=TILING.mpp)
    tmp = out_dir / ".README.md.tmp"
    tmp.write_text(text)
    tmp.replace(out_dir / "README.md")


CARD = """# milkit demo bundle (NOT a diagnostic model)

**This is a toy model for trying milkit. It was trained on synthetic, computer-drawn "slides" only.
It has never seen a real lesion. Do not use it on patient material or for any medical decision.**

Files (made by `python models/build_demo.py`, which rewrites this card):

| file | size |
|---|---|
{files}

- `tiny_cnn.onnx`: tile encoder, 4 convolutions + global average pooling, 64-d features, uint8 RGB
  {tile} x {tile} tiles in. **Random weights** (seeded, no pretraining): it only tells colours and
  textures apart.
- `abmil_demo.onnx`: ABMIL (attention-based MIL, Ilse et al. 2018), binary, classes `clean` /
  `lesion`, config `{cfg}`. Its metadata names the encoder (name, 64-d, sha256 of `tiny_cnn.onnx`) and
  the tiling: {tile} px tiles at {tile_mpp} um/px, no overlap. `mil-infer` finds the encoder next to it.

## How it was made
`python models/build_demo.py` (fixed seeds; about 2 minutes on 2 CPU cores):
1. {train} training and {val} validation slides from `mil_runtime.demo.write_synthetic_slide`,
   {px} x {px} px at {mpp} um/px, pink "tissue" with purple "nuclei"; half of them have 1-3 planted
   "lesions" (discs of 150-300 um radius with denser, larger, darker, bluer nuclei), half are clean.
2. Each slide is encoded with `mil_runtime.pipeline.run_slide`, the same code `mil-infer` runs, so
   the training features are the inference features.
3. ABMIL trained on slide labels only (no tile labels): Adam, `{training}`, best epoch by validation
   loss.

## Measured on the validation slides (exported file, onnxruntime)
Instance AUROC: attention scores of tiles that are >= 50% lesion against lesion-free tiles (partly
covered tiles left out), per lesion slide.

```json
{metrics}
```

## What it is for
The README's first command (`make demo`), the end-to-end tests and the examples. On real H&E (e.g.
`tests/data/CMU-1-Small-Region.svs`) it runs but its output means nothing.

## Licence
Apache-2.0, like milkit. No third-party weights or data are inside.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="output folder (default models/demo)")
    args = parser.parse_args()
    build(args.out)


if __name__ == "__main__":
    main()
