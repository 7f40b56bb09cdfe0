"""Helpers of the mil-serve tests (a module of its own name: `conftest` is ambiguous across test folders,
so test modules import from here): the demo model, the planted lesion, the token, apps and job waits."""

from __future__ import annotations

import time
from pathlib import Path

from mil_runtime.serve import create_app

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "demo" / "abmil_demo.onnx"
LESION = (700, 1300, 300)  # (cy, cx, r) level-0 px in the 2048 x 2048 slide
TOKEN = "test-token-0123456789abcdef"


def make_app(slides_root: Path, state: Path, **kwargs):
    return create_app([DEMO_MODEL], slides_root, state_dir=state, **kwargs)


def wait_done(c, job_id: str, timeout: float = 60.0, headers=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def slow_down(app, delay: float = 0.15, batch_size: int = 4) -> None:
    """Jobs that stay running long enough to test: `delay` s per encoder batch of `batch_size` tiles."""
    jobs = app.state.service.jobs
    jobs.test_delay_s, jobs.batch_size = delay, batch_size
