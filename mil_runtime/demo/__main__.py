"""`python -m mil_runtime.demo [--out demo-out]`: the README's first command (`make demo`).

Runs `mil-infer` with the demo bundle (models/demo: a tiny encoder + an ABMIL trained on synthetic
slides) on the real H&E region vendored in tests/data and on a freshly
generated synthetic slide with planted lesions, then says where the heatmaps and GeoJSON are.
The demo model is a toy: NOT a diagnostic model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

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


class DemoFailed(MilkitError):
    """mil-infer failed (it already printed why); the demo exits with mil-infer's own code."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _check_bundle(model_path: Path) -> None:
    if not model_path.is_file():
        raise InputNotFoundError(
            f"demo model not found at {model_path}; run the demo from a milkit source checkout, or build "
            "the bundle with `python models/build_demo.py`"
        )


def _mil_infer(slides: list[Path], model_path: Path, out_dir: Path, device: str, workers: int) -> list[dict]:
    """Run `mil-infer` (the installed command's code, in a child process) and return its JSON results.

    Progress bars, warnings and error lines go straight to the user's stderr; a failure exits with the
    CLI's own documented code.
    """
    args = [*map(str, slides), "--model", str(model_path), "--out", str(out_dir), "--device", device,
            "--workers", str(workers), "--no-mirror"]  # a cohort of two slides from two folders: one flat folder
    _say("$ mil-infer " + " ".join(args))
    done = subprocess.run([sys.executable, "-m", "mil_runtime.cli", *args, "--json"], stdout=subprocess.PIPE,
                          text=True)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        raise DemoFailed(done.returncode, f"mil-infer failed (exit code {done.returncode}); see the error above")
    return results


def _tile_attention(result: dict) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) level-0 (x, y) corners and (N,) attention, read back from the tiles CSV mil-infer wrote."""
    table = np.genfromtxt(result["outputs"]["tiles_csv"], delimiter=",", names=True)
    table = np.atleast_1d(table)
    return np.stack([table["x"], table["y"]], axis=1).astype(np.int64), table["attention"]


def _synthetic_slide(out_dir: Path):
    try:
        from mil_runtime.demo.synthetic_slide import write_synthetic_slide

        return write_synthetic_slide(out_dir / SYNTHETIC_NAME, **SYNTHETIC)
    except MilkitError as exc:  # tifffile / imagecodecs missing: still run the real slide
        _say(f"skipping the synthetic slide: {exc}")
        return None


def _report(result: dict, truth=None) -> dict:
    from mil_runtime.demo.synthetic_slide import rank_auroc

    probs = ", ".join(f"{name} {p:.3f}" for name, p in result["probabilities"].items())
    tiling = result["tiling"]
    _say(f"  prediction: {result['prediction']['class_name']} ({probs}); {result['n_instances']} tiles at {tiling['tile_px']} px / "
         f"{tiling['target_mpp']:g} um/px; slide mpp {result['mpp']['value']:.4g} ({result['mpp']['source']}); "
         f"{result['timings_s']['total']:.1f} s")
    summary = {"prediction": result["prediction"], "n_instances": result["n_instances"], "outputs": result["outputs"]}
    if truth is None:
        _say("  (real tissue: the demo model has only seen synthetic slides, so this prediction means nothing)")
    else:
        xy, attention = _tile_attention(result)
        labels = truth.tile_labels(xy, tiling["tile_level0"])
        summary["attention_auroc"] = auroc = rank_auroc(attention, labels)
        _say(f"  planted lesions: {len(truth.lesions)}; attention ranks lesion tiles above lesion-free ones "
             f"with AUROC {auroc:.3f} ({int((labels == 1).sum())} lesion / {int((labels == 0).sum())} clean tiles)")
    for kind, label in (("heatmap", "attention heatmap"), ("geojson", "QuPath GeoJSON"), ("result", "JSON result")):
        if kind in result["outputs"]:
            _say(f"  {label + ':':20s} {result['outputs'][kind]}")
    for warning in result.get("warnings", []):
        _say(f"  warning: {warning}")
    return summary


def run_demo(out_dir: str | Path = "demo-out", model_path: str | Path = DEFAULT_MODEL, device: str = "auto",
             workers: int = 2) -> dict:
    """Run the demo; returns {slide file name: summary}. Raises the mil_runtime.errors family."""
    started = time.perf_counter()
    out_dir, model_path = Path(out_dir), Path(model_path)
    _say("milkit demo: slide -> tissue -> tiles -> encoder -> ABMIL -> heatmap + GeoJSON")
    _say(NOT_DIAGNOSTIC)
    _check_bundle(model_path)
    out_dir.mkdir(parents=True, exist_ok=True)

    slides: dict[str, tuple[Path, object]] = {}
    if REAL_SLIDE.is_file():
        slides[REAL_SLIDE.name] = (REAL_SLIDE, None)
    else:
        _say(f"skipping the real slide: {REAL_SLIDE} is missing (a milkit source checkout ships it)")
    _say(f"generating a synthetic slide with planted lesions in {out_dir} ...")
    truth = _synthetic_slide(out_dir)
    if truth is not None:
        slides[truth.path.name] = (truth.path, truth)

    results = _mil_infer([path for path, _ in slides.values()], model_path, out_dir, device, workers)
    summaries = {}
    for result in results:
        name = Path(result["input"]["path"]).name
        truth = slides[name][1]
        _say(f"\n{name}" + (" (real H&E, CC0, OpenSlide test data)" if truth is None else
                             " (synthetic, generated just now)"))
        summaries[name] = _report(result, truth)

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
