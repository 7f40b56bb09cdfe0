"""Executors run a cohort's pending items and yield an ItemResult for each: `local` (this process, in
order) and `ray` (Ray Core actors, mil_runtime.cohort.executors.ray, the milkit[ray] extra)."""

EXECUTORS = ("local", "ray")

__all__ = ["EXECUTORS"]
