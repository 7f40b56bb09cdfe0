"""A cohort's own records, besides each slide's output set (DESIGN section 7, reused as it is):

- `OUT/cohort.json`: the cohort's inputs (all of them, before sharding, so every shard writes the same
  list), where each one's set goes, the model's and encoder's sha256 and the run's settings; written
  atomically before the run starts.
- `<stem>.failed.json` beside a slide's set: the refusal of its last run (code, one-line message, run
  key, input, time), so `--retry-failed` knows it; removed when the slide succeeds.
- `OUT/predictions.csv`: one row per input of cohort.json, rebuilt from the per-slide records after the
  run and written atomically, so it is never half-written.

`cohort_status(OUT)` counts done / failed / pending / stale claims from these records and the sets'
own records; it opens no slide (the run key is computed from the input's size and mtime, or its
sha256 under --verify, as the run computes it).
"""

from __future__ import annotations

import csv
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mil_runtime.atomic import atomic_write
from mil_runtime.claims import claim_stem
from mil_runtime.cohort.plan import CohortItem
from mil_runtime.cohort.worker import CohortJob, JobIdentity, expected_run_key, job_identity, prediction_of
from mil_runtime.errors import InputNotFoundError, InvalidInputError, MilkitError, OutputBusyError

MANIFEST_NAME = "cohort.json"
MANIFEST_STEM = "cohort"  # a reserved stem in OUT: no slide's set may be named so (plan_items refuses it)
TABLE_NAME = "predictions.csv"
RECORD_WAIT_S = 60.0  # how long a process waits for another one writing the cohort's records
FAILED_SUFFIX = ".failed.json"
MANIFEST_VERSION = 1


def manifest_path(out: str | os.PathLike) -> Path:
    return Path(out) / MANIFEST_NAME


def failure_path(item: CohortItem) -> Path:
    return Path(item.out_dir) / f"{item.stem}{FAILED_SUFFIX}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@contextmanager
def cohort_records_claim(out: Path) -> Iterator[None]:
    """Hold OUT/cohort.lock while writing cohort.json or predictions.csv.

    Overlapping processes on one OUT write these files too, and each one's start-up clean-up removes
    the temporaries of stems whose claim is free; `.cohort.json.*.tmp` is stem "cohort"'s, so without
    the claim one process's clean-up could remove the manifest another is committing. The writes take
    milliseconds, so a process that finds the claim held waits for it.
    """
    deadline = time.monotonic() + RECORD_WAIT_S
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(claim_stem(out, MANIFEST_STEM))
                break
            except OutputBusyError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# -- <stem>.failed.json ------------------------------------------------------------------------
def write_failure(item: CohortItem, code: int, line: str, run_key: str | None) -> Path | None:
    """Record a refusal atomically; None when the folder cannot be written (the run reports it anyway)."""
    path = failure_path(item)
    document = {"code": int(code), "line": line, "run_key": run_key, "input": str(item.input), "time": _now(),
                "host": socket.gethostname(), "pid": os.getpid()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
    except (OSError, MilkitError):
        return None
    return path


def read_failure(item: CohortItem) -> dict | None:
    try:
        document = json.loads(failure_path(item).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def remove_failure(item: CohortItem) -> None:
    try:
        failure_path(item).unlink()
    except FileNotFoundError:
        pass


# -- OUT/cohort.json ---------------------------------------------------------------------------
def write_cohort_manifest(out: Path, items: Iterable[CohortItem], job: CohortJob,
                          identity: JobIdentity | None = None) -> Path:
    """OUT/cohort.json: the inputs, their sets' folders (relative to OUT), the model and the settings."""
    out = Path(out)
    identity = job_identity(job) if identity is None else identity
    document = {
        "milkit_cohort": MANIFEST_VERSION,
        "written": _now(),
        "model": {"path": str(job.model_path), "sha256": identity.model_sha256},
        "encoder": {"path": str(identity.encoder_path) if identity.encoder_path else None,
                    "sha256": identity.encoder_sha256, "error": identity.encoder_error,
                    "error_code": identity.encoder_error_code},
        "job": _jsonable(asdict(job)),
        "items": [{"input": str(item.input), "out_dir": os.path.relpath(item.out_dir, out), "stem": item.stem}
                  for item in items],
    }
    path = manifest_path(out)
    out.mkdir(parents=True, exist_ok=True)
    with cohort_records_claim(out), atomic_write(path) as handle:
        json.dump(document, handle, indent=1)
        handle.write("\n")
    return path


def read_cohort_manifest(out: Path) -> tuple[list[CohortItem], CohortJob, JobIdentity]:
    """The items, job and identity cohort.json records. InputNotFoundError / InvalidInputError otherwise."""
    out = Path(out)
    path = manifest_path(out)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputNotFoundError(f"{path}: no cohort record here; give the --out folder of a cohort run "
                                 "(it writes cohort.json before it starts)") from None
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: unreadable cohort record ({exc}); rerun the cohort to rewrite it") from None
    try:
        items = [CohortItem(Path(entry["input"]), Path(os.path.normpath(out / entry["out_dir"])), entry["stem"])
                 for entry in document["items"]]
        fields = dict(document["job"])
        for name in ("model_path", "encoder_path", "roi"):
            if fields.get(name) is not None:
                fields[name] = Path(fields[name])
        job = CohortJob(**fields)
        encoder = document.get("encoder") or {}
        identity = JobIdentity(document["model"]["sha256"], encoder.get("sha256"),
                               Path(encoder["path"]) if encoder.get("path") else None,
                               encoder.get("error"), encoder.get("error_code"))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"{path}: not a milkit cohort record ({type(exc).__name__}: {exc}); "
                                "rerun the cohort to rewrite it") from None
    return items, job, identity


# -- the state of one item, from the records -----------------------------------------------------
def item_state(item: CohortItem, job: CohortJob, identity: JobIdentity, *,
               verify_hashes: bool = True) -> tuple[str, dict | None, str | None]:
    """("done", the set's record, key) | ("failed", the failure record, key) | ("pending", None, key).

    verify_hashes=False trusts the record's list of files without reading them (status and the table:
    resume, which decides what is redone, checks every hash).
    """
    from mil_runtime.outputs.record import read_output_set

    try:
        key = expected_run_key(item, job, identity)
    except MilkitError:
        key = None
    if key is not None:
        found = read_output_set(item.out_dir, item.stem, verify_hashes=verify_hashes)
        if found.complete and found.run_key == key:
            return "done", found.record, key
    failure = read_failure(item)
    if failure is not None and failure.get("run_key") == key:
        return "failed", failure, key
    return "pending", None, key


def claim_state(item: CohortItem) -> str | None:
    """"live" / "stale" for the item's <stem>.lock, None when there is none."""
    from mil_runtime.claims import is_stale, lock_path, read_claim

    path = lock_path(item.out_dir, item.stem)
    if not path.exists():
        return None
    return "stale" if is_stale(path, read_claim(path)) else "live"


def cohort_status(out: Path) -> dict[str, int]:
    """Counts of the cohort in OUT: total, done, failed, pending, running (live claims), stale_claims."""
    items, job, identity = read_cohort_manifest(out)
    counts = {"total": len(items), "done": 0, "failed": 0, "pending": 0, "running": 0, "stale_claims": 0}
    for item in items:
        state, _, _ = item_state(item, job, identity, verify_hashes=False)
        counts[state] += 1
        claim = claim_state(item)
        if claim == "live":
            counts["running"] += 1
        elif claim == "stale":
            counts["stale_claims"] += 1
    return counts


# -- OUT/predictions.csv -----------------------------------------------------------------------
def write_predictions_table(out: Path) -> Path:
    """OUT/predictions.csv, one row per input of cohort.json, from the per-slide records (atomic)."""
    out = Path(out)
    items, job, identity = read_cohort_manifest(out)
    rows = []
    classes: dict[str, None] = {}
    task_columns: dict[str, None] = {}  # risk, value_<target>: regression and survival models
    for item in items:
        state, record, _ = item_state(item, job, identity, verify_hashes=False)
        row: dict[str, Any] = {"input": str(item.input), "stem": item.stem, "status": state}
        if state == "done":
            prediction = prediction_of(record) or {}
            probabilities = prediction.get("probabilities") or {}
            classes.update(dict.fromkeys(probabilities))
            task_values = prediction.get("task_values") or {}
            task_columns.update(dict.fromkeys(task_values))
            files = sorted(((record or {}).get("output_set") or {}).get("files") or {})
            row.update(class_name=prediction.get("class_name"), n_tiles=prediction.get("n_tiles"),
                       probabilities=probabilities, **task_values,
                       record=os.path.relpath(Path(item.out_dir) / f"{item.stem}.json", out),
                       outputs=";".join(os.path.relpath(Path(item.out_dir) / name, out) for name in files))
        elif state == "failed":
            row.update(error_code=(record or {}).get("code"), error_line=(record or {}).get("line"))
        rows.append(row)
    columns = ["input", "stem", "status", "class_name", *[f"p_{name}" for name in classes], *task_columns, "n_tiles",
               "error_code", "error_line", "record", "outputs"]
    path = out / TABLE_NAME
    with cohort_records_claim(out), atomic_write(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            probabilities = row.pop("probabilities", {}) or {}
            row.update({f"p_{name}": value for name, value in probabilities.items()})
            writer.writerow({name: ("" if row.get(name) is None else row.get(name)) for name in columns})
    return path


__all__ = ["FAILED_SUFFIX", "MANIFEST_NAME", "MANIFEST_STEM", "TABLE_NAME", "claim_state", "cohort_records_claim",
           "cohort_status", "failure_path",
           "item_state", "manifest_path", "read_cohort_manifest", "read_failure", "remove_failure",
           "write_cohort_manifest", "write_failure", "write_predictions_table"]
