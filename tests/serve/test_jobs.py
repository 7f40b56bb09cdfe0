"""Jobs: one computation per run key, joined while running, cancelled only when nobody wants it,
a bounded queue (503 + Retry-After), and nothing partial after a cancel."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from conftest import make_app, slow_down, wait_done

JOB = {"slide": "sub/lesion.svs", "model": "abmil_demo"}


def _wait_running(c, job_id: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["state"] == "running" and job["done"] > 0:
            return job
        assert job["state"] in ("queued", "running"), job
        time.sleep(0.02)
    raise AssertionError("the job did not start")


def test_a_running_computation_is_joined_not_started_twice(slides_root, tmp_path):
    app = make_app(slides_root, tmp_path / "state")
    with TestClient(app) as c:
        slow = slow_down(app, delay=0.05)
        first = c.post("/v1/jobs", json=JOB).json()
        _wait_running(c, first["id"])
        second = c.post("/v1/jobs", json=JOB).json()
        assert second["id"] != first["id"] and second["state"] == "running"
        a, b = wait_done(c, first["id"]), wait_done(c, second["id"])
        assert a["state"] == b["state"] == "done"
        assert slow.batches == 12  # 48 tiles / 4 per batch: encoded once for both handles
        assert c.get(a["urls"]["result"]).content == c.get(b["urls"]["result"]).content


def test_cancel_one_handle_keeps_the_computation_for_the_other(slides_root, tmp_path):
    app = make_app(slides_root, tmp_path / "state")
    with TestClient(app) as c:
        slow_down(app, delay=0.05)
        first = c.post("/v1/jobs", json=JOB).json()
        _wait_running(c, first["id"])
        second = c.post("/v1/jobs", json=JOB).json()
        assert c.delete(f"/v1/jobs/{first['id']}").status_code == 204
        assert c.get(f"/v1/jobs/{first['id']}").json()["state"] == "cancelled"
        assert wait_done(c, second["id"])["state"] == "done"
        assert c.get(f"/v1/jobs/{first['id']}").json()["state"] == "cancelled"


def test_cancel_mid_run_leaves_nothing(slides_root, tmp_path):
    state = tmp_path / "state"
    app = make_app(slides_root, state)
    with TestClient(app) as c:
        slow = slow_down(app, delay=0.1)
        job = c.post("/v1/jobs", json=JOB).json()
        running = _wait_running(c, job["id"])
        assert 0 < running["done"] < running["total"]
        assert c.delete(f"/v1/jobs/{job['id']}").status_code == 204
        batches = slow.batches
        time.sleep(0.4)
        assert slow.batches <= batches + 1  # it stopped at the next batch
        assert c.get(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"
        assert list((state / "results").iterdir()) == []  # no set, no temporaries, no claim
        assert c.get(f"/v1/jobs/{job['id']}/result").status_code == 409
        again = c.post("/v1/jobs", json=JOB).json()  # a new request starts it afresh
        assert again["state"] in ("queued", "running")
        c.delete(f"/v1/jobs/{again['id']}")


def test_full_queue_answers_503_with_retry_after(slides_root, tmp_path):
    app = make_app(slides_root, tmp_path / "state", max_jobs=1)
    with TestClient(app) as c:
        slow_down(app, delay=0.1)
        first = c.post("/v1/jobs", json=JOB)
        assert first.status_code == 202
        full = c.post("/v1/jobs", json={"slide": "wide.svs", "model": "abmil_demo"})
        assert full.status_code == 503 and int(full.headers["retry-after"]) > 0
        assert full.json()["error"]["line"].startswith("the job queue is full")
        assert c.post("/v1/jobs", json=JOB).status_code == 202  # joining a running one takes no slot
        c.delete(f"/v1/jobs/{first.json()['id']}")


def test_failed_job_reports_the_runtime_code(slides_root, tmp_path):
    from mil_runtime.demo import write_blank_slide

    root = tmp_path / "slides"
    root.mkdir()
    write_blank_slide(root / "blank.svs", height=1024, width=1024)
    app = make_app(root, tmp_path / "state")
    with TestClient(app) as c:
        job = c.post("/v1/jobs", json={"slide": "blank.svs", "model": "abmil_demo"}).json()
        job = wait_done(c, job["id"])
        assert job["state"] == "failed" and job["error"]["code"] == 10  # NoTissueError
        assert "\n" not in job["error"]["line"]
        assert list((tmp_path / "state" / "results").iterdir()) == []
        with c.stream("GET", job["urls"]["events"]) as stream:
            lines = [line for line in stream.iter_lines() if line]
        assert lines[-2] == "event: failed"


def test_progress_events_count_tiles(slides_root, tmp_path):
    import json

    app = make_app(slides_root, tmp_path / "state")
    with TestClient(app) as c:
        slow_down(app, delay=0.05)
        job = c.post("/v1/jobs", json=JOB).json()
        with c.stream("GET", job["urls"]["events"]) as stream:
            lines = [line for line in stream.iter_lines() if line]
    events = [(a.removeprefix("event: "), json.loads(b.removeprefix("data: "))) for a, b in zip(lines[::2], lines[1::2])]
    assert events[-1][0] == "result" and events[-1][1]["n_instances"] == 48
    encoding = [d["done"] for kind, d in events if kind == "progress" and d["stage"] == "encoding"]
    assert len(encoding) >= 3 and encoding == sorted(encoding) and max(encoding) <= 48
