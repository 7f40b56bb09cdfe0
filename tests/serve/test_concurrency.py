"""16 concurrent clients against a real uvicorn server (127.0.0.1, a free port), mixing slide tiles,
overlay tiles, jobs and re-aggregation, with every answer checked against what it must be."""

from __future__ import annotations

import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from serve_helpers import DEMO_MODEL, make_app

pytestmark = pytest.mark.slow
CLIENTS, ROUNDS = 16, 12


@pytest.fixture(scope="module")
def server(slides_root, tmp_path_factory):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = make_app(slides_root, tmp_path_factory.mktemp("state"), workers=2, max_jobs=64)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{base}/v1/models", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield base, app
    srv.should_exit = True
    thread.join(timeout=10)


def _expected(slides_root):
    """What the answers must be, computed independently: tiles from DeepZoomGenerator, predictions
    from load_model on the cached features."""
    import io

    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    tiles = {}
    for name in ("sub/lesion.svs", "wide.svs"):
        with OpenSlide(slides_root / name) as slide:
            gen = DeepZoomGenerator(slide, 254, 1, limit_bounds=False)
            top = gen.level_count - 1
            for level in (top, top - 1, top - 2):
                cols, rows = gen.level_tiles[level]
                for col in range(cols):
                    for row in range(rows):
                        out = io.BytesIO()
                        gen.get_tile(level, (col, row)).save(out, "jpeg", quality=75)
                        tiles[(name, level, col, row)] = out.getvalue()
    return tiles


def test_sixteen_clients_mixing_tiles_jobs_and_reaggregation(server, slides_root):
    from mil_runtime.features_io import read_feature_file
    from mil_runtime.model import load_model

    base, app = server
    tiles = _expected(slides_root)
    keys = list(tiles)
    runner = load_model(DEMO_MODEL)
    with httpx.Client(base_url=base, timeout=60) as c:  # one finished job for overlay and re-aggregation
        job = c.post("/v1/jobs", json={"slide": "sub/lesion.svs", "model": "abmil_demo"}).json()
        while (job := c.get(f"/v1/jobs/{job['id']}").json())["state"] in ("queued", "running"):
            time.sleep(0.05)
        assert job["state"] == "done"
        result = c.get(job["urls"]["result"]).json()
        overlay = {(11, col, row): c.get(f"/v1/jobs/{job['id']}/heatmap_files/11/{col}_{row}.png").content
                   for col in range(9) for row in range(9)}
    handle = app.state.service.jobs.get(job["id"])
    stored = read_feature_file(handle.comp.folder / f"{handle.comp.stem}.features.h5")
    full = result["probabilities"]

    def client(seed: int) -> int:
        rng = random.Random(seed)
        checked = 0
        with httpx.Client(base_url=base, timeout=60) as c:
            for _ in range(ROUNDS):
                kind = rng.choice(["tile", "tile", "tile", "overlay", "job", "reaggregate"])
                if kind == "tile":
                    name, level, col, row = rng.choice(keys)
                    r = c.get(f"/v1/slides/{name}_files/{level}/{col}_{row}.jpeg")
                    assert r.status_code == 200 and r.content == tiles[(name, level, col, row)]
                elif kind == "overlay":
                    key = rng.choice(list(overlay))
                    r = c.get(f"/v1/jobs/{job['id']}/heatmap_files/{key[0]}/{key[1]}_{key[2]}.png")
                    assert r.status_code == 200 and r.content == overlay[key]
                elif kind == "job":
                    slide = rng.choice(["sub/lesion.svs", "wide.svs"])
                    r = c.post("/v1/jobs", json={"slide": slide, "model": "abmil_demo"})
                    assert r.status_code == 202
                    j = r.json()
                    while j["state"] in ("queued", "running"):
                        time.sleep(0.05)
                        j = c.get(f"/v1/jobs/{j['id']}").json()
                    assert j["state"] == "done", j
                    got = c.get(j["urls"]["result"]).json()
                    assert got["input"]["path"].endswith(slide)
                    if slide == "sub/lesion.svs":
                        assert got["probabilities"] == full
                else:
                    x0, y0 = rng.choice([(1000, 400), (0, 0), (512, 512)])
                    region = {"type": "Polygon", "coordinates": [[[x0, y0], [x0 + 700, y0], [x0 + 700, y0 + 700],
                                                                  [x0, y0 + 700], [x0, y0]]]}
                    which = rng.choice(["include", "exclude"])
                    r = c.post(f"/v1/jobs/{job['id']}/reaggregate", json={which: region})
                    centres = stored.coords_px + stored.tile_px_level0 / 2
                    inside = ((centres[:, 0] > x0) & (centres[:, 0] < x0 + 700) & (centres[:, 1] > y0)
                              & (centres[:, 1] < y0 + 700))
                    rows = inside if which == "include" else ~inside
                    if not rows.any():
                        assert r.status_code == 400
                    else:
                        assert r.status_code == 200, r.text
                        want = runner.predict(stored.features[rows]).class_probabilities
                        assert np.allclose(list(r.json()["probabilities"].values()), want, rtol=1e-5, atol=1e-5)
                checked += 1
        return checked

    with ThreadPoolExecutor(CLIENTS) as pool:
        done = list(pool.map(client, range(CLIENTS)))
    assert sum(done) == CLIENTS * ROUNDS
