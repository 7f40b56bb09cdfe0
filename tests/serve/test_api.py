"""mil-serve's API on a small demo slide: models, slides, Deep Zoom, jobs, results, overlay, queries."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from openslide import OpenSlide
from openslide.deepzoom import DeepZoomGenerator

from serve_helpers import DEMO_MODEL, LESION, wait_done


def test_models_and_slides(client):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models] == ["abmil_demo"]
    m = models[0]
    assert m["class_names"] == ["clean", "lesion"] and m["tile_size"] == 128 and m["mpp"] == 1.0
    assert m["encoder"] == "tiny_cnn" and len(m["sha256"]) == 64
    slides = client.get("/v1/slides").json()
    assert [s["path"] for s in slides] == ["sub/lesion.svs", "wide.svs"]
    assert slides[0]["width"] == 2048 and slides[0]["mpp"] == pytest.approx(0.5)
    assert slides[0]["dzi"] == "/v1/slides/sub/lesion.svs.dzi"


def test_openapi_is_v1_and_docs_are_off(client):
    assert client.get("/v1/openapi.json").status_code == 200
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404


def test_page_and_view_redirect(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    view = client.get("/v1/jobs/abc/view", follow_redirects=False)
    assert view.status_code == 303 and view.headers["location"] == "/?job=abc"


def test_slide_dzi_and_tiles_equal_deepzoomgenerators(client, slides_root):
    dzi = client.get("/v1/slides/sub/lesion.svs.dzi")
    assert dzi.status_code == 200 and 'TileSize="254"' in dzi.text and 'Overlap="1"' in dzi.text
    with OpenSlide(slides_root / "sub" / "lesion.svs") as slide:
        gen = DeepZoomGenerator(slide, 254, 1, limit_bounds=False)
        assert dzi.text == gen.get_dzi("jpeg")
        for level, col, row in ((gen.level_count - 1, 3, 2), (gen.level_count - 1, 8, 8), (9, 1, 0), (0, 0, 0)):
            r = client.get(f"/v1/slides/sub/lesion.svs_files/{level}/{col}_{row}.jpeg")
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
            assert r.headers["etag"] and "max-age" in r.headers["cache-control"]
            want = BytesIO()
            gen.get_tile(level, (col, row)).save(want, "jpeg", quality=75)
            assert r.content == want.getvalue()  # DeepZoomGenerator's own tile, JPEG-encoded as the example does
            again = client.get(f"/v1/slides/sub/lesion.svs_files/{level}/{col}_{row}.jpeg",
                               headers={"If-None-Match": r.headers["etag"]})
            assert again.status_code == 304
    assert client.get("/v1/slides/sub/lesion.svs_files/11/99_0.jpeg").status_code == 404


def test_job_runs_and_serves_every_output(done_client):
    c, job = done_client
    assert job["state"] == "done" and job["done"] == job["total"] > 0 and job["error"] is None
    assert job["classes"] == []
    result = c.get(job["urls"]["result"])
    assert result.status_code == 200 and result.json()["prediction"]["class_name"] == "lesion"
    for kind in ("geojson", "csv", "features"):
        r = c.get(job["urls"][kind])
        assert r.status_code == 200 and len(r.content) > 100, kind
    assert c.get(job["urls"]["legend"]).headers["content-type"] == "image/png"


def test_job_serves_the_dsa_annotation_of_its_set(done_client):
    """The job's `<stem>.dsa.json` is a hashed member of its set (the record names its sha256), a griddata
    heatmap whose cell under each tile's centre is the record's attention; an SVS set has no DICOM objects."""
    import hashlib

    c, job = done_client
    record = c.get(job["urls"]["result"]).json()
    r = c.get(job["urls"]["dsa"])
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert record["output_set"]["files"][f"{Path(record['input']['path']).stem}.dsa.json"] == \
        hashlib.sha256(r.content).hexdigest()
    (element,) = r.json()["elements"]
    assert element["type"] == "griddata" and element["interpretation"] == "heatmap"
    values = np.asarray(element["values"]).reshape(-1, element["gridWidth"])  # value i at origin + d * (col, row)
    size = record["tiling"]["tile_level0"]
    for tile in record["tiles"]:
        col = round((tile["x"] + size / 2 - element["origin"][0]) / element["dx"])
        row = round((tile["y"] + size / 2 - element["origin"][1]) / element["dy"])
        assert values[row, col] == tile["attention"]
    assert np.count_nonzero(values) == len(record["tiles"])
    for kind, name in (("dicom_annotations", "annotations.dcm"), ("dicom_attention", "attention.dcm")):
        missing = c.get(job["urls"][kind])
        assert missing.status_code == 404 and f"no {name} file" in missing.json()["error"]["line"]


def test_repeated_job_is_served_from_the_finished_result(done_client):
    c, job = done_client
    r = c.post("/v1/jobs", json={"slide": "sub/lesion.svs", "model": "abmil_demo"})
    assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    assert r.json()["id"] != job["id"] and r.json()["state"] == "done"


def test_top_and_point_queries(done_client):
    c, job = done_client
    top = c.get(f"/v1/jobs/{job['id']}/top?k=5").json()
    assert [t["rank"] for t in top] == [1, 2, 3, 4, 5]
    assert all(a["attention"] >= b["attention"] for a, b in zip(top, top[1:]))
    cy, cx, r = LESION
    best = top[0]
    assert abs(best["x"] + best["width"] / 2 - cx) < r + best["width"] and abs(best["y"] + best["height"] / 2 - cy) < r + best["height"]
    at = c.get(f"/v1/jobs/{job['id']}/at", params={"x": best["x"] + 3, "y": best["y"] + 5}).json()
    assert at["tile"] == {k: best[k] for k in ("x", "y", "width", "height")}
    assert at["rank"] == 1 and at["attention"] == pytest.approx(best["attention"])
    off = c.get(f"/v1/jobs/{job['id']}/at", params={"x": 5, "y": 5}).json()
    assert off["tile"] is None


def test_events_stream_ends_with_the_result(done_client):
    c, job = done_client
    with c.stream("GET", job["urls"]["events"]) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert lines[0] == "event: progress" and lines[-2] == "event: result"
    import json

    assert json.loads(lines[-1].removeprefix("data: "))["prediction"]["class_name"] == "lesion"


def test_errors_are_json_one_line(client):
    for r in (client.get("/nope"), client.get("/v1/jobs/nope"),
              client.post("/v1/jobs", json={"slide": "sub/lesion.svs"}),
              client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}),
              client.post("/v1/jobs", json={"slide": "sub/lesion.svs", "model": "nope"})):
        assert 400 <= r.status_code < 500, r.text
        body = r.json()["error"]
        assert isinstance(body["code"], int) and "\n" not in body["line"] and "Traceback" not in body["line"]
