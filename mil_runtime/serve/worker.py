"""Job worker processes: `run_slide` away from the process that serves tiles.

Each worker is a spawned process at CPU niceness `job_nice` (its onnxruntime and tile-reader threads
included), so a running job neither holds the server's GIL nor takes the CPU from tile requests. It
loads each model and encoder file once and keeps them for every later job (one loaded model per
file per worker). It receives one task at a time over a pipe and answers with messages:

    ("progress", stage, done, total) ... then ("done",) | ("failed", code, line) | ("cancelled",)

The server sets the worker's cancel event while a task that nobody wants any more is running; the
progress hook raises at the next batch, before anything is written (the writer is all-or-nothing).
"""

from __future__ import annotations

import os
import time
from typing import Any


class _Cancelled(Exception):
    pass


class _Delayed:
    """Test hook (task "delay_s"): the encoder, `delay` seconds slower per batch."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay

    def encode(self, tiles):
        time.sleep(self.delay)
        return self.inner.encode(tiles)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def worker_main(conn, cancel, nice: int) -> None:
    if nice > 0:
        try:
            os.nice(nice)
        except OSError:
            pass
    from mil_runtime.encoder import load_encoder
    from mil_runtime.errors import MilkitError
    from mil_runtime.model import load_model
    from mil_runtime.outputs.writer import DEFAULT_OUTPUTS
    from mil_runtime.pipeline import run_slide

    loaded: dict[tuple, Any] = {}

    def get(kind: str, path: str, device: str):
        key = (kind, path, device)
        if key not in loaded:
            loaded[key] = (load_model if kind == "model" else load_encoder)(path, device=device)
        return loaded[key]

    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return

        def progress(stage: str, done: int, total: int) -> None:
            if cancel.is_set():
                raise _Cancelled()
            conn.send(("progress", stage, int(done), int(total)))

        try:
            model = get("model", task["model_path"], task["device"])
            encoder = get("encoder", task["encoder_path"], task["device"])
            if task.get("delay_s"):
                encoder = _Delayed(encoder, float(task["delay_s"]))
            run_slide(task["slide_path"], model, encoder, out_dir=task["out_dir"], outputs=list(DEFAULT_OUTPUTS),
                      roi=task["roi_path"], geojson_frame=task["geojson_frame"], workers=task["tile_workers"],
                      batch_size=task["batch_size"], on_progress=progress)
            message = ("done",)
        except _Cancelled:
            message = ("cancelled",)
        except MilkitError as exc:
            message = ("failed", int(exc.exit_code), " ".join(str(exc).split())[:500])
        except Exception as exc:  # noqa: BLE001  (a job never takes the worker down)
            message = ("failed", 1, f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:400]}")
        try:
            conn.send(message)
        except (BrokenPipeError, OSError):
            return
