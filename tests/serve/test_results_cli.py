"""`--results DIR` serves an earlier run's sets as jobs without running them; `mil-serve` and `--demo`."""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient

from serve_helpers import DEMO_MODEL, make_app


@pytest.fixture(scope="module")
def results_dir(slides_root, tmp_path_factory):
    from mil_runtime.encoder import find_encoder, load_encoder
    from mil_runtime.model import load_model
    from mil_runtime.pipeline import run_slide

    out = tmp_path_factory.mktemp("infer-out")
    model = load_model(DEMO_MODEL)
    encoder = load_encoder(find_encoder(DEMO_MODEL, model.metadata))
    run_slide(slides_root / "sub" / "lesion.svs", model, encoder, out_dir=out / "a")  # what mil-infer --out writes
    run_slide(slides_root / "wide.svs", model, encoder, out_dir=out / "b")
    (out / "b" / "wide.tiles.csv").unlink()  # an incomplete set: never served
    return out


def test_results_are_served_as_done_jobs_without_running(slides_root, results_dir, tmp_path):
    app = make_app(slides_root, tmp_path / "state", results_dir=results_dir)
    with TestClient(app) as c:
        jobs = c.get("/v1/jobs").json()
        assert [j["slide"] for j in jobs] == ["sub/lesion.svs"]
        job = jobs[0]
        assert job["state"] == "done" and job["model"] == "abmil_demo"
        assert c.get(job["urls"]["result"]).json()["prediction"]["class_name"] == "lesion"
        assert c.get(job["urls"]["slide_dzi"]).status_code == 200
        assert c.get(job["urls"]["heatmap_dzi"]).status_code == 200
        assert c.get(f"/v1/jobs/{job['id']}/heatmap_files/11/5_2.png").status_code == 200
        assert c.get(f"/v1/jobs/{job['id']}/top?k=2").status_code == 200
        r = c.post(f"/v1/jobs/{job['id']}/reaggregate", json={"include": {"type": "Polygon", "coordinates": [
            [[0, 0], [3000, 0], [3000, 3000], [0, 3000], [0, 0]]]}})
        assert r.status_code == 200
        assert app.state.service.jobs.comps == {}  # nothing was computed
        assert list((tmp_path / "state" / "results").iterdir()) == []
        assert c.delete(f"/v1/jobs/{job['id']}").status_code == 204  # a finished job: nothing to stop
        assert c.get(f"/v1/jobs/{job['id']}").json()["state"] == "done"
    with TestClient(make_app(slides_root, tmp_path / "state", results_dir=results_dir)) as c:
        assert [j["id"] for j in c.get("/v1/jobs").json()] == [job["id"]]  # stable ids across restarts


def test_cli_builds_the_app_and_binds_localhost(monkeypatch, slides_root, tmp_path):
    import uvicorn

    from mil_runtime.serve import cli

    from mil_runtime.serve.jobs import JobManager

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setattr(JobManager, "prestart", lambda self: seen.update(prestarted=True))
    assert cli.main(["--model", str(DEMO_MODEL), "--slides", str(slides_root), "--state", str(tmp_path / "s")]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000 and seen["prestarted"]
    with TestClient(seen["app"]) as c:
        assert c.get("/v1/models").json()[0]["id"] == "abmil_demo"
    assert cli.main(["--model", str(DEMO_MODEL), "--slides", str(tmp_path / "missing")]) == 3
    assert cli.main(["--slides", str(slides_root)]) == 6
    assert cli.main(["--model", str(DEMO_MODEL), "--slides", str(slides_root), "--cors-origin", "*",
                     "--state", str(tmp_path / "s")]) == 6


def test_demo_serves_the_demo_model_and_slides(monkeypatch, tmp_path):
    import uvicorn

    import mil_runtime.demo.__main__ as demo
    from mil_runtime.serve import cli

    monkeypatch.setattr(demo, "SYNTHETIC", {**demo.SYNTHETIC, "height": 1024, "width": 1024, "lesions": "random 1"})
    from mil_runtime.serve.jobs import JobManager

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setattr(JobManager, "prestart", lambda self: None)
    assert cli.main(["--demo", "--state", str(tmp_path / "s"), "--port", "8123"]) == 0
    with TestClient(seen["app"]) as c:
        assert [m["id"] for m in c.get("/v1/models").json()] == ["abmil_demo"]
        paths = [s["path"] for s in c.get("/v1/slides").json()]
        assert demo.SYNTHETIC_NAME in paths


def test_two_files_of_one_architecture_get_distinct_ids(slides_root, tmp_path):
    from mil_runtime.serve import create_app

    copy = tmp_path / "m" / "abmil_demo.onnx"
    copy.parent.mkdir()
    shutil.copy(DEMO_MODEL, copy)
    shutil.copy(DEMO_MODEL.parent / "tiny_cnn.onnx", copy.parent / "tiny_cnn.onnx")
    app = create_app([DEMO_MODEL, copy, DEMO_MODEL], slides_root, state_dir=tmp_path / "state")
    with TestClient(app) as c:
        ids = [m["id"] for m in c.get("/v1/models").json()]
        assert len(ids) == 2 and len(set(ids)) == 2


def test_a_usage_error_is_one_line_and_exit_2(capsys):
    from mil_runtime.serve import cli

    assert cli.main(["--no-such-option"]) == 2
    assert cli.main(["--port", "many"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("mil-serve: error:") and "mil-serve --help" in line for line in lines)
    assert cli.main(["--help"]) == 0 and "--token-file" in capsys.readouterr().out
