"""Fixtures of the mil-serve tests: a small demo slide with a planted lesion, and apps on it
(the helpers they use are in serve_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from serve_helpers import LESION, make_app, wait_done  # noqa: E402


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
