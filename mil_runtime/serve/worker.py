"""Job worker processes: `run_slide` away from the process that serves tiles.

    python -m mil_runtime.serve.worker NICE      (started by the server; JSON lines on stdin and stdout)

Each worker is a child process at CPU niceness NICE (its onnxruntime and tile-reader threads included),
so a running job neither holds the server's GIL nor takes the CPU from tile requests. It loads each
model and encoder file once and keeps them for every later job (one loaded model per file per worker).
A plain child process (not multiprocessing), so an application that embeds create_app needs no
`if __name__ == "__main__"` guard. In (stdin), one JSON object a line:

    {"preload": [[model, encoder], ...], "device": ...}   ->  {"kind": "loaded"}
    {"task": {...}}                                      ->  {"kind": "progress", "stage", "done", "total"} ...
                                                             then {"kind": "done"} | {"kind": "failed",
                                                             "code", "line"} | {"kind": "cancelled"}
    {"cancel": true}                                     the running task stops at its next batch

End of input (the server closed the pipe, or died) stops the worker at the next batch, before anything is
written (the writer is all-or-nothing).
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
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


def main(nice: int) -> int:
    if nice > 0:
        try:
            os.nice(nice)
        except OSError:
            pass
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write on the message channel
    inbox: queue.Queue = queue.Queue()
    cancel, gone = threading.Event(), threading.Event()

    def read() -> None:
        for line in sys.stdin:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("cancel"):
                cancel.set()
            else:
                inbox.put(message)
        gone.set()
        cancel.set()
        inbox.put(None)

    threading.Thread(target=read, daemon=True).start()

    def send(**message: Any) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    from mil_runtime.encoder import load_encoder
    from mil_runtime.errors import MilkitError
    from mil_runtime.model import load_model
    from mil_runtime.pipeline import run_slide

    loaded: dict[tuple, Any] = {}

    def get(kind: str, path: str, device: str):
        key = (kind, path, device)
        if key not in loaded:
            loaded[key] = (load_model if kind == "model" else load_encoder)(path, device=device)
        return loaded[key]

    while True:
        message = inbox.get()
        if message is None:
            return 0
        if "preload" in message:
            try:
                for model_path, encoder_path in message["preload"]:
                    get("model", model_path, message["device"])
                    get("encoder", encoder_path, message["device"])
            except Exception:  # noqa: BLE001  (the job that needs it reports the error)
                pass
            send(kind="loaded")
            continue
        task = message["task"]
        cancel.clear()
        if gone.is_set():
            return 0

        def progress(stage: str, done: int, total: int) -> None:
            if cancel.is_set():
                raise _Cancelled()
            send(kind="progress", stage=stage, done=int(done), total=int(total))

        try:
            model = get("model", task["model_path"], task["device"])
            encoder = get("encoder", task["encoder_path"], task["device"])
            if task.get("delay_s"):
                encoder = _Delayed(encoder, float(task["delay_s"]))
            run_slide(task["slide_path"], model, encoder, out_dir=task["out_dir"], outputs=task["outputs"],
                      roi=task["roi_path"], geojson_frame=task["geojson_frame"], workers=task["tile_workers"],
                      batch_size=task["batch_size"], on_progress=progress)
            result = {"kind": "done"}
        except _Cancelled:
            result = {"kind": "cancelled"}
        except MilkitError as exc:
            result = {"kind": "failed", "code": int(exc.exit_code), "line": " ".join(str(exc).split())[:500]}
        except Exception as exc:  # noqa: BLE001  (a job never takes the worker down)
            result = {"kind": "failed", "code": 1,
                      "line": f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:400]}"}
        if gone.is_set():
            return 0
        try:
            send(**result)
        except (BrokenPipeError, OSError):
            return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
