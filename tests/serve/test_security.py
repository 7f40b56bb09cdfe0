"""Security: bearer tokens, signed tile URLs (expiry, tampering), slide paths confined to ROOT, CORS
as an allow-list, upload size limit."""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient

from serve_helpers import TOKEN, make_app, wait_done

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def secured(slides_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("secured")
    (folder / "token").write_text(TOKEN + "\n")
    app = make_app(slides_root, folder / "state", token_file=folder / "token")
    with TestClient(app) as c:
        job = c.post("/v1/jobs", json={"slide": "sub/lesion.svs", "model": "abmil_demo"}, headers=AUTH).json()
        yield c, wait_done(c, job["id"], headers=AUTH), app


def test_every_api_route_needs_the_token(secured):
    c, job, _ = secured
    for path in ("/v1/models", "/v1/slides", f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/result",
                 "/v1/openapi.json", f"/v1/jobs/{job['id']}/top", "/v1/slides/sub/lesion.svs.dzi",
                 f"/v1/jobs/{job['id']}/heatmap.dzi"):
        none = c.get(path)
        assert none.status_code == 401 and none.json()["error"]["code"] == 0, path
        wrong = c.get(path, headers={"Authorization": "Bearer " + "x" * len(TOKEN)})
        assert wrong.status_code in (401, 403) and wrong.json()["error"]["line"] == "wrong token", path
        assert c.get(path, headers=AUTH).status_code == 200, path
    assert c.post("/v1/jobs", json={"slide": "sub/lesion.svs", "model": "abmil_demo"}).status_code == 401


def test_the_page_loads_without_a_token(secured):
    c, job, _ = secured
    assert c.get("/").status_code == 200
    assert c.get(f"/v1/jobs/{job['id']}/view", follow_redirects=False).status_code == 303


def test_signed_urls_work_without_the_token_and_carry_no_token(secured):
    c, job, _ = secured
    urls = job["urls"]
    for key in ("slide_dzi", "heatmap_dzi", "legend"):
        assert "sig=" in urls[key] and TOKEN not in urls[key]
        assert c.get(urls[key]).status_code == 200, key
    path, query = urls["slide_dzi"].split("?")
    tile = path.removesuffix(".dzi") + "_files/11/3_2.jpeg?" + query
    assert c.get(tile).status_code == 200  # one signature covers the .dzi and its tiles
    path, query = urls["heatmap_dzi"].split("?")
    assert c.get(path.removesuffix(".dzi") + "_files/11/5_2.png?" + query + "&norm=linear").status_code == 200
    listed = c.get("/v1/slides", headers=AUTH).json()[0]["dzi"]
    assert c.get(listed).status_code == 200
    # a signature is for its own prefix only
    other = urls["slide_dzi"].replace("sub/lesion.svs", "wide.svs")
    assert c.get(other).status_code == 403
    assert c.get(f"/v1/jobs/{job['id']}/result?{query}").status_code == 401  # not a tile URL


def test_tampered_and_expired_signatures_are_refused(secured):
    c, job, app = secured
    url = job["urls"]["slide_dzi"]
    path, query = url.split("?")
    params = dict(p.split("=") for p in query.split("&"))
    flipped = params["sig"][:-1] + ("0" if params["sig"][-1] != "0" else "1")
    assert c.get(f"{path}?exp={params['exp']}&sig={flipped}").status_code == 403
    assert c.get(f"{path}?exp={int(params['exp']) + 1}&sig={params['sig']}").status_code == 403
    expired = app.state.service.auth.sign("/v1/slides/sub/lesion.svs", ".dzi", ttl=-5)
    r = c.get(expired)
    assert r.status_code == 403 and "expired" in r.json()["error"]["line"]


def test_token_file_must_hold_a_real_token(slides_root, tmp_path):
    from mil_runtime.errors import MilkitError

    (tmp_path / "t").write_text("short\n")
    with pytest.raises(MilkitError):
        make_app(slides_root, tmp_path / "state", token_file=tmp_path / "t")


@pytest.fixture(scope="module")
def confined(slides_root, tmp_path_factory):
    """A ROOT with a symlink to a slide outside it and one inside it."""
    import shutil

    base = tmp_path_factory.mktemp("confined")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    shutil.copy(slides_root / "wide.svs", outside / "secret.svs")
    shutil.copy(slides_root / "wide.svs", root / "ok.svs")
    os.symlink(outside / "secret.svs", root / "leak.svs")
    os.symlink(outside, root / "leakdir")
    os.symlink(root / "ok.svs", root / "alias.svs")
    app = make_app(root, base / "state")
    with TestClient(app) as c:
        yield c


BAD_PATHS = ["../outside/secret.svs", "..%2Foutside%2Fsecret.svs", "%2E%2E/outside/secret.svs",
             "leak.svs", "leakdir/secret.svs", "%2Fetc%2Fpasswd", "/etc/passwd", "ok.svs%00.svs",
             "a" * 300 + ".svs", ("x/" * 600) + "ok.svs", "..\\outside\\secret.svs", "C:%5Cx.svs", "sub/../../outside/secret.svs"]


@pytest.mark.parametrize("bad", BAD_PATHS)
def test_slide_paths_are_confined_to_root(confined, bad):
    for url in (f"/v1/slides/{bad}.dzi", f"/v1/slides/{bad}_files/0/0_0.jpeg"):
        r = confined.get(url)
        assert r.status_code in (400, 404), (url, r.status_code)
        assert r.headers["content-type"] == "application/json" and "error" in r.json()
    from urllib.parse import unquote

    job = confined.post("/v1/jobs", json={"slide": unquote(bad), "model": "abmil_demo"})
    assert job.status_code in (400, 404, 422), (bad, job.status_code)


def test_listing_skips_symlinks_out_of_root_and_serves_those_inside(confined):
    assert [s["path"] for s in confined.get("/v1/slides").json()] == ["alias.svs", "ok.svs"]
    assert confined.get("/v1/slides/alias.svs.dzi").status_code == 200
    assert confined.get("/v1/slides/ok.svs_files/0/0_0.jpeg").status_code == 200


def test_cors_is_an_allow_list(slides_root, tmp_path):
    app = make_app(slides_root, tmp_path / "state", cors_origins=["https://viewer.example"])
    with TestClient(app) as c:
        ok = c.get("/v1/models", headers={"Origin": "https://viewer.example"})
        assert ok.headers["access-control-allow-origin"] == "https://viewer.example"
        other = c.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    from mil_runtime.errors import MilkitError

    with pytest.raises(MilkitError):
        make_app(slides_root, tmp_path / "state2", cors_origins=["*"])


def test_uploads_are_limited(slides_root, tmp_path):
    import io

    import numpy as np

    app = make_app(slides_root, tmp_path / "state", max_upload_mb=0.01)
    buffer = io.BytesIO()
    np.savez(buffer, features=np.zeros((200, 64), dtype=np.float32))
    with TestClient(app) as c:
        r = c.post("/v1/predict", files={"file": ("f.npz", buffer.getvalue())}, data={"model": "abmil_demo"})
        assert r.status_code == 413 and r.json()["error"]["line"].startswith("the upload is larger")
