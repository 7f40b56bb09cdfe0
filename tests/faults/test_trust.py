"""Untrusted files and shared sessions: a crafted pickle never runs, and threads calling `predict` on
one model at once get exactly the serial results."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from mil_runtime.errors import ModelFormatError

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "models" / "demo" / "abmil_demo.onnx"


class _Payload:
    """Unpickling this object runs `os.system(command)`: what a malicious checkpoint would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"format": "milkit-checkpoint", "payload": _Payload(f"touch {marker}")}, path)
    assert b"system" in path.read_bytes()  # the payload is really in the file
    return path


def test_a_crafted_checkpoint_never_runs_its_pickle(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = _crafted_checkpoint(tmp_path / "crafted.pt", marker)
    for command in (["-m", "mil_export.cli", "model", str(checkpoint), "-o", str(tmp_path / "m.onnx")],
                    ["-m", "mil_export.cli", "validate", str(DEMO_MODEL), "--sizes", "3", "--checkpoint", str(checkpoint)]):
        result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120)
        assert result.returncode == ModelFormatError.exit_code, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert not marker.exists(), "the pickle's payload ran"
    assert not (tmp_path / "m.onnx").exists()
    # the payload is live (its reduction does create the marker), so the checks above can fail;
    # shown without unpickling anything
    run, args = _Payload(f"touch {marker}").__reduce__()
    run(*args)
    assert marker.exists()


def test_threads_predicting_at_once_match_serial_results():
    import mil_runtime

    model = mil_runtime.load_model(DEMO_MODEL, device="cpu")
    rng = np.random.default_rng(0)
    bags = [rng.standard_normal((int(n), model.metadata.feature_dim)).astype(np.float32) for n in rng.integers(1, 400, 32)]
    serial = [model.predict(bag) for bag in bags]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(model.predict, bags))
    for alone, parallel in zip(serial, threaded):
        assert np.array_equal(alone.probabilities, parallel.probabilities)
        assert np.array_equal(alone.attention, parallel.attention)
