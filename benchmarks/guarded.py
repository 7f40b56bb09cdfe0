"""Running one benchmark cell in a worker process that is killed past a memory or time limit.

The worker is `python SCRIPT --worker SPEC_JSON`; it prints `RESULT <json>` as its last such line.
`run_guarded` returns that result, {"killed": why} when a limit was passed, or {"error": its last line}.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLL_S = 0.02


def rss_mb(pid: int) -> float:
    """A live process's resident set size (Linux /proc), 0 when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_guarded(script: str | Path, spec: dict, limit_mb: float, timeout: float) -> dict:
    """One worker process of `script`, killed when its RSS passes `limit_mb` or it runs past `timeout` s."""
    command = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(spec)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        start, highest = time.monotonic(), 0.0
        while process.poll() is None:
            highest = max(highest, rss_mb(process.pid))
            if highest > limit_mb:
                process.kill()
                process.wait()
                return {"killed": f"memory limit (> {limit_mb / 1024:g} GB RSS, killed)"}
            if time.monotonic() - start > timeout:
                process.kill()
                process.wait()
                return {"killed": f"time limit (> {timeout:g} s, killed; highest RSS {highest / 1024:.1f} GB)"}
            time.sleep(POLL_S)
        out.seek(0)
        err.seek(0)
        for line in reversed(out.read().splitlines()):
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        last = (err.read().strip().splitlines() or [f"exit code {process.returncode}"])[-1][:160]
        return {"error": last}
