"""benchmarks/memory.py: a smoke run on ABMIL at a tiny size (the table's shape, never its numbers), and
the RSS guard killing a worker that passes the limit."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "memory.py"


@pytest.mark.slow
def test_smoke_run_on_abmil_gives_one_row_per_size(tmp_path):
    out = tmp_path / "memory.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "ABMIL", "--sizes", "30,60", "--markdown", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ABMIL |")]
    assert [row.split("|")[2].strip() for row in rows] == ["30", "60"]
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")[2:]]
        assert len(cells) == 3 and all(re.fullmatch(r"[\d,]+ ms, \d+\.\d\d / \d+\.\d\d GB\*?", c) for c in cells), row


def test_the_guard_kills_a_worker_above_the_limit(monkeypatch):
    spec = importlib.util.spec_from_file_location("_milkit_bench_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    hog = [sys.executable, "-c", "import time; x = bytearray(400 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(30)"]
    real_popen = subprocess.Popen
    monkeypatch.setattr(module.guarded.subprocess, "Popen", lambda _command, **kw: real_popen(hog, **kw))
    result = module.run_guarded({}, limit_mb=200, timeout=60)
    assert result == {"killed": "memory limit (> 0.195312 GB RSS, killed)"}
