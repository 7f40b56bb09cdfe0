"""The Ray executor: a cohort's slides run on Ray Core actors, one `SlideWorker` per actor.

    results = run_ray(items, job, rerun=False, progress=True, address="auto", workers=8, gpus_per_worker=1)

- Each actor builds one `SlideWorker(job)` (model and encoder sessions loaded once) and runs one slide at
  a time; the driver hands the next pending slide to whichever actor is free, so a slow slide holds up
  nobody and an actor that cannot be placed yet (no free CPU or GPU) simply joins later.
- `gpus_per_worker` is each actor's Ray `num_gpus`: Ray sets CUDA_VISIBLE_DEVICES per actor, so each
  actor sees its own GPU as cuda:0 (its device is the job's `cuda`/`auto`; a `cuda:N` is refused).
- Faults. An actor that dies mid-slide (killed, segfault, out of memory, node lost) is replaced by a
  fresh one and its slide is retried, up to `max_retries` times; the other slides go on meanwhile. An
  unexpected exception inside a slide is retried the same way. A slide that fails by itself (a
  MilkitError: bad file, no tissue, ...) comes back from the worker as "failed" and is never retried. A
  slide still failing after its retries is "failed" (exit code 1) with a line that says so, and its
  `<stem>.failed.json` is written, so `--retry-failed` finds it.
- The driver holds nothing a rerun needs: output sets, claims and failure records are the same files the
  local executor writes (DESIGN section 7), so a killed driver's cohort resumes with either executor.

On a cluster of several machines every node needs milkit (and its model, encoder and inputs at the same
paths, e.g. a shared file system) and OUT must be a folder all of them write (NFS works: claims carry a
heartbeat). Ray is imported only when this executor runs; it ships in the `milkit[ray]` extra.
Ray Core only (tasks and actors): Ray Data is not used.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from mil_runtime.cohort.plan import CohortItem
from mil_runtime.cohort.worker import CohortJob, ItemResult, SlideWorker
from mil_runtime.errors import DeviceError, MilkitError

RAY_EXTRA = "pip install 'milkit[ray]'"


class RayMissingError(MilkitError):
    """--executor ray without Ray installed."""


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RayMissingError(f"--executor ray needs Ray, which is not installed: {RAY_EXTRA} "
                              "(or use --executor local)") from None
    return ray


class SlideActor:
    """What one Ray actor holds: one SlideWorker (the model and encoder, loaded once)."""

    def __init__(self, job: CohortJob, worker_class: type = SlideWorker) -> None:
        self.pid, self.host = os.getpid(), socket.gethostname()
        self.init_error: BaseException | None = None
        try:
            self.worker = worker_class(job)
        except BaseException as exc:  # reported by ready(), where the driver sees its type and line
            self.worker, self.init_error = None, exc

    def ready(self) -> dict[str, Any]:
        if self.init_error is not None:
            raise self.init_error
        return {"pid": self.pid, "host": self.host}

    def process(self, item: CohortItem, rerun: bool) -> ItemResult:
        return self.worker.process(item, rerun=rerun)


def actor_options(*, gpus_per_worker: float = 0, cpus_per_worker: float = 1) -> dict[str, Any]:
    """Ray options of each actor. No Ray-side restarts or task retries: the driver replaces dead actors
    and counts each slide's retries itself (Ray's max_restarts would count per actor, not per slide)."""
    return {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker, "max_restarts": 0, "max_task_retries": 0}


def worker_job(job: CohortJob, *, gpus_per_worker: float, cpus_per_worker: float) -> CohortJob:
    """The job as an actor runs it: its own share of threads, and Ray's GPU placement."""
    changes: dict[str, Any] = {}
    if job.threads is None:  # onnxruntime would take every core of the node for each actor
        changes["threads"] = max(1, int(cpus_per_worker))
    if gpus_per_worker and str(job.device).startswith("cuda:") and str(job.device) != "cuda:0":
        raise DeviceError(f"--device {job.device} with --gpus-per-worker {gpus_per_worker:g}: Ray gives each "
                          "worker its own GPU (it sees it as cuda:0); use --device cuda or auto")
    if not gpus_per_worker and str(job.device).startswith("cuda"):
        raise DeviceError(f"--device {job.device} with --executor ray needs --gpus-per-worker (e.g. 1), so that "
                          "Ray places each worker on a GPU of its own")
    return dataclasses.replace(job, **changes) if changes else job


def _death_reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:300].rstrip(".")
    return f"{type(exc).__name__}: {text}"


def _exhausted(item: CohortItem, job: CohortJob, attempts: int, reason: str, died: bool) -> ItemResult:
    """The failure of a slide that used up its retries, recorded in `<stem>.failed.json` (its worker could
    not write it: it died)."""
    from mil_runtime.cohort.records import write_failure

    what = "its Ray worker died" if died else "it raised an unexpected error"
    line = (f"error: {item.input}: {what} on each of {attempts} attempts (last: {reason}); "
            "see the Ray logs (/tmp/ray/session_latest/logs on the worker's node), then rerun with --retry-failed")
    key = _run_key_or_none(item, job)
    write_failure(item, MilkitError.exit_code, line, key)
    _release_dead_claim(item)
    return ItemResult(item=item, status="failed", run_key=key, error_code=MilkitError.exit_code, error_line=line)


def _release_dead_claim(item: CohortItem) -> None:
    """Take over the dead worker's claim (and so remove its staged files) where this host can tell it is
    dead (same host); on another host it is left for the next run, which takes it over once stale."""
    from mil_runtime.claims import claim_stem

    try:
        with claim_stem(item.out_dir, item.stem):
            pass
    except MilkitError:
        pass


def _run_key_or_none(item: CohortItem, job: CohortJob) -> str | None:
    from mil_runtime.cohort.worker import expected_run_key, job_identity

    try:
        return expected_run_key(item, job, job_identity(job))
    except Exception:  # the model or input is unreadable here: the record says so without a key
        return None


def _init_ray(ray, address: str | None, init_options: dict[str, Any] | None) -> bool:
    """Connect (address) or start a local instance; True when this call started it (and must stop it)."""
    if ray.is_initialized():
        return False
    options = {"include_dashboard": False, "log_to_driver": True, **(init_options or {})}
    if address is not None:
        options["address"] = address
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
        where = f"join the Ray cluster at {address}" if address is not None else "start a local Ray instance"
        raise MilkitError(f"--executor ray: cannot {where}: {_death_reason(exc)}; start one with `ray start --head` "
                          "(then --ray-address auto), or use --executor local") from None
    return True


def run_ray(items: Sequence[CohortItem], job: CohortJob, *, rerun: bool = False, progress: bool = True,
            address: str | None = None, workers: int = 2, gpus_per_worker: float = 0, max_retries: int = 2,
            cpus_per_worker: float = 1, worker_class: type = SlideWorker,
            init_options: dict[str, Any] | None = None) -> Iterator[ItemResult]:
    """Run `items` on `workers` Ray actors; yields each slide's ItemResult as it finishes (any order).

    address: None starts a local Ray instance (unless this process is connected already), "auto" or
    "ray://host:port" joins a cluster. max_retries: further attempts for a slide whose actor died.
    cpus_per_worker: each actor's Ray num_cpus, and its onnxruntime threads when the job sets none.
    worker_class: a SlideWorker subclass importable on every node (tests, extensions).
    init_options: more keyword arguments of ray.init when this call starts or joins Ray.
    """
    items = list(items)
    if workers < 1:
        raise MilkitError(f"--ray-workers must be at least 1, got {workers}")
    if max_retries < 0:
        raise MilkitError(f"--max-retries must be 0 or more, got {max_retries}")
    actor_job = worker_job(job, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker)
    if not items:
        return
    ray = _import_ray()
    from ray.exceptions import RayError, RayTaskError

    started = _init_ray(ray, address, init_options)
    actors: dict[int, Any] = {}  # slot -> actor handle
    try:
        if gpus_per_worker:
            have = ray.cluster_resources().get("GPU", 0)
            if have < gpus_per_worker:
                raise DeviceError(f"--gpus-per-worker {gpus_per_worker:g}: the Ray cluster has {have:g} GPUs; "
                                  "start Ray on GPU nodes, or use --gpus-per-worker 0 for CPU workers")
        remote_actor = ray.remote(SlideActor).options(**actor_options(gpus_per_worker=gpus_per_worker,
                                                                      cpus_per_worker=cpus_per_worker))
        pending: deque[CohortItem] = deque(items)
        attempts: dict[CohortItem, int] = {}
        waiting_ready: dict[Any, int] = {}  # ready() ref -> slot
        in_flight: dict[Any, tuple[int, CohortItem]] = {}  # process() ref -> (slot, item)
        idle: deque[int] = deque()
        next_slot = 0
        load_deaths = 0  # actors that died before they were ready: bounded, or a crash on load loops forever

        def start_actor() -> None:
            nonlocal next_slot
            slot, next_slot = next_slot, next_slot + 1
            actors[slot] = remote_actor.remote(actor_job, worker_class)
            waiting_ready[actors[slot].ready.remote()] = slot

        def retire(slot: int) -> None:
            actor = actors.pop(slot, None)
            if actor is not None:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # already gone
                    pass

        def top_up() -> None:
            """Enough actors for the pending slides, at most `workers` (dead ones are replaced here)."""
            while pending and len(actors) < workers and len(waiting_ready) + len(idle) < len(pending):
                start_actor()

        bar = _progress_bar(len(items), progress)
        done = 0
        try:
            while done < len(items):
                top_up()
                while idle and pending:
                    slot, item = idle.popleft(), pending.popleft()
                    attempts[item] = attempts.get(item, 0) + 1
                    in_flight[actors[slot].process.remote(item, rerun)] = (slot, item)
                ready_refs, _ = ray.wait([*waiting_ready, *in_flight], num_returns=1)
                ref = ready_refs[0]
                if ref in waiting_ready:
                    slot = waiting_ready.pop(ref)
                    try:
                        ray.get(ref)
                    except RayTaskError as exc:  # the worker could not load the model or encoder: no slide can run
                        raise _cause(exc) from None
                    except RayError as exc:  # died while loading: top_up starts a fresh one
                        retire(slot)
                        load_deaths += 1
                        if load_deaths > max_retries + workers:
                            raise MilkitError(f"{load_deaths} Ray workers died while loading the model "
                                              f"{job.model_path} (last: {_death_reason(exc)}); see the Ray "
                                              "logs (/tmp/ray/session_latest/logs)") from None
                        continue
                    idle.append(slot)
                    continue
                slot, item = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except RayTaskError as exc:  # an exception inside the slide; the actor lives on
                    idle.append(slot)
                    cause = _cause(exc)
                    if isinstance(cause, MilkitError):  # raised by the slide itself: never retried
                        result = _refused(item, job, cause)
                    elif attempts[item] <= max_retries:
                        pending.appendleft(item)
                        continue
                    else:
                        result = _exhausted(item, job, attempts[item], _death_reason(cause), died=False)
                except RayError as exc:  # the actor died (killed, crashed, out of memory, node lost)
                    retire(slot)
                    if attempts[item] <= max_retries:
                        pending.appendleft(item)
                        continue
                    result = _exhausted(item, job, attempts[item], _death_reason(exc), died=True)
                else:
                    idle.append(slot)
                done += 1
                bar.update(1)
                yield result
        finally:
            bar.close()
    finally:
        for slot in list(actors):
            retire(slot)
        if started:
            ray.shutdown()


def _refused(item: CohortItem, job: CohortJob, exc: MilkitError) -> ItemResult:
    """A MilkitError that escaped the worker (it returns most as "failed" itself): recorded, not retried."""
    from mil_runtime.cli import error_line
    from mil_runtime.cohort.records import write_failure

    line, key = error_line(exc, item.input), _run_key_or_none(item, job)
    write_failure(item, exc.exit_code, line, key)
    return ItemResult(item=item, status="failed", run_key=key, error_code=exc.exit_code, error_line=line)


def _cause(exc: BaseException) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, progress: bool):
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="slide", file=sys.stderr, disable=not sys.stderr.isatty())


__all__ = ["RayMissingError", "SlideActor", "actor_options", "run_ray", "worker_job"]
