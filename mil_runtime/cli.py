"""`mil-infer`: run an exported MIL model on feature files (and, through mil_runtime.pipeline, slides).

One result per input. A failed input prints one line, `error: <file>: <message>`, on stderr and the
others still run; the exit code is the first failure's code (table in mil_runtime.errors), 0 when
every input succeeded. Nothing partial is written: each input's outputs are staged in --out and
renamed into place together only when that input succeeded.

Slide inputs (anything that is not .h5) go to `mil_runtime.pipeline.run_slide(path, runner, settings,
staged)`, which returns the same kind of result dict and puts any extra files (heatmap, GeoJSON, ...)
into `staged` (a mil_runtime.atomic.StagedOutputs, None without --out).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from mil_runtime._version import __version__
from mil_runtime.atomic import StagedOutputs, atomic_output_dir, ensure_writable_dir
from mil_runtime import errors as errors_module
from mil_runtime.errors import InputNotFoundError, InvalidInputError, MilkitError, OutputError
from mil_runtime.features_io import FeatureFile, read_feature_file
from mil_runtime.model import MILRunner, Prediction, load_model
from mil_runtime.session import DEVICES

FEATURE_SUFFIXES = (".h5", ".hdf5")
INTERRUPTED_EXIT_CODE = 130



def _exit_code_table() -> str:
    """The exit-code table of mil_runtime.errors' docstring, for --help (one source of truth)."""
    rows = []
    for line in (errors_module.__doc__ or "").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            rows.append(f"  {cells[0]:>3}  {cells[2]}")
    rows.append(f"  {INTERRUPTED_EXIT_CODE:>3}  interrupted (Ctrl-C)")
    return "\n".join(rows)


EPILOG = (
    "\b\nExit codes (0 = every input succeeded):\n"
    + _exit_code_table()
    + "\n\nWith several inputs each gets its own result and the exit code is the first failure's. "
    "MILKIT_DEBUG=1 shows the traceback of unexpected errors."
)


@dataclass
class Settings:
    """What every input's run needs besides the model; slide options are added here."""

    out: Path | None = None
    device: str = "auto"
    quiet: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# -- result building ---------------------------------------------------------------------------
def model_identity(runner: MILRunner) -> dict[str, Any]:
    meta = runner.metadata
    return {
        "name": meta.model_name,
        "file": str(runner.path),
        "sha256": runner.sha256,
        "milkit_version": meta.version,
        "n_classes": meta.n_classes,
        "class_names": list(runner.class_names),
    }


def prediction_fields(prediction: Prediction) -> dict[str, Any]:
    return {
        "prediction": {
            "class_name": prediction.predicted_name,
            "class_index": prediction.predicted_index,
            "probability": prediction.probability,
        },
        "probabilities": prediction.probabilities_by_name(),
        "logits": [float(v) for v in prediction.logits],
    }


def encoder_warnings(recorded: str | None, recorded_sha: str | None, runner: MILRunner) -> list[str]:
    """The feature file's encoder against the one the model was trained on; only names can be compared."""
    expected = runner.metadata.encoder
    if expected is None or recorded is None:
        return []
    if recorded != expected.name:
        return [f"features were made by encoder {recorded!r} but the model expects {expected.name!r}"]
    if recorded_sha and expected.sha256 and recorded_sha != expected.sha256:
        return [f"encoder {recorded!r} file differs (sha256) from the one the model was trained with"]
    return []


def tiles_field(feature_file: FeatureFile, attention) -> list[dict[str, Any]]:
    """Per-tile level-0 (x, y) top-left corners with attention; x, y are null without coords."""
    coords = feature_file.coords_px
    return [
        {
            "x": int(coords[i, 0]) if coords is not None else None,
            "y": int(coords[i, 1]) if coords is not None else None,
            "attention": float(weight),
        }
        for i, weight in enumerate(attention)
    ]


def infer_features(path: Path, runner: MILRunner, settings: Settings, staged: StagedOutputs | None) -> dict:
    """Predict one CLAM/TRIDENT feature file and return its result dict."""
    start = time.perf_counter()
    feature_file = read_feature_file(path)
    read_s = time.perf_counter() - start
    warnings = encoder_warnings(feature_file.encoder, feature_file.encoder_sha256, runner)
    grid = None
    if feature_file.coords_px is not None and (runner.needs_coords or feature_file.tile_px_level0):
        grid = feature_file.grid_coords()  # (N, 2) (y, x)
    if feature_file.coords_px is None:
        warnings.append("the file has no coords: tiles have no positions")
    predict_start = time.perf_counter()
    prediction = runner.predict(feature_file.features, grid if runner.needs_coords else None, source=str(path))
    predict_s = time.perf_counter() - predict_start
    return {
        "milkit_version": __version__,
        "input": {"path": str(path), "type": "features"},
        "model": model_identity(runner),
        "encoder": {
            "recorded": {"name": feature_file.encoder, "sha256": feature_file.encoder_sha256},
            "expected": asdict(runner.metadata.encoder) if runner.metadata.encoder else None,
        },
        **prediction_fields(prediction),
        "n_instances": feature_file.n_instances,
        "mpp": feature_file.mpp,
        "tile_px_level0": feature_file.tile_px_level0,
        "device": runner.device,
        "timings_s": {"read": read_s, "predict": predict_s, "total": time.perf_counter() - start},
        "warnings": warnings,
        "tiles": tiles_field(feature_file, prediction.attention),
    }


def infer_slide(path: Path, runner: MILRunner, settings: Settings, staged: StagedOutputs | None) -> dict:
    if not path.exists():
        raise InputNotFoundError(f"{path}: input not found")
    try:
        from mil_runtime.pipeline import run_slide
    except ModuleNotFoundError as exc:
        if exc.name != "mil_runtime.pipeline":
            raise
        raise InvalidInputError(
            f"{path}: not a .h5 feature file, and this milkit build cannot read slides; pass CLAM/TRIDENT .h5 features"
        ) from None
    return run_slide(path, runner, settings, staged)


def infer_input(path: Path, runner: MILRunner, settings: Settings, staged: StagedOutputs | None) -> dict:
    if path.suffix.lower() in FEATURE_SUFFIXES:
        return infer_features(path, runner, settings, staged)
    return infer_slide(path, runner, settings, staged)


# -- reporting ---------------------------------------------------------------------------------
def one_line(text: str) -> str:
    return " ".join(str(text).split())


def error_line(exc: BaseException, path: Path | None) -> str:
    """`error: [<file>: ]<message>` on one line; a message that starts with the path is not repeated."""
    if isinstance(exc, MilkitError):
        message = one_line(exc)
    else:
        message = f"unexpected {type(exc).__name__}: {one_line(exc)} (set MILKIT_DEBUG=1 for the traceback)"
    if path is None:
        return f"error: {message}"
    name = str(path)
    if message.startswith(name):
        message = message[len(name) :].lstrip(": ")
    return f"error: {name}: {message}"


def report_failure(exc: BaseException, path: Path | None) -> int:
    """Print one stderr line (plus the traceback under MILKIT_DEBUG=1) and return the exit code."""
    if os.environ.get("MILKIT_DEBUG") == "1":
        traceback.print_exception(exc, file=sys.stderr)
    tqdm.write(error_line(exc, path), file=sys.stderr)
    return exc.exit_code if isinstance(exc, MilkitError) else 1


def human_line(result: dict) -> str:
    prediction = result["prediction"]
    return (
        f"{result['input']['path']}: {prediction['class_name']} "
        f"(p={prediction['probability']:.3f}, {result['n_instances']} instances)"
    )


def result_name(path: Path) -> str:
    return f"{path.stem}.json"


def run_one(path: Path, runner: MILRunner, settings: Settings, claimed: dict[str, Path]) -> dict:
    """Infer one input; with --out, stage and commit its files together."""
    if settings.out is None:
        return infer_input(path, runner, settings, None)
    name = result_name(path)
    if name in claimed:
        raise OutputError(f"{path}: its result {name} would overwrite the one of {claimed[name]}; rename one input")
    claimed[name] = path
    with atomic_output_dir(settings.out) as staged:
        result = infer_input(path, runner, settings, staged)
        with open(staged.path(name), "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
            handle.write("\n")
    return result


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "-m", "model_path", required=True, type=click.Path(path_type=Path),
              help="Exported milkit MIL model (.onnx).")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Folder for one <input stem>.json per input (created if missing).")
@click.option("--json", "as_json", is_flag=True, help="Print each result as one JSON line on stdout.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="onnxruntime provider: cuda when available (auto), or force one.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no warnings on stderr.")
@click.version_option(__version__, prog_name="milkit")
def main(inputs, model_path, out, as_json, device, threads, quiet) -> None:
    """Predict INPUTS (CLAM/TRIDENT .h5 feature files) with an exported MIL model.

    Prints one line per input (file, predicted class, probability), or JSON with --json.
    """
    settings = Settings(out=out, device=device, quiet=quiet)
    try:
        if out is not None:
            ensure_writable_dir(out)
        runner = load_model(model_path, device=device, threads=threads)
    except KeyboardInterrupt:
        tqdm.write("error: interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except Exception as exc:
        sys.exit(report_failure(exc, None))

    exit_code = 0
    claimed: dict[str, Path] = {}
    show_progress = not quiet and len(inputs) > 1 and sys.stderr.isatty()
    for path in tqdm(inputs, unit="input", file=sys.stderr, disable=not show_progress):
        try:
            result = run_one(path, runner, settings, claimed)
        except KeyboardInterrupt:
            tqdm.write("error: interrupted", file=sys.stderr)
            sys.exit(INTERRUPTED_EXIT_CODE)
        except Exception as exc:
            code = report_failure(exc, path)
            exit_code = exit_code or code
            continue
        if not quiet:
            for warning in result.get("warnings", []):
                tqdm.write(f"warning: {path}: {one_line(warning)}", file=sys.stderr)
        tqdm.write(json.dumps(result) if as_json else human_line(result), file=sys.stdout)
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
