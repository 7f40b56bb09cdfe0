"""`python -m mil_runtime.demo [--out demo-out]`: the README's first command (`make demo`).

Runs the demo bundle (models/demo: a tiny encoder + an ABMIL trained on synthetic slides) through the
slide pipeline `mil-infer` uses, on the real H&E region vendored in tests/data and on a freshly
generated synthetic slide with planted lesions, then says where the heatmaps and GeoJSON are.
The demo model is a toy: NOT a diagnostic model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mil_runtime.errors import InputNotFoundError, MilkitError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "demo" / "abmil_demo.onnx"
REAL_SLIDE = REPO / "tests" / "data" / "CMU-1-Small-Region.svs"
SYNTHETIC_NAME = "synthetic-lesions.svs"
SYNTHETIC = {"height": 4096, "width": 4096, "mpp": 0.5, "lesions": "random 3", "tissue": 0.6, "seed": 7}
NOT_DIAGNOSTIC = ("NOTE: the demo model was trained on synthetic slides only. It is NOT a diagnostic model; "
                  "its output on real tissue means nothing.")


def _say(text: str = "") -> None:
    print(text, flush=True)


def _load_bundle(model_path: Path, device: str):
    from mil_runtime.encoder import find_encoder, load_encoder
    from mil_runtime.model import load_model

    if not model_path.is_file():
        raise InputNotFoundError(
            f"demo model not found at {model_path}; run the demo from a milkit source checkout, or build "
            "the bundle with `python models/build_demo.py`"
        )
    model = load_model(model_path, device=device)
    encoder = load_encoder(find_encoder(model_path, model.metadata), device=device)
    return model, encoder


def _synthetic_slide(out_dir: Path):
    try:
        from mil_runtime.demo.synthetic_slide import write_synthetic_slide

        return write_synthetic_slide(out_dir / SYNTHETIC_NAME, **SYNTHETIC)
    except MilkitError as exc:  # tifffile / imagecodecs missing: still run the real slide
        _say(f"skipping the synthetic slide: {exc}")
        return None


def _report(result, seconds: float, truth=None) -> dict:
    from mil_runtime.demo.synthetic_slide import rank_auroc

    probs = ", ".join(f"{n} {p:.3f}" for n, p in zip(result.class_names, result.class_probabilities))
    _say(f"  prediction: {result.predicted_name} ({probs}); {result.n_tiles} tiles at "
         f"{result.plan.tile_px} px / {result.plan.target_mpp:g} um/px; slide mpp {result.mpp:.4g} "
         f"({result.mpp_source}); {seconds:.1f} s")
    if truth is None:
        _say("  (real tissue: the demo model has only seen synthetic slides, so this prediction means nothing)")
    summary = {"prediction": result.predicted_name, "n_tiles": result.n_tiles, "seconds": round(seconds, 2),
               "outputs": {k: str(v) for k, v in result.outputs.items()}}
    if truth is not None:
        labels = truth.tile_labels(result.xy_level0, result.plan.tile_level0)
        auroc = rank_auroc(result.attention, labels)
        summary["attention_auroc"] = auroc
        _say(f"  planted lesions: {len(truth.lesions)}; attention ranks lesion tiles above lesion-free ones "
             f"with AUROC {auroc:.3f} ({int((labels == 1).sum())} lesion / {int((labels == 0).sum())} clean tiles)")
    for kind, label in (("heatmap", "attention heatmap"), ("geojson", "QuPath GeoJSON"), ("result", "JSON result")):
        if kind in result.outputs:
            _say(f"  {label + ':':20s} {result.outputs[kind]}")
    for warning in result.warnings:
        _say(f"  warning: {warning}")
    return summary


def run_demo(out_dir: str | Path = "demo-out", model_path: str | Path = DEFAULT_MODEL, device: str = "auto",
             workers: int = 2) -> dict:
    """Run the demo; returns {slide name: summary}. Raises the mil_runtime.errors family."""
    from mil_runtime.pipeline import run_slide

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _say("milkit demo: slide -> tissue -> tiles -> encoder -> ABMIL -> heatmap + GeoJSON")
    _say(NOT_DIAGNOSTIC)
    model, encoder = _load_bundle(Path(model_path), device)
    _say(f"model {model.path} ({model.metadata.model_name}, device {model.device}); encoder {encoder.path}")

    slides: list[tuple[Path, object]] = []
    if REAL_SLIDE.is_file():
        slides.append((REAL_SLIDE, None))
    else:
        _say(f"skipping the real slide: {REAL_SLIDE} is missing (a milkit source checkout ships it)")
    _say(f"generating a synthetic slide with planted lesions in {out_dir} ...")
    truth = _synthetic_slide(out_dir)
    if truth is not None:
        slides.append((truth.path, truth))

    summaries = {}
    for path, ground_truth in slides:
        _say(f"\n{path.name}" + (" (real H&E, CC0, OpenSlide test data)" if ground_truth is None else
                                 " (synthetic, generated just now)"))
        t0 = time.perf_counter()
        # The pipeline mil-infer runs for slide inputs (same loaders, same outputs).
        result = run_slide(path, model, encoder, out_dir=out_dir, workers=workers, progress=True)
        summaries[path.name] = _report(result, time.perf_counter() - t0, ground_truth)

    _say(f"\nAll outputs are in {out_dir.resolve()} (done in {time.perf_counter() - started:.0f} s).")
    _say("Open the *.heatmap.png files to see where the model looked; import the *.tiles.geojson files "
         "into QuPath (File > Import objects) to see per-tile attention over the slide.")
    _say(NOT_DIAGNOSTIC)
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mil_runtime.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="demo model (default: models/demo)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    try:
        run_demo(args.out, args.model, args.device)
    except MilkitError as exc:
        print(f"milkit demo: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
