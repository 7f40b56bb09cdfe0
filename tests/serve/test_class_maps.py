"""Per-class attention (a multi-branch model, tests/class_attention_toy.py): the job lists its classes,
and class= selects that class's map for the overlay, the legend, top-k and the point query."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve_helpers import DEMO_MODEL, wait_done

pytestmark = pytest.mark.slow
CLASSES = ["benign", "tumor", "necrosis"]


@pytest.fixture(scope="module")
def toy(slides_root, tmp_path_factory):
    pytest.importorskip("torch")
    from class_attention_toy import toy_model
    from mil_export import export_onnx

    from mil_runtime.serve import create_app
    from mil_runtime.session import open_session

    encoder_path = DEMO_MODEL.parent / "tiny_cnn.onnx"
    folder = tmp_path_factory.mktemp("toy")
    shutil.copy(encoder_path, folder / encoder_path.name)
    encoder = open_session(encoder_path, device="cpu")
    ref = {"name": encoder.metadata.model_name, "output_dim": encoder.metadata.feature_dim, "sha256": encoder.sha256}
    model = export_onnx(toy_model(encoder.metadata.feature_dim, len(CLASSES), seed=5), folder / "toy.onnx",
                        class_names=CLASSES, encoder=ref, tiling={"tile_px": 128, "mpp": 1.0, "overlap": 0.0})
    app = create_app([model], slides_root, state_dir=tmp_path_factory.mktemp("state"))
    with TestClient(app) as c:
        job = c.post("/v1/jobs", json={"slide": "sub/lesion.svs", "model": "toy"}).json()
        yield c, wait_done(c, job["id"])


def test_class_maps(toy):
    from mil_runtime.outputs.colormap import viridis_lut
    from mil_runtime.outputs.heatmap import normalise

    c, job = toy
    assert job["state"] == "done" and job["classes"] == CLASSES
    assert c.get("/v1/models").json()[0]["class_attention"] is True
    result = c.get(job["urls"]["result"]).json()
    xy = np.array([[t["x"], t["y"]] for t in result["tiles"]])
    base = f"/v1/jobs/{job['id']}"
    tiles = {}
    for name in CLASSES:
        weights = np.array([t["attention_by_class"][name] for t in result["tiles"]])
        top = c.get(f"{base}/top", params={"k": 3, "class": name}).json()
        assert [t["attention"] for t in top] == pytest.approx(sorted(weights, reverse=True)[:3])
        i = int(np.argmax(weights))
        at = c.get(f"{base}/at", params={"x": xy[i, 0] + 1, "y": xy[i, 1] + 1, "class": name}).json()
        assert at["rank"] == 1 and at["attention"] == pytest.approx(weights[i])
        assert set(at["attention_by_class"]) == set(CLASSES)
        png = c.get(f"{base}/heatmap_files/11/{xy[i, 0] // 254}_{xy[i, 1] // 254}.png", params={"class": name})
        assert png.status_code == 200
        from io import BytesIO

        from PIL import Image

        pixels = np.asarray(Image.open(BytesIO(png.content)).convert("RGBA"))
        x0, y0 = (xy[i, 0] // 254) * 254 - (1 if xy[i, 0] // 254 else 0), (xy[i, 1] // 254) * 254 - (1 if xy[i, 1] // 254 else 0)
        want = viridis_lut()[int(np.rint(np.rint(normalise(weights)[i] * 254) / 254 * 255))]
        assert (pixels[xy[i, 1] + 128 - y0, xy[i, 0] + 128 - x0, :3] == want).all()
        tiles[name] = png.content
        assert c.get(f"{base}/legend.png", params={"class": name}).status_code == 200
    assert len(set(tiles.values())) == len(CLASSES)  # three different maps
    assert c.get(f"{base}/heatmap.dzi", params={"class": "nope"}).status_code == 400
