"""`--device auto|cpu|cuda`: provider choice, the documented refusal, and what the JSON records.

This machine's onnxruntime may or may not have the CUDA provider; the tests that need one state of
the world skip in the other. The silent fallback of onnxruntime-gpu without CUDA libraries (the
session starts on CPU although CUDA was asked for) is reproduced with the real CPU build by making it
advertise the CUDA provider: asked for it, onnxruntime then starts on the CPU, as it does there.
"""

from __future__ import annotations

import json
import subprocess
import sys

import onnxruntime
import pytest

from mil_runtime.errors import DeviceError
from mil_runtime.session import CPU_PROVIDER, CUDA_PROVIDER, _providers, open_session

HAS_CUDA = CUDA_PROVIDER in onnxruntime.get_available_providers()


def mil_infer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mil_runtime.cli", *args], capture_output=True, text=True)


def test_provider_choice_table():
    assert _providers("cpu", [CUDA_PROVIDER, CPU_PROVIDER]) == [CPU_PROVIDER]
    assert _providers("auto", [CUDA_PROVIDER, CPU_PROVIDER]) == [CUDA_PROVIDER, CPU_PROVIDER]
    assert _providers("cuda", [CUDA_PROVIDER, CPU_PROVIDER]) == [CUDA_PROVIDER, CPU_PROVIDER]
    assert _providers("auto", [CPU_PROVIDER]) == [CPU_PROVIDER]
    with pytest.raises(DeviceError, match="--device cpu"):
        _providers("cuda", [CPU_PROVIDER])
    with pytest.raises(DeviceError, match="unknown device"):
        _providers("gpu", [CPU_PROVIDER])


@pytest.mark.faults
@pytest.mark.filterwarnings("ignore:Specified provider .CUDAExecutionProvider.")
def test_cuda_that_silently_falls_back_is_refused(binary_model, monkeypatch):
    _, path = binary_model
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER])
    with pytest.raises(DeviceError, match="failed to start"):
        open_session(path, device="cuda")
    assert open_session(path, device="auto").device == "cpu"  # auto accepts the CPU and says so


@pytest.mark.faults
@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has the CUDA provider")
def test_cli_cuda_without_provider_exits_11_and_writes_nothing(binary_model, features_h5, tmp_path):
    _, model_path = binary_model
    out = tmp_path / "out"
    run = mil_infer(str(features_h5), "--model", str(model_path), "--device", "cuda", "--out", str(out))
    assert run.returncode == DeviceError.exit_code == 11
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cpu" in lines[0] and "Traceback" not in run.stderr
    assert not out.exists() or not any(out.iterdir())


def test_cli_auto_records_the_device_that_ran(binary_model, features_h5, tmp_path):
    _, model_path = binary_model
    run = mil_infer(str(features_h5), "--model", str(model_path), "--device", "auto", "--json", "--quiet")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["device"] == ("cuda" if HAS_CUDA else "cpu")
    run = mil_infer(str(features_h5), "--model", str(model_path), "--device", "cpu", "--json", "--quiet")
    assert json.loads(run.stdout)["device"] == "cpu"
