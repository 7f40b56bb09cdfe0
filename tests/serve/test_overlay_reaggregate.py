"""The overlay on the slide's Deep Zoom grid, re-aggregation on cached features, /v1/predict."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serve_helpers import DEMO_MODEL, LESION
from mil_runtime.outputs.colormap import viridis_lut
from mil_runtime.outputs.heatmap import normalise
from mil_runtime.serve.tiles import DeepZoomGrid


def _tiles(c, job):
    result = c.get(job["urls"]["result"]).json()
    xy = np.array([[t["x"], t["y"]] for t in result["tiles"]])
    return result, xy, np.array([t["attention"] for t in result["tiles"]]), result["tiling"]["tile_level0"]


def _png(r) -> np.ndarray:
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    image = Image.open(io.BytesIO(r.content))
    assert image.mode in ("RGBA", "P")  # a palette PNG with a transparent index: browsers draw it as RGBA
    return np.asarray(image.convert("RGBA"))


def test_deepzoom_grid_is_deepzoomgenerators(slides_root):
    from openslide import OpenSlide
    from openslide.deepzoom import DeepZoomGenerator

    for name in ("sub/lesion.svs", "wide.svs"):
        with OpenSlide(slides_root / name) as slide:
            gen = DeepZoomGenerator(slide, 254, 1, limit_bounds=False)
            grid = DeepZoomGrid(*slide.dimensions)
            assert grid.level_count == gen.level_count
            assert [tuple(d) for d in grid.level_dimensions] == list(gen.level_dimensions)
            for level in range(gen.level_count):
                cols, rows = gen.level_tiles[level]
                for col, row in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2)}:
                    x0, y0, w, h = grid.tile_box(level, col, row)
                    assert (w, h) == gen.get_tile_dimensions(level, (col, row))
                assert grid.tile_box(level, cols, 0) is None


def test_overlay_tile_is_the_attention_raster(done_client):
    c, job = done_client
    _, xy, attention, size = _tiles(c, job)
    dzi = c.get(job["urls"]["heatmap_dzi"]).text
    assert 'Format="png"' in dzi and 'TileSize="254"' in dzi and 'Overlap="1"' in dzi and 'Width="2048"' in dzi
    # the overlay has 255 colour steps (a PNG palette, index 0 transparent): step k is viridis at k / 254
    lut = viridis_lut()
    colours = lut[np.rint(np.rint(normalise(attention) * 254) / 254 * 255).astype(int)]
    grid = DeepZoomGrid(2048, 2048)
    finest = grid.level_count - 1
    checked = 0
    for col in range(grid.level_dimensions[finest][0] // 254 + 1):
        for row in range(grid.level_dimensions[finest][1] // 254 + 1):
            pixels = _png(c.get(f"/v1/jobs/{job['id']}/heatmap_files/{finest}/{col}_{row}.png"))
            x0, y0, w, h = grid.tile_box(finest, col, row)
            assert pixels.shape == (h, w, 4)
            for py, px in ((0, 0), (h // 2, w // 3), (h - 1, w - 1)):
                X, Y = x0 + px, y0 + py  # level-0 px at the finest level
                inside = np.flatnonzero((xy[:, 0] <= X) & (X < xy[:, 0] + size) & (xy[:, 1] <= Y) & (Y < xy[:, 1] + size))
                if len(inside):
                    assert pixels[py, px, 3] == 255 and (pixels[py, px, :3] == colours[inside[0]]).all()
                    checked += 1
                else:
                    assert pixels[py, px, 3] == 0
    assert checked > 10
    coarse = _png(c.get(f"/v1/jobs/{job['id']}/heatmap_files/8/0_0.png"))
    assert coarse.shape == (255, 255, 4) and coarse[..., 3].any()


def test_overlay_colouring_options(done_client):
    c, job = done_client
    base = f"/v1/jobs/{job['id']}"
    rank = _png(c.get(f"{base}/heatmap_files/10/2_1.png"))
    linear = _png(c.get(f"{base}/heatmap_files/10/2_1.png?norm=linear&vmin=0&vmax=0.01"))
    magma = _png(c.get(f"{base}/heatmap_files/10/2_1.png?cmap=magma"))
    assert not np.array_equal(rank, linear) and not np.array_equal(rank, magma)
    assert (rank[..., 3] == linear[..., 3]).all()
    for bad in ("class=lesion", "norm=log", "cmap=nope", "vmin=1&vmax=0"):
        r = c.get(f"{base}/heatmap_files/10/2_1.png?{bad}")
        assert r.status_code in (400, 422) and r.json()["error"]["code"] == 6, bad
    assert c.get(f"{base}/heatmap_files/10/99_1.png").status_code == 404
    assert _png(c.get(f"{base}/legend.png?norm=linear")).shape[1] == 280


def test_hot_overlay_lies_over_the_planted_lesion(done_client):
    c, job = done_client
    top = c.get(f"/v1/jobs/{job['id']}/top?k=3").json()
    cy, cx, r = LESION
    for t in top:
        centre = (t["x"] + t["width"] / 2, t["y"] + t["height"] / 2)
        assert np.hypot(centre[0] - cx, centre[1] - cy) < r + t["width"]


def _square(x0, y0, x1, y1):
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def test_reaggregate_with_everything_included_is_the_full_prediction(done_client):
    c, job = done_client
    result = c.get(job["urls"]["result"]).json()
    r = c.post(f"/v1/jobs/{job['id']}/reaggregate", json={"include": _square(-10, -10, 5000, 5000)}).json()
    assert r["n_tiles"] == result["n_instances"]
    for name, p in result["probabilities"].items():
        assert abs(r["probabilities"][name] - p) <= 1e-5 + 1e-5 * abs(p)
    assert r["prediction"]["class_name"] == result["prediction"]["class_name"]


def test_reaggregate_region_equals_predict_on_those_rows(done_client):
    from mil_runtime.features_io import read_feature_file
    from mil_runtime.model import load_model

    c, job = done_client
    region = _square(1000, 400, 1700, 1100)
    stored = read_feature_file(_features_file(c, job))
    centres = stored.coords_px + stored.tile_px_level0 / 2
    inside = (centres[:, 0] > 1000) & (centres[:, 0] < 1700) & (centres[:, 1] > 400) & (centres[:, 1] < 1100)
    assert 0 < inside.sum() < len(inside)
    runner = load_model(DEMO_MODEL)
    for key, rows in (("include", inside), ("exclude", ~inside)):
        got = c.post(f"/v1/jobs/{job['id']}/reaggregate", json={key: region}).json()
        want = runner.predict(stored.features[rows])
        assert got["n_tiles"] == int(rows.sum())
        assert np.allclose(list(got["probabilities"].values()), want.class_probabilities, rtol=1e-5, atol=1e-5)
        assert np.allclose([a for _, _, a in got["attention"]], want.attention, rtol=1e-5, atol=1e-5)
        assert [[x, y] for x, y, _ in got["attention"]] == stored.coords_px[rows].tolist()
    # the lesion decides: without it, the slide reads clean
    assert c.post(f"/v1/jobs/{job['id']}/reaggregate", json={"exclude": region}).json()["prediction"]["class_name"] == "clean"


def test_reaggregate_refusals(done_client):
    c, job = done_client
    url = f"/v1/jobs/{job['id']}/reaggregate"
    everything = c.post(url, json={"exclude": _square(-10, -10, 5000, 5000)})
    assert everything.status_code == 400 and everything.json()["error"]["code"] == 6
    nothing = c.post(url, json={"include": _square(0, 0, 10, 10)})
    assert nothing.status_code == 400
    for body in ({}, {"include": _square(0, 0, 1, 1), "exclude": _square(0, 0, 1, 1)},
                 {"include": {"type": "Point", "coordinates": [1, 2]}}, {"include": {"type": "Polygon", "coordinates": "x"}}):
        r = c.post(url, json=body)
        assert r.status_code == 400 and "error" in r.json(), body


def _features_file(c, job):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "f.features.h5"
    path.write_bytes(c.get(job["urls"]["features"]).content)
    return path


def test_predict_from_uploaded_features(done_client):
    c, job = done_client
    result = c.get(job["urls"]["result"]).json()
    h5 = _features_file(c, job).read_bytes()
    got = c.post("/v1/predict", files={"file": ("slide.h5", h5)}, data={"model": "abmil_demo"})
    assert got.status_code == 200, got.text
    got = got.json()
    assert got["prediction"]["class_name"] == result["prediction"]["class_name"]
    assert np.allclose([a for *_, a in got["attention"]], [t["attention"] for t in result["tiles"]], atol=1e-6)
    from mil_runtime.features_io import read_feature_file

    stored = read_feature_file(_features_file(c, job))
    buffer = io.BytesIO()
    np.savez(buffer, features=stored.features, coords=stored.coords_px)
    npz = c.post("/v1/predict", files={"file": ("bag.npz", buffer.getvalue())}, data={"model": "abmil_demo"}).json()
    assert npz["probabilities"] == pytest.approx(got["probabilities"])
    bad = c.post("/v1/predict", files={"file": ("bag.npz", b"not a zip")}, data={"model": "abmil_demo"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == 6
    wrong_dim = io.BytesIO()
    np.savez(wrong_dim, features=np.zeros((5, 7), dtype=np.float32))
    r = c.post("/v1/predict", files={"file": ("bag.npz", wrong_dim.getvalue())}, data={"model": "abmil_demo"})
    assert r.status_code in (400, 422) and r.json()["error"]["code"] in (5, 6)
    assert c.post("/v1/predict", data={"model": "abmil_demo"}).status_code == 422
    assert c.post("/v1/predict", files={"file": ("x.txt", b"1")}, data={"model": "abmil_demo"}).status_code == 400
