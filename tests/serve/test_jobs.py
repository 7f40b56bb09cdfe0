"""Jobs: one computation per run key, joined while running, cancelled only when nobody wants it,
a bounded queue (503 + Retry-After), and nothing partial after a cancel."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from serve_helpers import make_app, slow_down, wait_done

import pytest


def _job(n: int) -> dict:
    """A job on the lesion slide whose run key is its own (a whole-slide ROI shifted by n px)."""
    ring = [[-n, -n], [4000, -n], [4000, 4000], [-n, 4000], [-n, -n]]
    return {"slide": "sub/lesion.svs", "model": "abmil_demo", "roi": {"type": "Polygon", "coordinates": [ring]}}


@pytest.fixture(scope="module")
def shared(slides_root, tmp_path_factory):
    """One app (and one job process) for the tests here: each test's jobs have their own run keys."""
    state = tmp_path_factory.mktemp("state")
    app = make_app(slides_root, state, max_jobs=2)
    with TestClient(app) as c:
        slow_down(app, delay=0.05)
        yield c, app, state


def _wait_running(c, job_id: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["state"] == "running" and job["done"] > 0:
            return job
        assert job["state"] in ("queued", "running"), job
        time.sleep(0.02)
    raise AssertionError("the job did not start")


def test_a_running_computation_is_joined_not_started_twice(shared):
    c, app, _ = shared
    JOB = _job(1)
    runs = app.state.service.jobs.runs
    first = c.post("/v1/jobs", json=JOB).json()
    _wait_running(c, first["id"])
    second = c.post("/v1/jobs", json=JOB).json()
    assert second["id"] != first["id"] and second["state"] == "running"
    a, b = wait_done(c, first["id"]), wait_done(c, second["id"])
    assert a["state"] == b["state"] == "done"
    assert app.state.service.jobs.runs == runs + 1  # one computation for both handles
    assert c.get(a["urls"]["result"]).content == c.get(b["urls"]["result"]).content


def test_cancel_one_handle_keeps_the_computation_for_the_other(shared):
    c, app, _ = shared
    JOB = _job(2)
    first = c.post("/v1/jobs", json=JOB).json()
    _wait_running(c, first["id"])
    second = c.post("/v1/jobs", json=JOB).json()
    assert c.delete(f"/v1/jobs/{first['id']}").status_code == 204
    assert c.get(f"/v1/jobs/{first['id']}").json()["state"] == "cancelled"
    assert wait_done(c, second["id"])["state"] == "done"
    assert c.get(f"/v1/jobs/{first['id']}").json()["state"] == "cancelled"


def test_cancel_mid_run_leaves_nothing(shared):
    c, app, state = shared
    JOB = _job(3)
    before = set((state / "results").iterdir())
    job = c.post("/v1/jobs", json=JOB).json()
    running = _wait_running(c, job["id"])
    assert 0 < running["done"] < running["total"]
    assert c.delete(f"/v1/jobs/{job['id']}").status_code == 204
    comp = app.state.service.jobs.get(job["id"]).comp
    deadline = time.monotonic() + 5
    while comp.state == "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert comp.state == "cancelled" and comp.done < comp.total  # it stopped at the next batch
    assert c.get(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"
    assert set((state / "results").iterdir()) == before  # no set, no temporaries, no claim
    assert not (state / "results" / comp.key).exists()
    assert c.get(f"/v1/jobs/{job['id']}/result").status_code == 409
    again = c.post("/v1/jobs", json=JOB).json()  # a new request starts it afresh
    assert again["state"] in ("queued", "running")
    c.delete(f"/v1/jobs/{again['id']}")
    wait_done(c, again["id"])


def _idle(app, timeout: float = 20.0) -> None:
    jobs, deadline = app.state.service.jobs, time.monotonic() + timeout
    while jobs.active_count() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert jobs.active_count() == 0


def test_full_queue_answers_503_with_retry_after(shared):
    c, app, _ = shared
    _idle(app)
    first = c.post("/v1/jobs", json=_job(4))
    second = c.post("/v1/jobs", json=_job(5))
    assert first.status_code == second.status_code == 202  # max_jobs=2: one running, one queued
    full = c.post("/v1/jobs", json=_job(6))
    assert full.status_code == 503 and int(full.headers["retry-after"]) > 0
    assert full.json()["error"]["line"].startswith("the job queue is full")
    assert c.post("/v1/jobs", json=_job(4)).status_code == 202  # joining a running one takes no slot
    for r in (first, second):
        c.delete(f"/v1/jobs/{r.json()['id']}")
    _idle(app)


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


def test_progress_events_count_tiles(shared):
    import json

    c, app, _ = shared
    job = c.post("/v1/jobs", json=_job(7)).json()
    with c.stream("GET", job["urls"]["events"]) as stream:
        lines = [line for line in stream.iter_lines() if line]
    events = [(a.removeprefix("event: "), json.loads(b.removeprefix("data: "))) for a, b in zip(lines[::2], lines[1::2])]
    assert events[-1][0] == "result" and events[-1][1]["n_instances"] == 48
    encoding = [d["done"] for kind, d in events if kind == "progress" and d["stage"] == "encoding"]
    assert len(encoding) >= 3 and encoding == sorted(encoding) and max(encoding) <= 48
