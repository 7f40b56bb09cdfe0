"""Fixtures of the mil-serve tests: a small demo slide with a planted lesion, and apps on it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from mil_runtime.serve import create_app  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "demo" / "abmil_demo.onnx"
LESION = (700, 1300, 300)  # (cy, cx, r) level-0 px in the 2048 x 2048 slide
TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="session")
def slides_root(tmp_path_factory) -> Path:
    from mil_runtime.demo import write_synthetic_slide

    root = tmp_path_factory.mktemp("slides")
    (root / "sub").mkdir()
    write_synthetic_slide(root / "sub" / "lesion.svs", height=2048, width=2048, mpp=0.5, lesions=[LESION],
                          tissue=0.6, seed=3)
    write_synthetic_slide(root / "wide.svs", height=1536, width=3072, mpp=0.5, lesions=[(800, 2000, 250)],
                          tissue=0.7, seed=5)
    return root


def make_app(slides_root: Path, state: Path, **kwargs):
    return create_app([DEMO_MODEL], slides_root, state_dir=state, **kwargs)


@pytest.fixture
def client(slides_root, tmp_path):
    app = make_app(slides_root, tmp_path / "state")
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def done_client(slides_root, tmp_path_factory):
    """One app with a finished job on sub/lesion.svs: (client, job object)."""
    app = make_app(slides_root, tmp_path_factory.mktemp("state"))
    with TestClient(app) as c:
        job = c.post("/v1/jobs", json={"slide": "sub/lesion.svs", "model": "abmil_demo"}).json()
        yield c, wait_done(c, job["id"])


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
