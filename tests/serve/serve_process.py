"""A mil-serve process for tests: `python serve_process.py ROOT STATE PORT [SLOW_DELAY]`.

With SLOW_DELAY, every encoder batch (4 tiles) sleeps that long, so a job stays running long enough
to kill the process in the middle of it."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import uvicorn  # noqa: E402

from serve_helpers import make_app, slow_down  # noqa: E402

if __name__ == "__main__":
    root, state, port = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    app = make_app(root, state)
    if len(sys.argv) > 4:
        slow_down(app, delay=float(sys.argv[4]))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
