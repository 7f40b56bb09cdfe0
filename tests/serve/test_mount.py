"""create_app mounted under a prefix in another ASGI app: auth still holds, returned URLs carry the prefix."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve_helpers import TOKEN, make_app

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_mounted_app_keeps_auth_and_prefixes_its_urls(slides_root, tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    inner = make_app(slides_root, tmp_path / "state", token_file=tmp_path / "token")

    @asynccontextmanager
    async def lifespan(app):
        async with inner.router.lifespan_context(inner):  # the inner app's shutdown stops its workers
            yield

    outer = FastAPI(lifespan=lifespan)
    outer.mount("/milkit", inner)
    with TestClient(outer) as c:
        for path in ("/milkit/v1/models", "/milkit/v1/slides", "/milkit/v1/openapi.json"):
            assert c.get(path).status_code == 401, path
        slides = c.get("/milkit/v1/slides", headers=AUTH).json()
        assert slides[0]["dzi"].startswith("/milkit/v1/slides/sub/lesion.svs.dzi?exp=")
        assert c.get(slides[0]["dzi"]).status_code == 200
        r = c.post("/milkit/v1/jobs", json={"slide": "sub/lesion.svs", "model": "abmil_demo"}, headers=AUTH)
        assert r.headers["location"].startswith("/milkit/v1/jobs/")
        import time

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = c.get(r.headers["location"], headers=AUTH).json()
            if job["state"] == "done":
                break
            time.sleep(0.05)
        assert job["state"] == "done"
        for key in ("result", "csv", "events", "view"):
            assert job["urls"][key].startswith("/milkit/v1/jobs/"), key
        assert c.get(job["urls"]["result"], headers=AUTH).status_code == 200
        assert c.get(job["urls"]["heatmap_dzi"]).status_code == 200
        assert c.get(job["urls"]["legend"]).status_code == 200
        view = c.get(job["urls"]["view"], follow_redirects=False)
        assert view.status_code == 303 and view.headers["location"] == f"/milkit/?job={job['id']}"
        assert c.get("/milkit/").status_code == 200
        assert c.post("/milkit/v1/predict", files={"file": ("x.npz", b"1")}, data={"model": "abmil_demo"}).status_code == 401
