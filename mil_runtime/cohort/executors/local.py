"""The local executor: one SlideWorker in this process, the items one after another, in order.

A refusal is the worker's "failed" result (recorded in <stem>.failed.json). An unexpected exception
on one item (a bug, a reader crashing on a strange file) is turned into a failure with exit code 1
and recorded the same way, so the other items still run; Ctrl-C and SIGTERM stop the run (claims
released, staged files removed, as for one input).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from mil_runtime.cohort.plan import CohortItem
from mil_runtime.cohort.worker import CohortJob, ItemResult, SlideWorker


def run_local(items: Iterable[CohortItem], job: CohortJob, *, rerun: bool = False, progress: bool = False,
              record_failures: bool = True, worker: SlideWorker | None = None) -> Iterator[ItemResult]:
    """Process `items` in order with one worker (loaded once, on the first item)."""
    from mil_runtime.cli import error_line
    from mil_runtime.cohort.records import write_failure

    for item in items:
        if worker is None:
            worker = SlideWorker(job, record_failures=record_failures)
        try:
            yield worker.process(item, rerun=rerun)
        except Exception as exc:  # not a refusal: reported as one, the rest go on
            line = error_line(exc, item.input)
            if record_failures:
                write_failure(item, 1, line, None)
            yield ItemResult(item, "failed", None, error_code=1, error_line=line, exception=exc)


__all__ = ["run_local"]
