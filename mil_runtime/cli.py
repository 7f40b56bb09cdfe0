"""`mil-infer`: run an exported MIL model on feature files and slides.

Inputs ending in .h5/.hdf5 are CLAM/TRIDENT feature files: predicted directly, result `<stem>.json`.
Anything else is a slide: `mil_runtime.pipeline.run_slide` tiles it, encodes the tiles with the
encoder (--encoder, else the one the model names, next to the model file) and writes `<stem>.json`
plus heatmap, tissue mask, GeoJSON, CSV and a feature file (the set `--outputs` chooses; DICOM inputs,
a series folder or one instance, also get a Bulk Simple Annotations object and a Parametric Map).

One result per input. A failed input prints one line, `error: <file>: <message>`, on stderr and the
others still run; the exit code is the first failure's code (table in mil_runtime.errors and in
--help), 0 when every input succeeded. Nothing partial is written: each input's outputs appear
together, only when that input succeeded.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from mil_runtime import errors as errors_module
from mil_runtime._version import __version__
from mil_runtime.atomic import ensure_writable_dir
from mil_runtime.claims import claim_stem, clean_stale_temps
from mil_runtime.domain import check_domain
from mil_runtime.errors import ContractMismatchError, InputNotFoundError, InvalidInputError, MilkitError, OutputError
from mil_runtime.features_io import FeatureFile, read_feature_file
from mil_runtime.model import MILRunner, load_model
from mil_runtime.outputs.result import encoder_identity, result_document
from mil_runtime.outputs.record import read_output_set
from mil_runtime.outputs.writer import DEFAULT_OUTPUTS, OUTPUT_NAMES, parse_outputs, to_jsonable, write_result_set
from mil_runtime.cohort.executors import EXECUTORS
from mil_runtime.cohort.plan import shard_from_env
from mil_runtime.session import DEVICES, parse_device

FEATURE_SUFFIXES = (".h5", ".hdf5")
INTERRUPTED_EXIT_CODE = 130
# --mpp's range: mil_runtime.slide.mpp.PLAUSIBLE_MPP, the range recorded values get (a test checks they
# agree; importing it here would load openslide for feature files too)
PLAUSIBLE_MPP = (0.05, 20.0)
TERMINATED_EXIT_CODE = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: staged temporaries removed, claims released, one line, exit 143."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _interrupted(exc: KeyboardInterrupt) -> None:
    if isinstance(exc, Terminated):
        tqdm.write("error: terminated (SIGTERM); no partial outputs were left", file=sys.stderr)
        sys.exit(TERMINATED_EXIT_CODE)
    tqdm.write("error: interrupted", file=sys.stderr)
    sys.exit(INTERRUPTED_EXIT_CODE)


def _exit_code_table() -> str:
    """The exit-code table of mil_runtime.errors' docstring, for --help (one source of truth)."""
    rows = []
    for line in (errors_module.__doc__ or "").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            rows.append(f"  {cells[0]:>3}  {cells[2]}")
    rows.append(f"  {INTERRUPTED_EXIT_CODE:>3}  interrupted (Ctrl-C)")
    rows.append(f"  {TERMINATED_EXIT_CODE:>3}  terminated (SIGTERM)")
    return "\n".join(rows)


EPILOG = (
    "\b\nExit codes (0 = every input succeeded):\n"
    + _exit_code_table()
    + "\n\nWith several inputs each gets its own result and the exit code is the first failure's. "
    "MILKIT_DEBUG=1 shows the traceback of unexpected errors."
)


@dataclass
class Settings:
    """What every input's run needs besides the model."""

    model_path: Path
    out: Path | None = None
    device: str = "auto"
    threads: int | None = None
    quiet: bool = False
    encoder_path: Path | None = None
    mpp: float | None = None
    tissue_threshold: float | None = None
    batch_size: int = 64
    workers: int = 4
    verify: bool = False
    outputs: str | None = None  # --outputs, None = the default set
    roi: Path | None = None
    geojson_frame: str = "bounds"
    _encoder: Any = field(default=None, repr=False)

    def encoder(self, runner: MILRunner) -> Any:
        """The tile encoder, loaded on the first slide (feature files never need one)."""
        if self._encoder is None:
            from mil_runtime.encoder import find_encoder, load_encoder

            path = find_encoder(self.model_path, runner.metadata, self.encoder_path)
            self._encoder = load_encoder(path, device=self.device, threads=self.threads)
        return self._encoder


@dataclass
class Outcome:
    """One input's result: the JSON dict, plus what the one-line summary needs."""

    result: dict[str, Any]
    class_name: str
    probability: float
    n_instances: int
    unit: str  # "instances" (feature file) or "tiles" (slide)
    warnings: list[str]


# -- result building ---------------------------------------------------------------------------
def check_recorded_encoder(feature_file: FeatureFile, runner: MILRunner) -> None:
    """Refuse features that record another encoder than the model's (as slides are refused).

    Files that record no encoder (plain CLAM/TRIDENT output) are only checked by feature dimension.
    """
    expected = runner.metadata.encoder
    if expected is None or feature_file.encoder is None:
        return
    fix = f"re-encode the slide with {expected.name!r} (or give mil-infer the slide itself)"
    if feature_file.encoder != expected.name:
        raise ContractMismatchError(
            f"{feature_file.path}: features were made by encoder {feature_file.encoder!r} but the model "
            f"expects {expected.name!r}; {fix}"
        )
    if feature_file.encoder_sha256 and expected.sha256 and feature_file.encoder_sha256 != expected.sha256:
        raise ContractMismatchError(
            f"{feature_file.path}: encoder {expected.name!r} of the features is not the same file (sha256) the "
            f"model was trained with; {fix}"
        )
    made_by, trained_on = feature_file.encoder_weights_sha256, expected.weights_sha256
    if made_by and trained_on and made_by != trained_on:
        raise ContractMismatchError(
            f"{feature_file.path}: encoder {expected.name!r} of the features was exported from other weights "
            f"(sha256 {made_by[:12]}...) than the model was trained on ({trained_on[:12]}...); {fix}"
        )


def infer_features(path: Path, runner: MILRunner, settings: Settings) -> Outcome:
    """Predict one CLAM/TRIDENT feature file; with --out, write `<stem>.json` atomically."""
    if settings.roi is not None:
        raise InvalidInputError(
            f"{path}: --roi restricts the tiling of slides; a feature file is already tiled, give the slide instead"
        )
    start = time.perf_counter()
    feature_file = read_feature_file(path)
    read_s = time.perf_counter() - start
    check_recorded_encoder(feature_file, runner)
    warnings = [] if feature_file.coords_px is not None else ["the file has no coords: tiles have no positions"]
    grid = None  # (N, 2) (y, x) grid units, only for models that use positions
    if runner.needs_coords and feature_file.coords_px is not None:
        grid = feature_file.grid_coords()
    predict_start = time.perf_counter()
    prediction = runner.predict(feature_file.features, grid, source=str(path))
    predict_s = time.perf_counter() - predict_start
    domain = check_domain(feature_file.features, runner.metadata, warnings)  # None: the model has no stats
    result = result_document(
        input_path=path, input_type="features", runner=runner, prediction=prediction,
        encoder=encoder_identity(runner, feature_file.encoder, feature_file.encoder_sha256,
                                 output_dim=feature_file.feature_dim),
        xy_level0=feature_file.coords_px,
        mpp={"value": feature_file.mpp, "source": "feature-file"},
        tiling={"tile_px_level0": feature_file.tile_px_level0, "stride_level0": feature_file.stride_level0},
        timings={"read": read_s, "predict": predict_s, "total": time.perf_counter() - start},
        warnings=warnings, extra={"domain": domain} if domain is not None else None,
    )
    if settings.out is not None:
        write_result_set(settings.out, path.stem, result, verify=settings.verify)
    return Outcome(result, prediction.predicted_name, prediction.probability, feature_file.n_instances,
                   "instances", warnings)


def infer_slide(path: Path, runner: MILRunner, settings: Settings) -> Outcome:
    """Run a slide through mil_runtime.pipeline; with --out it writes all its outputs together."""
    if not path.exists():
        raise InputNotFoundError(f"{path}: input not found")
    from mil_runtime.pipeline import run_slide  # openslide & co. only when a slide is given

    options = {} if settings.tissue_threshold is None else {"tissue_threshold": settings.tissue_threshold}
    slide = run_slide(path, runner, settings.encoder(runner), out_dir=settings.out, mpp=settings.mpp,
                      batch_size=settings.batch_size, workers=settings.workers, progress=not settings.quiet,
                      verify=settings.verify, outputs=settings.outputs, roi=settings.roi,
                      geojson_frame=settings.geojson_frame, **options)
    document = slide.to_dict()
    if settings.out is not None:  # print what the set's record says (its "output_set" included)
        document = read_output_set(settings.out, path.stem, verify_hashes=False).record or document
    return Outcome(document, slide.predicted_name, slide.prediction.probability, slide.n_tiles,
                   "tiles", list(slide.warnings))


def infer_input(path: Path, runner: MILRunner, settings: Settings) -> Outcome:
    if path.suffix.lower() in FEATURE_SUFFIXES:
        return infer_features(path, runner, settings)
    return infer_slide(path, runner, settings)


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


def human_line(path: Path, outcome: Outcome) -> str:
    summary = task_summary((outcome.result or {}).get("prediction") or {})
    if summary is not None:  # regression / survival: no class
        return f"{path}: {summary} ({outcome.n_instances} {outcome.unit})"
    return f"{path}: {outcome.class_name} (p={outcome.probability:.3f}, {outcome.n_instances} {outcome.unit})"


def task_summary(prediction: dict[str, Any]) -> str | None:
    """`risk=0.412` (survival) or `age=63.1, grade=2.04` (regression); None for a classifier's prediction."""
    if "risk" in prediction:
        return f"risk={float(prediction['risk']):.4g}"
    if "values" in prediction:
        return ", ".join(f"{name}={float(value):.4g}" for name, value in prediction["values"].items())
    return None


def result_name(path: Path) -> str:
    return f"{path.stem}.json"


def expand_inputs(inputs: tuple[Path, ...]) -> list[Path]:
    """Inputs as given, with quoted glob patterns ("slides/*.svs") expanded in sorted order.

    A pattern that matches nothing stays as it is, so it is reported as a missing input.
    """
    expanded: list[Path] = []
    for path in inputs:
        if not path.exists() and glob.has_magic(str(path)):
            matches = sorted(glob.glob(str(path)))
            if matches:
                expanded.extend(Path(match) for match in matches)
                continue
        expanded.append(path)
    return expanded


def run_one(path: Path, runner: MILRunner, settings: Settings, claimed: dict[str, Path]) -> Outcome:
    """Infer one input, refusing one whose `<stem>.json` would overwrite an earlier input's result."""
    if settings.out is not None:
        name = result_name(path)
        if name in claimed:
            raise OutputError(
                f"{path}: its result {name} would overwrite the one of {claimed[name]}; rename one input"
            )
        claimed[name] = path
        with claim_stem(settings.out, path.stem):  # <stem>.lock: a second live writer fails (exit 12)
            return infer_input(path, runner, settings)
    return infer_input(path, runner, settings)


class OneLineUsageError(click.UsageError):
    """A usage error shown as one line, `error: <what is wrong> (see mil-infer --help)`, exit 2."""

    def show(self, file=None) -> None:
        click.echo(f"error: {one_line(self.format_message())} (see mil-infer --help)", err=True)


class OneLineCommand(click.Command):
    """mil-infer's command: one-line usage errors, and output that survives a non-UTF-8 terminal."""

    def main(self, *args, **kwargs):
        for stream in (sys.stdout, sys.stderr):  # PYTHONIOENCODING=ascii: escape, never crash on a name
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        return super().main(*args, **kwargs)

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            if isinstance(exc, OneLineUsageError):
                raise
            raise OneLineUsageError(exc.format_message(), exc.ctx) from None


class DeviceType(click.ParamType):
    """--device: auto, cpu, cuda or cuda:N."""

    name = "device"

    def get_metavar(self, param, *args, **kwargs) -> str:
        return "[" + "|".join(DEVICES) + "|cuda:N]"

    def convert(self, value, param, ctx):
        try:
            kind, index = parse_device(value)
        except MilkitError as exc:
            self.fail(str(exc), param, ctx)
        return kind if index is None else f"{kind}:{index}"


def _print_status(out: Path, as_json: bool) -> None:
    """--status OUT: one line of counts (or JSON), exit 0; a folder without cohort.json: one error line."""
    from mil_runtime.cohort.records import cohort_status

    try:
        counts = cohort_status(out)
    except Exception as exc:
        sys.exit(report_failure(exc, None))
    if as_json:
        click.echo(json.dumps(counts))
    else:
        click.echo(f"{out}: {counts['done']} done, {counts['failed']} failed, {counts['pending']} pending, "
                   f"{counts['running']} running, {counts['stale_claims']} stale claims "
                   f"(of {counts['total']} inputs)")
    sys.exit(0)


def _record_outcome(path: Path, record: dict) -> Outcome:
    """The summary line's fields from a set's record (what a run prints, also for a skipped input)."""
    prediction = record.get("prediction") or {}
    unit = "instances" if (record.get("input") or {}).get("type") == "features" else "tiles"
    return Outcome(record, str(prediction.get("class_name")), float(prediction.get("probability") or 0.0),
                   int(record.get("n_instances") or 0), unit, list(record.get("warnings") or []))


def _run_cohort_cli(inputs: list[Path], settings: Settings, *, as_json: bool, rerun: bool, retry_failed: bool,
                    shard: tuple[int, int] | None, mirror: bool | None, executor: str,
                    ray_options: dict | None) -> int:
    """A cohort run (mil_runtime.cohort.run_cohort): one line per input as for any run, a summary line on
    stderr (`cohort OUT: ...`, not with --quiet), the first failure's code."""
    from mil_runtime.cohort.runner import run_cohort
    from mil_runtime.cohort.worker import CohortJob
    from mil_runtime.outputs.record import read_output_set

    job = CohortJob(model_path=settings.model_path, encoder_path=settings.encoder_path, device=settings.device,
                    threads=settings.threads, mpp=settings.mpp, tissue_threshold=settings.tissue_threshold,
                    outputs=settings.outputs, roi=settings.roi, geojson_frame=settings.geojson_frame,
                    batch_size=settings.batch_size, workers=settings.workers, verify=settings.verify)
    show_progress = not settings.quiet and len(inputs) > 1 and sys.stderr.isatty()
    bar = tqdm(total=len(inputs) if shard is None else None, unit="input", file=sys.stderr,
               disable=not show_progress)
    exit_code = 0

    def on_result(result) -> None:
        nonlocal exit_code
        bar.update(1)
        path = result.item.input
        if result.status in ("failed", "busy"):
            if os.environ.get("MILKIT_DEBUG") == "1" and result.exception is not None:
                traceback.print_exception(result.exception, file=sys.stderr)
            tqdm.write(result.error_line or f"error: {path}: failed", file=sys.stderr)
            exit_code = exit_code or result.error_code or 1
            return
        record = read_output_set(result.item.out_dir, result.item.stem, verify_hashes=False).record or {}
        outcome = _record_outcome(path, record)
        if not settings.quiet and result.status == "done":
            for warning in result.warnings:
                tqdm.write(f"warning: {path}: {one_line(warning)}", file=sys.stderr)
        text = json.dumps(to_jsonable(record)) if as_json else human_line(path, outcome)
        tqdm.write(text, file=sys.stdout)

    try:
        summary = run_cohort(inputs, settings.model_path, settings.out, executor=executor, job=job, shard=shard,
                             rerun=rerun, retry_failed=retry_failed, mirror=mirror, ray_options=ray_options,
                             progress=show_progress, on_result=on_result)
    except KeyboardInterrupt as exc:
        bar.close()
        _interrupted(exc)
    except Exception as exc:
        bar.close()
        return report_failure(exc, None)
    bar.close()
    if not settings.quiet:
        counts = summary.counts
        tqdm.write(f"cohort {settings.out}: {counts['done']} done, {counts['skipped']} skipped (done before), "
                   f"{counts['failed']} failed, {counts['busy']} busy elsewhere; table {summary.table}",
                   file=sys.stderr)
    return exit_code


@click.command(cls=OneLineCommand, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=False, type=click.Path(path_type=Path))
@click.option("--model", "-m", "model_path", required=False, type=click.Path(path_type=Path),
              help="Exported milkit MIL model (.onnx). Required, except with --status.")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Folder for the results, <input stem>.json each (created if missing).")
@click.option("--json", "as_json", is_flag=True, help="Print each result as one JSON line on stdout.")
@click.option("--device", type=DeviceType(), default="auto", show_default=True,
              help="onnxruntime provider: cuda when available (auto), or force one; cuda:N picks GPU N.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads.")
@click.option("--encoder", "encoder_path", type=click.Path(path_type=Path), default=None,
              help="Slides: tile encoder .onnx (default: the one the model names, next to the model).")
@click.option("--mpp", type=click.FloatRange(*PLAUSIBLE_MPP), default=None,
              help=f"Slides: level-0 microns per pixel, overriding the slide's own "
                   f"({PLAUSIBLE_MPP[0]}-{PLAUSIBLE_MPP[1]}).")
@click.option("--tissue-threshold", type=click.FloatRange(0, 1), default=None,
              help="Slides: minimum tissue fraction of a kept tile.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Slides: tiles per encoder run.")
@click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True,
              help="Slides: tile-reading threads.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars and no warnings on stderr.")
@click.option("--verify", is_flag=True,
              help="identify inputs by their sha256 instead of size and modification time, in the run key "
                   "(slower for large slides)")
@click.option("--outputs", "outputs", default=None, metavar="NAMES",
              help=f"Slides: what to write, comma-separated from {','.join(OUTPUT_NAMES)} (json is always "
                   f"written; default {','.join(DEFAULT_OUTPUTS)}, plus dicom for DICOM inputs).")
@click.option("--roi", type=click.Path(path_type=Path), default=None,
              help="Slides: restrict tiling to the polygons of a GeoJSON file (QuPath's annotation export), "
                   "or of <slide stem>.geojson in a folder; holes and multipolygons count.")
@click.option("--geojson-frame", type=click.Choice(["bounds", "level0"]), default="bounds", show_default=True,
              help="Slides: pixel frame of the tile GeoJSON and of --roi: bounds = QuPath's (level 0 minus "
                   "openslide.bounds-x/y), level0 = OpenSlide's.")
@click.option("--status", "status_out", type=click.Path(path_type=Path), default=None, metavar="OUT",
              help="Cohorts: count done, failed, pending, running and stale claims of the cohort in OUT (from "
                   "OUT/cohort.json and the records; opens no slide), print them and exit.")
@click.option("--cohort", "cohort_flag", is_flag=True,
              help="A cohort run (needs --out): resume (skip complete sets with this run's run key) and keep "
                   "records (OUT/cohort.json first, <stem>.failed.json per refusal, OUT/predictions.csv at the "
                   "end). Implied by more than one input, --shard, --retry-failed, --mirror, --executor ray, "
                   "--rerun with a cohort OUT, a SLURM array, and an OUT that already holds cohort.json.")
@click.option("--rerun", is_flag=True,
              help="Cohorts: redo every input (by default a complete set with this run's run key is skipped).")
@click.option("--retry-failed", is_flag=True,
              help="Cohorts: also retry the inputs that failed before (by default they are not retried).")
@click.option("--shard", default=None, metavar="K/N",
              help="Cohorts: process only share K of N (K = 0..N-1, by a hash of each input's path); default: "
                   "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT when set.")
@click.option("--mirror/--no-mirror", default=None,
              help="Cohorts: OUT mirrors the inputs' folders under their common root (default for a cohort "
                   "whose inputs come from more than one folder).")
@click.option("--executor", type=click.Choice(EXECUTORS), default="local", show_default=True,
              help="Cohorts: run the inputs in this process (local) or on Ray actors (ray, milkit[ray]).")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="--executor ray: the cluster to join (auto = a running one); default: start one here.")
@click.option("--ray-workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="--executor ray: actors, each loading the model and encoder once.")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0, show_default=True,
              help="--executor ray: GPUs per actor (Ray's num_gpus).")
@click.option("--max-retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="--executor ray: retries of a slide whose worker died (a refused input is never retried).")
@click.version_option(__version__, prog_name="milkit")
def main(inputs, model_path, out, as_json, device, threads, encoder_path, mpp, tissue_threshold, batch_size,
         workers, quiet, verify, outputs, roi, geojson_frame, status_out, cohort_flag, rerun, retry_failed, shard,
         mirror, executor, ray_address, ray_workers, gpus_per_worker, max_retries) -> None:
    """Predict INPUTS (slides, or CLAM/TRIDENT .h5 feature files) with an exported MIL model.

    INPUTS are paths or glob patterns ("slides/*.svs"); each input gets its own result.

    Prints one line per input (file, predicted class, probability), or JSON with --json.

    Cohort runs (--out with several inputs, --cohort or any cohort option) resume: an input whose output set is
    complete and has this run's run key is not run again (--rerun redoes it). They keep records in
    OUT, can be sharded over processes (--shard, SLURM arrays) and run on Ray (docs/cohort.md).
    """
    if status_out is not None:
        _print_status(status_out, as_json)
    if model_path is None:
        raise OneLineUsageError("Missing option '--model' / '-m'.")
    if not inputs:
        raise OneLineUsageError("Missing argument 'INPUTS...'.")
    try:
        shard_value = shard_from_env(shard) if (shard is not None or out is not None) else None
    except ValueError as exc:
        raise OneLineUsageError(str(exc)) from None
    cohort_asked = [name for name, given in (("--shard", shard is not None), ("--retry-failed", retry_failed),
                                             ("--mirror", mirror is True), ("--executor ray", executor == "ray"),
                                             ("--cohort", cohort_flag), ("--rerun", rerun)) if given]
    if out is None and cohort_asked:
        raise OneLineUsageError(f"{cohort_asked[0]} needs --out (the folder of the cohort's results)")
    try:
        parse_outputs(outputs)  # an unknown name is a usage error, before any model is loaded
    except InvalidInputError as exc:
        raise OneLineUsageError(str(exc)) from None
    settings = Settings(model_path=model_path, out=out, device=device, threads=threads, quiet=quiet,
                        encoder_path=encoder_path, mpp=mpp, tissue_threshold=tissue_threshold,
                        batch_size=batch_size, workers=workers, verify=verify, outputs=outputs, roi=roi,
                        geojson_frame=geojson_frame)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if out is not None:
        from mil_runtime.cohort.records import manifest_path

        cohort = any(name != "--rerun" for name in cohort_asked) or shard_value is not None \
            or manifest_path(out).is_file() or len(expand_inputs(inputs)) > 1  # several inputs: a cohort
        if cohort:
            ray_options = {"address": ray_address, "workers": ray_workers, "gpus_per_worker": gpus_per_worker,
                           "max_retries": max_retries} if executor == "ray" else None
            sys.exit(_run_cohort_cli(expand_inputs(inputs), settings, as_json=as_json, rerun=rerun,
                                     retry_failed=retry_failed, shard=shard_value, mirror=mirror, executor=executor,
                                     ray_options=ray_options))
    try:
        if out is not None:
            ensure_writable_dir(out)
            clean_stale_temps(out)  # temporaries of killed runs whose claim is gone or stale
        runner = load_model(model_path, device=device, threads=threads)
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    except Exception as exc:
        sys.exit(report_failure(exc, None))

    claimed: dict[str, Path] = {}
    exit_code = 0
    inputs = expand_inputs(inputs)
    show_progress = not quiet and len(inputs) > 1 and sys.stderr.isatty()
    for path in tqdm(inputs, unit="input", file=sys.stderr, disable=not show_progress):
        try:
            outcome = run_one(path, runner, settings, claimed)
        except KeyboardInterrupt as exc:
            _interrupted(exc)
        except Exception as exc:
            code = report_failure(exc, path)
            exit_code = exit_code or code
            continue
        if not quiet:
            for warning in outcome.warnings:
                tqdm.write(f"warning: {path}: {one_line(warning)}", file=sys.stderr)
        text = json.dumps(to_jsonable(outcome.result)) if as_json else human_line(path, outcome)
        tqdm.write(text, file=sys.stdout)
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
