"""A server killed (SIGKILL) in the middle of a job and started again: finished jobs are served, the
job that was running is marked failed, and nothing half-written is left or served."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow  # two server processes and their job processes: ~10-15 s
HERE = Path(__file__).resolve().parent
JOB = {"slide": "sub/lesion.svs", "model": "abmil_demo"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(root: Path, state: Path, port: int, *slow: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(HERE / "serve_process.py"), str(root), str(state), str(port), *slow],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode()[-2000:])
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not start")


def _wait(base: str, job_id: str, states, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{base}/v1/jobs/{job_id}").json()
        if states(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never got there")


def test_killed_mid_job_then_restarted(slides_root, tmp_path):
    state, port = tmp_path / "state", _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start(slides_root, state, port, "0.15")
    try:
        finished = httpx.post(f"{base}/v1/jobs", json={"slide": "wide.svs", "model": "abmil_demo"}).json()
        finished = _wait(base, finished["id"], lambda j: j["state"] == "done")
        before = httpx.get(f"{base}{finished['urls']['result']}").content
        running = httpx.post(f"{base}/v1/jobs", json=JOB).json()
        _wait(base, running["id"], lambda j: j["state"] == "running" and j["done"] >= 8)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = _start(slides_root, state, port)
    try:
        job = httpx.get(f"{base}/v1/jobs/{running['id']}").json()
        assert job["state"] == "failed" and "submit it again" in job["error"]["line"]
        assert httpx.get(f"{base}/v1/jobs/{running['id']}/result").status_code == 409
        again = httpx.get(f"{base}/v1/jobs/{finished['id']}").json()
        assert again["state"] == "done"
        assert httpx.get(f"{base}{again['urls']['result']}").content == before
        assert len(list((state / "results").iterdir())) == 1  # the killed run's folder was removed
        redo = httpx.post(f"{base}/v1/jobs", json=JOB).json()  # submitting again runs it afresh
        assert _wait(base, redo["id"], lambda j: j["state"] not in ("queued", "running"))["state"] == "done"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
