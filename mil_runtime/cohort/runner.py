"""`run_cohort`: many inputs into one OUT, resumable (DESIGN section 7's sets, run key and claims).

1. The inputs are planned (`plan_items`: mirrored layout when they come from several folders) and
   their list written to OUT/cohort.json (all inputs, before sharding) before anything runs.
2. `shard` (K, N) keeps this process's deterministic share.
3. Each item's state is read from the records, opening no slide: a complete set with this run's run
   key is skipped; a slide that failed with this run key is not retried unless `retry_failed`;
   `rerun` redoes everything. The rest goes to the executor (local or ray), whose workers check again
   under the slide's claim, so overlapping processes never process a slide twice.
4. OUT/predictions.csv is rebuilt from the per-slide records at the end.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mil_runtime.cohort.plan import CohortItem, plan_items
from mil_runtime.cohort.plan import shard as take_shard
from mil_runtime.cohort.worker import (CohortJob, ItemResult, JobIdentity, job_identity, prediction_of,
                                       release_stale_claim)
from mil_runtime.errors import InvalidInputError, OutputError

STATUSES = ("done", "skipped", "failed", "busy")


@dataclass
class CohortSummary:
    """What a cohort run did: one ItemResult per item of this process's share, in the order produced."""

    out: Path
    results: list[ItemResult] = field(default_factory=list)
    manifest: Path | None = None
    table: Path | None = None

    @property
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for result in self.results:
            counts[result.status] = counts.get(result.status, 0) + 1
        return counts

    @property
    def exit_code(self) -> int:
        """0 when no item failed or was busy, else the first such item's code."""
        for result in self.results:
            if result.status in ("failed", "busy"):
                return result.error_code or 1
        return 0


def _collisions(items: Sequence[CohortItem]) -> dict[int, str]:
    """{index: one-line error} for items whose set would overwrite an earlier item's (same folder and stem)."""
    seen: dict[tuple[str, str], CohortItem] = {}
    errors = {}
    for index, item in enumerate(items):
        where = (os.path.normcase(os.path.abspath(item.out_dir)), item.stem)
        if where in seen:
            errors[index] = (f"error: {item.input}: its result {item.stem}.json would overwrite the one of "
                             f"{seen[where].input}; rename one input (or use --mirror)")
        else:
            seen[where] = item
    return errors


def _prefilter(item: CohortItem, job: CohortJob, identity: JobIdentity, *, rerun: bool,
               retry_failed: bool) -> ItemResult | None:
    """The item's result from the records alone (skipped / failed before), or None: it must run."""
    if rerun:
        return None
    from mil_runtime.cohort.records import item_state

    state, record, key = item_state(item, job, identity)
    if state == "done":
        release_stale_claim(item)  # a writer killed after its last rename left its claim
        return ItemResult(item, "skipped", key, prediction=prediction_of(record))
    if state == "failed" and not retry_failed:
        return ItemResult(item, "failed", key, error_code=int(record.get("code") or 1), error_line=record.get("line"))
    return None


def iter_cohort(items: Sequence[CohortItem], job: CohortJob, identity: JobIdentity, *, executor: str = "local",
                rerun: bool = False, retry_failed: bool = False, ray_options: dict | None = None,
                progress: bool = False, record_failures: bool = True,
                worker: Any = None) -> Iterator[ItemResult]:
    """One result per item, in the order of `items` (those the records or a collision decide, and the
    executor's)."""
    decided: dict[int, ItemResult] = {}
    for index, line in _collisions(items).items():
        decided[index] = ItemResult(items[index], "failed", None, error_code=OutputError.exit_code, error_line=line)
    for index, item in enumerate(items):
        if index not in decided:
            result = _prefilter(item, job, identity, rerun=rerun, retry_failed=retry_failed)
            if result is not None:
                decided[index] = result
    todo = [(index, item) for index, item in enumerate(items) if index not in decided]
    if executor == "local":
        from mil_runtime.cohort.executors.local import run_local

        results = run_local([item for _, item in todo], job, rerun=rerun, progress=progress,
                            record_failures=record_failures, worker=worker)
    elif executor == "ray":
        from mil_runtime.cohort.executors.ray import run_ray

        results = run_ray([item for _, item in todo], job, rerun=rerun, progress=progress, **(ray_options or {}))
    else:
        raise InvalidInputError(f"unknown executor {executor!r}; use local or ray")
    ready = dict(decided)  # index -> result, released in input order
    waiting: dict[CohortItem, list[int]] = {}
    for index, item in todo:
        waiting.setdefault(item, []).append(index)
    next_index = 0
    for result in results:
        indices = waiting.get(result.item)
        if not indices:
            continue
        ready[indices.pop(0)] = result
        while next_index in ready:
            yield ready.pop(next_index)
            next_index += 1
    for index in sorted(ready):
        yield ready[index]


def run_cohort(inputs: Iterable[str | os.PathLike], model: str | os.PathLike | None, out: str | os.PathLike, *,
               executor: str = "local", job: CohortJob | None = None, shard: tuple[int, int] | None = None,
               rerun: bool = False, retry_failed: bool = False, mirror: bool | None = None,
               ray_options: dict | None = None, progress: bool = True, records: bool = True,
               on_result: Callable[[ItemResult], Any] | None = None) -> CohortSummary:
    """Run a cohort into `out` and return its summary (see the module's docstring).

    `model`: the MIL model (overrides `job.model_path` when both are given). `records=False` writes no
    cohort.json / failed.json / predictions.csv (plain `mil-infer --out`); `on_result` is called with
    each result as it comes (the CLI prints its lines there). Refusals of the whole run (model, OUT)
    raise the runtime's errors; refusals of one input are results.
    """
    from mil_runtime.atomic import ensure_writable_dir
    from mil_runtime.cohort.records import write_cohort_manifest, write_predictions_table

    out = Path(out)
    if job is None:
        if model is None:
            raise InvalidInputError("run_cohort needs a model (or a CohortJob)")
        job = CohortJob(model_path=Path(model))
    elif model is not None:
        job = dataclasses.replace(job, model_path=Path(model))
    ensure_writable_dir(out)
    from mil_runtime.claims import clean_stale_temps

    clean_stale_temps(out)
    worker = None
    if executor == "local":  # loads the model here, so a bad model or device fails before anything is written
        from mil_runtime.cohort.worker import SlideWorker

        worker = SlideWorker(job, record_failures=records)
        identity = worker.identity
    else:
        identity = job_identity(job)
    items = plan_items([Path(p) for p in inputs], out, mirror=mirror)
    summary = CohortSummary(out)
    if records:
        summary.manifest = write_cohort_manifest(out, items, job, identity)
    if shard is not None:
        items = take_shard(items, *shard)
    for folder in sorted({item.out_dir for item in items} - {out}):
        if folder.is_dir():
            clean_stale_temps(folder)
    try:
        for result in iter_cohort(items, job, identity, executor=executor, rerun=rerun, retry_failed=retry_failed,
                                  ray_options=ray_options, progress=progress, record_failures=records,
                                  worker=worker):
            summary.results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        if records:
            try:
                summary.table = write_predictions_table(out)
            except (OSError, OutputError):
                pass
    return summary


__all__ = ["CohortSummary", "iter_cohort", "run_cohort"]
