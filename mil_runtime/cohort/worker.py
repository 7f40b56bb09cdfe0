"""One cohort worker: loads the model and the encoder once, then processes items one by one.

For each item (`SlideWorker.process`):
1. the run key this run would record is computed without opening the slide (`expected_run_key`);
2. a complete set (`read_output_set`: files unchanged since hashed, or hashed again; all hashed under
   --verify) with that run key is skipped;
3. otherwise the stem is claimed (`<stem>.lock`, mil_runtime.claims) and checked again under the claim
   (another process may have finished it meanwhile: a slide is never processed twice); a live claim
   elsewhere gives "busy" (that process does it);
4. the input runs through mil-infer's own route (`mil_runtime.cli.infer_input`), which writes the set;
5. a refusal (a MilkitError: bad file, no tissue, ...) is recorded as `<stem>.failed.json` (code, line,
   run key, input, time; written atomically) and returned as "failed", never retried here; success
   removes an earlier `<stem>.failed.json`. Any other exception propagates, so an engine (Ray) can
   retry the slide of a crashed worker; the local executor turns it into a failure.

Everything here is picklable or built from `CohortJob`, which is (Ray ships it). No torch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mil_runtime.cohort.plan import CohortItem
from mil_runtime.errors import InputNotFoundError, MilkitError, OutputBusyError

FEATURE_SUFFIXES = (".h5", ".hdf5")


@dataclass(frozen=True)
class CohortJob:
    """Everything a worker needs (mil-infer's per-run settings), picklable."""

    model_path: Path
    encoder_path: Path | None = None
    device: str = "auto"
    threads: int | None = None
    mpp: float | None = None
    tissue_threshold: float | None = None
    outputs: str | None = None  # --outputs as given, None = the default set
    roi: Path | None = None
    geojson_frame: str = "bounds"
    batch_size: int = 64
    workers: int = 4
    verify: bool = False


@dataclass
class ItemResult:
    """What became of one item."""

    item: CohortItem
    status: str  # "done" | "skipped" (complete set, same run key) | "failed" | "busy" (live claim elsewhere)
    run_key: str | None
    error_code: int | None = None
    error_line: str | None = None
    prediction: dict | None = None  # {"class_name", "probabilities", "n_tiles"} for the table
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    exception: BaseException | None = field(default=None, repr=False, compare=False)  # for MILKIT_DEBUG


@dataclass(frozen=True)
class JobIdentity:
    """The model's and the encoder's sha256 (what the run key needs besides the input and settings)."""

    model_sha256: str
    encoder_sha256: str | None  # None: no encoder found (feature files need none)
    encoder_path: Path | None
    encoder_error: str | None = None  # why no encoder was found (slides then fail with it)
    encoder_error_code: int | None = None


def is_feature_file(path: Path) -> bool:
    return Path(path).suffix.lower() in FEATURE_SUFFIXES


def job_identity(job: CohortJob, metadata: Any = None) -> JobIdentity:
    """sha256 of the model and of the encoder mil-infer would use (found as mil-infer finds it).

    `metadata`: the model's ModelMetadata when already loaded; else it is read from the file (CPU session).
    """
    from mil_runtime.encoder import find_encoder
    from mil_runtime.session import file_identity, sha256_file

    if metadata is None:
        from mil_runtime.model import load_model

        metadata = load_model(job.model_path, device="cpu", threads=1).metadata
    model_sha = sha256_file(job.model_path)
    try:
        encoder_path = find_encoder(job.model_path, metadata, job.encoder_path)
    except MilkitError as exc:
        return JobIdentity(model_sha, None, None, str(exc), exc.exit_code)
    return JobIdentity(model_sha, file_identity(encoder_path), Path(encoder_path))


def _feature_file_encoder_sha256(path: Path) -> str | None:
    """The encoder sha256 a feature file records (its root attribute), as the result records it."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            value = h5.attrs.get("encoder_sha256")
    except OSError:
        return None  # unreadable: the run itself says why
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value) if value else None


def slide_outputs(item_input: Path, outputs: str | None) -> list[str]:
    """The output names a slide's set will hold (mil_runtime.pipeline's choice, dicom for DICOM inputs)."""
    from mil_runtime.outputs.writer import DEFAULT_OUTPUTS, parse_outputs
    from mil_runtime.slide.dicom import is_dicom_input

    chosen = parse_outputs(outputs)
    if outputs is None and is_dicom_input(item_input):
        import importlib.util

        if importlib.util.find_spec("highdicom") is not None:  # = pipeline._dicom_extra_installed, without
            # importing the pipeline (and openslide) here: --status must not
            chosen = parse_outputs([*DEFAULT_OUTPUTS, "dicom"])
    return list(chosen)


def expected_run_key(item: CohortItem, job: CohortJob, identity: JobIdentity) -> str:
    """The run key a run of `job` on `item` records, computed without opening the slide.

    Raises InputNotFoundError (input or --roi file missing) or the encoder's error for slides.
    """
    from mil_runtime.run_key import compute_run_key, file_sha256, run_settings

    path = Path(item.input)
    if not path.exists():
        raise InputNotFoundError(f"{path}: input not found")
    if is_feature_file(path):
        return compute_run_key(path, model_sha256=identity.model_sha256,
                               encoder_sha256=_feature_file_encoder_sha256(path), settings=run_settings(),
                               verify=job.verify)
    if identity.encoder_sha256 is None:
        error = InputNotFoundError(identity.encoder_error or "no encoder found; pass --encoder PATH")
        error.exit_code = identity.encoder_error_code or InputNotFoundError.exit_code
        raise error
    from mil_runtime.slide.regions import find_roi_file
    from mil_runtime.slide.tissue import TISSUE_THRESHOLD

    roi_sha = file_sha256(find_roi_file(job.roi, path)) if job.roi is not None else None
    settings = run_settings(
        mpp_override=job.mpp,
        tissue_threshold=TISSUE_THRESHOLD if job.tissue_threshold is None else job.tissue_threshold,
        roi_sha256=roi_sha, roi_frame=job.geojson_frame if roi_sha is not None else None,
        outputs=slide_outputs(path, job.outputs), geojson_frame=job.geojson_frame)
    return compute_run_key(path, model_sha256=identity.model_sha256, encoder_sha256=identity.encoder_sha256,
                           settings=settings, verify=job.verify)


def release_stale_claim(item: CohortItem) -> None:
    """Remove a dead writer's claim (and its temporaries) beside a set that is skipped; a live one stays."""
    from mil_runtime.claims import claim_stem, is_stale, lock_path, read_claim

    path = lock_path(item.out_dir, item.stem)
    if not path.exists() or not is_stale(path, read_claim(path)):
        return
    try:
        with claim_stem(item.out_dir, item.stem):
            pass  # taking the claim over removes the leftovers; leaving it removes the lock
    except MilkitError:
        pass


def prediction_of(record: dict | None) -> dict | None:
    """{"class_name", "probabilities", "n_tiles", "task_values"} of a result document, for the cohort
    table; task_values: a survival model's {"risk"}, a regression model's {"value_<target>": value}."""
    if not isinstance(record, dict):
        return None
    prediction = record.get("prediction") or {}
    task_values: dict = {}
    if "risk" in prediction:
        task_values["risk"] = prediction["risk"]
    for name, value in (prediction.get("values") or {}).items():
        task_values[f"value_{name}"] = value
    return {"class_name": prediction.get("class_name"),
            "probabilities": dict(record.get("probabilities") or {}),
            "n_tiles": record.get("n_instances"), "task_values": task_values}


class SlideWorker:
    """Loads the model (and, on the first slide, the encoder) once; processes items one at a time."""

    def __init__(self, job: CohortJob, *, record_failures: bool = True):
        from mil_runtime.model import load_model

        self.job = job
        self.record_failures = record_failures  # False: plain `mil-infer --out` (no cohort records)
        self.runner = load_model(job.model_path, device=job.device, threads=job.threads)
        self.identity = job_identity(job, self.runner.metadata)
        self._encoder = None

    def expected_run_key(self, item: CohortItem) -> str:
        """The run key this worker would record for `item` (no slide opened)."""
        return expected_run_key(item, self.job, self.identity)

    def _settings(self, item: CohortItem):
        from mil_runtime.cli import Settings

        job = self.job
        settings = Settings(model_path=Path(job.model_path), out=Path(item.out_dir), device=job.device,
                            threads=job.threads, quiet=True, encoder_path=job.encoder_path, mpp=job.mpp,
                            tissue_threshold=job.tissue_threshold, batch_size=job.batch_size, workers=job.workers,
                            verify=job.verify, outputs=job.outputs, roi=job.roi, geojson_frame=job.geojson_frame)
        settings._encoder = self._encoder
        return settings

    def _complete(self, item: CohortItem, key: str):
        from mil_runtime.outputs.record import read_output_set

        found = read_output_set(item.out_dir, item.stem, trust_stat=not self.job.verify)  # --verify: hash every file
        return found if found.complete and found.run_key == key else None

    def process(self, item: CohortItem, *, rerun: bool = False) -> ItemResult:
        """Skip, run or record the failure of one item (see the module's docstring)."""
        from mil_runtime.atomic import ensure_writable_dir
        from mil_runtime.claims import claim_stem
        from mil_runtime.cli import error_line, infer_input
        from mil_runtime.cohort.records import remove_failure, write_failure

        started = time.perf_counter()

        def result(status: str, key: str | None, **fields) -> ItemResult:
            return ItemResult(item, status, key, seconds=time.perf_counter() - started, **fields)

        def failed(exc: MilkitError, key: str | None) -> ItemResult:
            line = error_line(exc, item.input)
            if self.record_failures:
                write_failure(item, exc.exit_code, line, key)
            return result("failed", key, error_code=exc.exit_code, error_line=line, exception=exc)

        try:
            key = self.expected_run_key(item)
        except MilkitError:  # input or --roi missing, no encoder: the run below says so in its own words
            key = None
        if not rerun and key is not None and (found := self._complete(item, key)) is not None:
            release_stale_claim(item)
            return result("skipped", key, prediction=prediction_of(found.record))
        try:
            ensure_writable_dir(item.out_dir)
            with claim_stem(item.out_dir, item.stem):
                if not rerun and key is not None and (found := self._complete(item, key)) is not None:  # done meanwhile
                    return result("skipped", key, prediction=prediction_of(found.record))
                settings = self._settings(item)
                try:
                    outcome = infer_input(Path(item.input), self.runner, settings)
                except MilkitError as exc:
                    self._encoder = settings._encoder
                    return failed(exc, key)
                self._encoder = settings._encoder
                remove_failure(item)
                return result("done", key, prediction=prediction_of(outcome.result), warnings=list(outcome.warnings))
        except OutputBusyError as exc:
            return result("busy", key, error_code=exc.exit_code, error_line=error_line(exc, item.input), exception=exc)
        except MilkitError as exc:  # the folder cannot be written: recorded where possible
            return failed(exc, key)


__all__ = ["CohortJob", "ItemResult", "JobIdentity", "SlideWorker", "expected_run_key", "job_identity",
           "prediction_of", "release_stale_claim", "slide_outputs"]
