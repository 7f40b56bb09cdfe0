"""Cohorts: many inputs into one OUT, resumable, shardable, on the local executor or Ray.

    from mil_runtime.cohort import run_cohort
    summary = run_cohort(["slides/a.svs", "slides/b.svs"], "model.onnx", "out/")

See docs/cohort.md. Nothing here imports torch.
"""

from mil_runtime.cohort.plan import CohortItem, plan_items, shard, shard_from_env
from mil_runtime.cohort.worker import CohortJob, ItemResult, SlideWorker


def __getattr__(name):  # the runner (and its executors) only when asked for
    if name in ("run_cohort", "CohortSummary"):
        from mil_runtime.cohort import runner

        return getattr(runner, name)
    raise AttributeError(name)


__all__ = ["CohortItem", "CohortJob", "CohortSummary", "ItemResult", "SlideWorker", "plan_items", "run_cohort",
           "shard", "shard_from_env"]
