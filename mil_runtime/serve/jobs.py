"""Jobs: handles -> computations keyed by the run key (DESIGN section 7).

Every POST /v1/jobs gets its own handle. The handle points at a computation identified by the run key
of (slide identity, model, encoder, settings): a finished one (in memory, or a complete set under
STATE/results/<run key>) answers at once; a queued or running one is joined; otherwise a new one is
queued. DELETE cancels one handle; the computation stops (at its next progress call, before anything
is written) only when no handle wants it any more. The queue is bounded: more than `max_jobs` queued
or running computations answer 503 with Retry-After. `workers` job processes (mil_runtime.serve.worker,
spawned on first use, at CPU niceness `job_nice`) run computations, each loading a model and encoder
file once; a dispatcher thread per process relays its progress and forwards cancels.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mil_runtime.errors import InvalidInputError
from mil_runtime.serve.errors import ApiError, one_line
from mil_runtime.serve.models import ModelEntry
from mil_runtime.serve.store import Store

log = logging.getLogger("mil_runtime.serve")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)
RETRY_AFTER_S = 5
def job_outputs(slide_path: Path) -> tuple[str, ...]:
    """What a job writes: mil-infer's default set for the slide (with the DICOM objects for a DICOM input,
    mil_runtime.pipeline.default_outputs) plus the Digital Slide Archive annotation, so that every viewer's
    file can be fetched from a finished job."""
    from mil_runtime.outputs.writer import parse_outputs
    from mil_runtime.pipeline import default_outputs

    return parse_outputs([*default_outputs(slide_path), "dsa"])


GEOJSON_FRAME = "level0"  # the service speaks level-0 px everywhere (ROI in, GeoJSON out, /at, /top)
RESTARTED = "the server stopped while this job was queued or running; nothing of it was kept: submit it again"


@dataclass
class Computation:
    key: str
    slide_path: Path | None
    stem: str
    folder: Path
    model_id: str
    roi_path: Path | None = None
    state: str = QUEUED
    stage: str = "queued"
    done: int = 0
    total: int = 0
    error: dict | None = None
    wanters: set = field(default_factory=set)
    cancel: threading.Event = field(default_factory=threading.Event)
    changed: float = field(default_factory=time.monotonic)
    external: bool = False  # a --results set: never run, never removed


@dataclass
class Handle:
    id: str
    comp: Computation
    slide: str
    model: str
    cancelled: bool = False
    created: float = field(default_factory=time.time)
    own_error: dict | None = None  # restart: the handle failed, whatever its key's computation does now

    @property
    def state(self) -> str:
        if self.cancelled:
            return CANCELLED
        if self.own_error is not None:
            return FAILED
        return self.comp.state

    @property
    def error(self) -> dict | None:
        return self.own_error if self.own_error is not None else (self.comp.error if not self.cancelled else None)


JOB_NICE = 10  # job processes yield the CPU to tile requests


class WorkerProcess:
    """One job process (`python -m mil_runtime.serve.worker`), started on first use, restarted if it dies."""

    def __init__(self, nice: int) -> None:
        import subprocess
        import sys

        self.process = subprocess.Popen([sys.executable, "-m", "mil_runtime.serve.worker", str(int(nice))],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self._pending_preload = False
        self._buffer = b""

    def _send(self, message: dict) -> None:
        self.process.stdin.write((json.dumps(message) + "\n").encode())
        self.process.stdin.flush()

    def _receive(self, timeout: float) -> dict | None:
        """The next message, or None when none came within `timeout` s; EOFError when the process is gone."""
        import select

        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self.process.stdout], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self.process.stdout.fileno(), 1 << 16)
            if not chunk:
                raise EOFError
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def preload(self, pairs: list[tuple[str, str]], device: str) -> None:
        """Load these (model, encoder) files in the process before its first job (answer read by run)."""
        self._send({"preload": pairs, "device": device})
        self._pending_preload = True

    def alive(self) -> bool:
        return self.process.poll() is None

    def run(self, task: dict, comp: "Computation") -> dict:
        """Send one task and relay its progress into `comp` until it ends; the final message."""
        try:
            while self._pending_preload:
                message = self._receive(1.0)
                if message is None and not self.alive():
                    raise EOFError
                self._pending_preload = message is None or message.get("kind") != "loaded"
            self._send({"task": task})
            cancelled = False
            while True:
                if comp.cancel.is_set() and not cancelled:
                    self._send({"cancel": True})
                    cancelled = True
                message = self._receive(0.1)
                if message is None:
                    if not self.alive():
                        raise EOFError
                    continue
                if message.get("kind") != "progress":
                    return message
                comp.stage, comp.done, comp.total = message["stage"], message["done"], message["total"]
                comp.changed = time.monotonic()
        except (EOFError, OSError, ValueError):
            return {"kind": "failed", "code": 1,
                    "line": f"the job process stopped (exit code {self.process.poll()}); submit the job again"}

    def stop(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=5)
        except Exception:  # noqa: BLE001
            self.process.kill()
            self.process.wait(timeout=5)


class JobManager:
    def __init__(self, store: Store, models: dict[str, ModelEntry], *, max_jobs: int = 8, workers: int = 1,
                 tile_workers: int = 2, job_nice: int = JOB_NICE, device: str = "auto") -> None:
        self.store, self.models = store, models
        self.max_jobs, self.tile_workers = max(1, int(max_jobs)), tile_workers
        self.job_nice = int(job_nice)
        self.device = device
        self.batch_size = 64
        self.test_delay_s = 0.0  # tests: every encoder batch sleeps this long in the worker
        self.runs = 0  # computations handed to a worker
        self._processes: list[WorkerProcess] = []  # tiles per encoder batch, hence per progress report and cancel check
        self.handles: dict[str, Handle] = {}
        self.comps: dict[str, Computation] = {}
        self.lock = threading.RLock()
        self.queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(i,), name=f"mil-serve-worker-{i}", daemon=True)
                         for i in range(max(1, int(workers)))]
        self._workers: list[WorkerProcess | None] = [None] * len(self._threads)
        self._restore()
        for thread in self._threads:
            thread.start()

    # -- submitting ---------------------------------------------------------------------------
    def run_key(self, slide_path: Path, model: ModelEntry, roi_path: Path | None) -> str:
        from mil_runtime.run_key import compute_run_key, file_sha256, run_settings
        from mil_runtime.slide.tissue import TISSUE_THRESHOLD

        roi_sha = file_sha256(roi_path) if roi_path is not None else None
        settings = run_settings(mpp_override=None, tissue_threshold=TISSUE_THRESHOLD, roi_sha256=roi_sha,
                                roi_frame=GEOJSON_FRAME if roi_sha else None, outputs=list(job_outputs(slide_path)),
                                geojson_frame=GEOJSON_FRAME)
        return compute_run_key(slide_path, model_sha256=model.sha256, encoder_sha256=model.encoder.sha256,
                               settings=settings)

    def save_roi(self, roi: Any) -> Path:
        import hashlib

        from mil_runtime.slide.regions import read_regions

        if not isinstance(roi, (dict, list)):
            raise ApiError(400, "roi must be a GeoJSON Feature, FeatureCollection or Polygon", 6)
        data = json.dumps(roi, sort_keys=True, separators=(",", ":")).encode()
        path = self.store.rois / f"{hashlib.sha256(data).hexdigest()}.geojson"
        if not path.exists():
            from mil_runtime.atomic import atomic_write

            with atomic_write(path, "wb") as handle:
                handle.write(data)
        read_regions(path, GEOJSON_FRAME)  # refuse a region file with no polygon now, not in the worker
        return path

    def submit(self, slide_rel: str, slide_path: Path, model_id: str, roi: Any = None) -> Handle:
        model = self.models.get(model_id)
        if model is None:
            raise ApiError(404, f"no model {model_id!r}; GET /v1/models lists them", 3)
        model.require_encoder()
        roi_path = self.save_roi(roi) if roi is not None else None
        key = self.run_key(slide_path, model, roi_path)
        with self.lock:
            comp = self.comps.get(key)
            if comp is None or comp.state in (FAILED, CANCELLED):
                folder = self.store.result_folder(key)
                stem = slide_path.stem
                if self.store.complete(folder, stem, key) is not None:
                    comp = Computation(key, slide_path, stem, folder, model_id, roi_path, state=DONE, stage="done")
                else:
                    if self.active_count() >= self.max_jobs:
                        raise ApiError(503, f"the job queue is full ({self.max_jobs} jobs queued or running); "
                                            f"retry in {RETRY_AFTER_S} s", 0, {"Retry-After": str(RETRY_AFTER_S)})
                    comp = Computation(key, slide_path, stem, folder, model_id, roi_path)
                    self.queue.put(comp)
                self.comps[key] = comp
            handle = Handle(secrets.token_hex(8), comp, slide_rel, model_id)
            if comp.state in ACTIVE:
                comp.wanters.add(handle.id)
            self.handles[handle.id] = handle
            self._save()
        return handle

    def active_count(self) -> int:
        return sum(1 for c in self.comps.values() if c.state in ACTIVE)

    def get(self, job_id: str) -> Handle:
        handle = self.handles.get(job_id)
        if handle is None:
            raise ApiError(404, f"no job {job_id!r}")
        return handle

    def cancel(self, job_id: str) -> None:
        with self.lock:
            handle = self.get(job_id)
            if handle.state in ACTIVE:
                handle.cancelled = True
                comp = handle.comp
                comp.wanters.discard(handle.id)
                if not comp.wanters:
                    comp.cancel.set()
                    if comp.state == QUEUED:
                        self._finish(comp, CANCELLED, "cancelled")
            self._save()

    # -- running ------------------------------------------------------------------------------
    def prestart(self) -> None:
        """Start every job process now and load the models into it (mil-serve does; create_app alone
        starts them at the first job)."""
        preload = [(str(m.path), str(m.encoder.path)) for m in self.models.values() if m.encoder is not None]
        with self.lock:
            for i, process in enumerate(self._workers):
                if process is None or not process.alive():
                    self._workers[i] = WorkerProcess(self.job_nice)
                    self._processes.append(self._workers[i])
                    self._workers[i].preload(preload, self.device)

    def _work(self, index: int) -> None:
        """One dispatcher thread per worker process: hand it a computation, relay its messages."""
        while not self._stop.is_set():
            try:
                comp = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            with self.lock:
                if comp.state != QUEUED or comp.cancel.is_set():
                    continue
                comp.state, comp.stage, comp.changed = RUNNING, "starting", time.monotonic()
            with self.lock:
                process = self._workers[index]
                if process is None or not process.alive():
                    process = self._workers[index] = WorkerProcess(self.job_nice)
                    self._processes.append(process)
            self.runs += 1
            self._run(comp, process)

    def _task(self, comp: Computation) -> dict:
        model = self.models[comp.model_id]
        return {"slide_path": str(comp.slide_path), "out_dir": str(comp.folder), "roi_path": comp.roi_path and str(comp.roi_path),
                "model_path": str(model.path), "encoder_path": str(model.encoder.path), "device": self.device,
                "outputs": list(job_outputs(comp.slide_path)), "geojson_frame": GEOJSON_FRAME, "tile_workers": self.tile_workers, "batch_size": self.batch_size,
                "delay_s": self.test_delay_s}

    def _run(self, comp: Computation, process: "WorkerProcess") -> None:
        message = process.run(self._task(comp), comp)
        kind = message.get("kind")
        if kind != "done":
            self.store.discard(comp.key)
        with self.lock:
            if kind == "cancelled":
                self._finish(comp, CANCELLED, "cancelled")
            elif kind == "failed":
                self._finish(comp, FAILED, "failed", {"code": int(message.get("code", 1)),
                                                      "line": one_line(message.get("line", "failed"))})
            elif self.store.complete(comp.folder, comp.stem) is None:
                self._finish(comp, FAILED, "failed", {"code": 7, "line": "the result set did not read complete"})
            else:
                comp.done = comp.total
                self._finish(comp, DONE, "done")

    def _finish(self, comp: Computation, state: str, stage: str, error: dict | None = None) -> None:
        comp.state, comp.stage, comp.error, comp.changed = state, stage, error, time.monotonic()
        if state == CANCELLED and self.comps.get(comp.key) is comp:
            del self.comps[comp.key]
        self._save()

    def close(self) -> None:
        self._stop.set()
        with self.lock:
            for comp in self.comps.values():
                if comp.state in ACTIVE:
                    comp.cancel.set()
        for thread in self._threads:
            thread.join(timeout=15)
        for process in self._processes:
            process.stop()

    # -- persistence --------------------------------------------------------------------------
    def _save(self) -> None:
        jobs = []
        for h in self.handles.values():
            if h.comp.external:
                continue
            jobs.append({"id": h.id, "key": h.comp.key, "slide": h.slide, "model": h.model,
                         "slide_path": str(h.comp.slide_path), "stem": h.comp.stem, "state": h.state,
                         "error": h.error, "created": h.created})
        try:
            self.store.save_index(jobs)
        except OSError as exc:
            log.error("cannot write the job index: %s", exc.strerror or exc)

    def _restore(self) -> None:
        records = self.store.load_index()
        keep = set()
        for record in records:
            try:
                key, job_id = str(record["key"]), str(record["id"])
                comp = self.comps.get(key)
                if comp is None:
                    stem = str(record["stem"])
                    comp = Computation(key, Path(record["slide_path"]), stem, self.store.result_folder(key),
                                       str(record["model"]), state=DONE, stage="done")
                    if self.store.complete(comp.folder, stem, key) is None:
                        comp.state, comp.stage = FAILED, "failed"
                        comp.error = {"code": 1, "line": RESTARTED}
                    else:
                        self.comps[key] = comp
                        keep.add(key)
                handle = Handle(job_id, comp, str(record["slide"]), str(record["model"]),
                                created=float(record.get("created") or time.time()))
                if record.get("state") == CANCELLED:
                    handle.cancelled = True
                elif record.get("state") != DONE or comp.state != DONE:
                    handle.own_error = record.get("error") if record.get("state") == FAILED and record.get("error") \
                        else {"code": 1, "line": RESTARTED}
                self.handles[job_id] = handle
            except (KeyError, TypeError, ValueError):
                continue
        removed = self.store.clean_incomplete(keep | {c.key for c in self.comps.values()})
        if removed:
            log.warning("removed %d unfinished result folder(s) left by an earlier run", len(removed))
        self._save()

    # -- --results DIR -------------------------------------------------------------------------
    def add_finished(self, job_id: str, folder: Path, stem: str, run_key: str, slide_rel: str,
                     slide_path: Path | None, model_id: str) -> Handle:
        with self.lock:
            comp = Computation(run_key or job_id, slide_path, stem, folder, model_id, state=DONE, stage="done",
                               external=True)
            handle = Handle(job_id, comp, slide_rel, model_id)
            self.handles[job_id] = handle
        return handle


class JobData:
    """A finished set's tiles, read once: corners, attention (+ per class), instance scores, features."""

    def __init__(self, folder: Path, stem: str) -> None:
        self.folder, self.stem = Path(folder), stem
        self.record_path = self.folder / f"{stem}.json"
        self.record = json.loads(self.record_path.read_text(encoding="utf-8"))
        tiles = self.record.get("tiles") or []
        self.xy = np.array([[t["x"], t["y"]] for t in tiles], dtype=np.int64).reshape(-1, 2)
        self.attention = np.array([t["attention"] for t in tiles], dtype=np.float64)
        tiling = self.record.get("tiling") or {}
        self.tile_level0 = int(tiling.get("tile_level0") or 1)
        self.stride = int(tiling.get("stride_level0") or self.tile_level0)
        by_class = [t.get("attention_by_class") for t in tiles]
        self.classes = list(by_class[0]) if by_class and by_class[0] else []
        self.attention_by_class = {c: np.array([b[c] for b in by_class], dtype=np.float64) for c in self.classes}
        self.scores = self._instance_scores()
        self._features = None
        self._order = None
        self._lock = threading.Lock()
        gy, gx = self.xy[:, 1] // self.stride, self.xy[:, 0] // self.stride
        self.grid_yx = np.stack([gy, gx], axis=1) if len(self.xy) else np.zeros((0, 2), dtype=np.int64)
        self.index = {(int(r), int(c)): i for i, (r, c) in enumerate(self.grid_yx.tolist())}

    def _instance_scores(self) -> dict[str, np.ndarray] | None:
        path = self.folder / f"{self.stem}.tiles.csv"
        if not path.is_file():
            return None
        import csv

        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            columns = [i for i, name in enumerate(header) if name.startswith("prob_")]
            if not columns:
                return None
            rows = [[float(row[i]) for i in columns] for row in reader]
        values = np.asarray(rows, dtype=np.float64).reshape(-1, len(columns))
        return {header[i][5:]: values[:, k] for k, i in enumerate(columns)}

    def values(self, cls: str | None) -> np.ndarray:
        return self.attention if cls is None else self.attention_by_class[cls]

    def features(self) -> np.ndarray:
        with self._lock:
            if self._features is None:
                from mil_runtime.features_io import read_feature_file

                path = self.folder / f"{self.stem}.features.h5"
                if not path.is_file():
                    raise ApiError(409, "this result has no features.h5, so it cannot be re-aggregated", 3)
                stored = read_feature_file(path)
                if stored.coords_px is None or not np.array_equal(stored.coords_px, self.xy):
                    raise InvalidInputError(f"{path.name}: its tiles differ from the result's; re-run the job")
                self._features = stored.features
            return self._features

    def tile_at(self, x: float, y: float) -> int | None:
        if x < 0 or y < 0:
            return None
        i = self.index.get((int(y // self.stride), int(x // self.stride)))
        if i is None:
            return None
        tx, ty = self.xy[i]
        return i if (tx <= x < tx + self.tile_level0 and ty <= y < ty + self.tile_level0) else None

    def ranks(self, cls: str | None) -> np.ndarray:
        """Rank of each tile (1 = highest attention; ties by order)."""
        values = self.values(cls)
        order = np.argsort(-values, kind="stable")
        ranks = np.empty(len(values), dtype=np.int64)
        ranks[order] = np.arange(1, len(values) + 1)
        return ranks
