"""mil-infer's cohort options: records only for cohort runs, --status (opens no slide, loads no model,
imports no torch), --shard, usage errors, --device cuda:N, and the cohort route without torch."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cohort_helpers import DEMO_MODEL, env, make_h5, make_slide, mil_infer

from mil_runtime.errors import DeviceError
from mil_runtime.outputs.record import read_output_set
from mil_runtime.session import CPU_PROVIDER, CUDA_PROVIDER, _providers

# A Python where the modules in MILKIT_TEST_BLOCK cannot be imported, and where the slide readers
# (OpenSlide, tifffile, pydicom) import but refuse to open anything when MILKIT_TEST_NO_SLIDES=1.
BLOCKER = textwrap.dedent("""
    import importlib.abc, importlib.machinery, os, sys
    BLOCKED = tuple(os.environ["MILKIT_TEST_BLOCK"].split(","))
    READERS = {"openslide": ("OpenSlide", "open_slide", "ImageSlide"), "tifffile": ("TiffFile", "imread"),
               "pydicom": ("dcmread",)}
    def refuse(*args, **kwargs):
        raise RuntimeError(f"a slide was opened: {args[:1]}")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked by the cohort test: {name}")
            if name in READERS and os.environ.get("MILKIT_TEST_NO_SLIDES") == "1":
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                run = spec.loader.exec_module
                def exec_module(module, run=run, names=READERS[name]):
                    run(module)
                    for attr in names:
                        setattr(module, attr, refuse)
                spec.loader.exec_module = exec_module
                return spec
            return None
    sys.meta_path.insert(0, Block())
""")
NO_TORCH = "torch,mil_train,mil_export"
NO_MODEL = NO_TORCH + ",onnxruntime"


def blocked(folder: Path, modules: str, no_slides: bool = False) -> dict:
    (folder / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": str(folder), "MILKIT_TEST_BLOCK": modules, "MILKIT_TEST_NO_SLIDES": int(no_slides)}


def test_a_cohort_run_without_torch_then_status_without_slide_readers_or_onnxruntime(tmp_path):
    src = tmp_path / "in"
    inputs = [make_h5(src / f"f{i}.h5", seed=i) for i in range(3)] + [make_slide(src / "s.tiff", seed=2)]
    bad = src / "bad.h5"
    bad.write_bytes(b"junk")
    out = tmp_path / "out"
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    ran = mil_infer(*inputs, bad, "--model", DEMO_MODEL, "--out", out, "--cohort", "--quiet", "--outputs", "json,csv",
                    **blocked(hooks, NO_TORCH))
    assert ran.returncode == 6, ran.stderr
    assert ran.stderr.strip().splitlines() == [f"error: {bad}: not an HDF5 file; pass a CLAM/TRIDENT .h5 feature file"]
    assert [line.split(": ")[0] for line in ran.stdout.strip().splitlines()] == [str(p) for p in inputs]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["cohort.json", "predictions.csv", "bad.failed.json", "f0.json", "f1.json", "f2.json", "s.json", "s.tiles.csv"])
    (out / "f2.json").unlink()  # now pending
    (out / "f1.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 7, "started": 0,
                                             "heartbeat": time.time(), "token": "x"}))  # a dead writer's claim

    status = mil_infer("--status", out, "--json", **blocked(hooks, NO_MODEL, no_slides=True))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == {"total": 5, "done": 3, "failed": 1, "pending": 1, "running": 0,
                                         "stale_claims": 1}
    line = mil_infer("--status", out, **blocked(hooks, NO_MODEL, no_slides=True))
    assert line.stdout.strip() == f"{out}: 3 done, 1 failed, 1 pending, 0 running, 1 stale claims (of 5 inputs)"

    refused = mil_infer(inputs[3], "--model", DEMO_MODEL, "--out", tmp_path / "o2", "--cohort",
                        **blocked(hooks, NO_TORCH, no_slides=True))  # the hook does refuse to open slides
    assert refused.returncode == 1 and "a slide was opened" in refused.stderr

    resumed = mil_infer(*inputs, bad, "--model", DEMO_MODEL, "--out", out, "--outputs", "json,csv", "--json")
    assert resumed.returncode == 6  # the failure stands (not retried without --retry-failed)
    printed = [json.loads(line) for line in resumed.stdout.strip().splitlines()]
    assert [doc["input"]["path"] for doc in printed] == [str(p) for p in inputs]
    assert printed[0] == read_output_set(out, "f0").record  # a skipped input prints its record
    summary = resumed.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"cohort {out}: 1 done, 3 skipped (done before), 1 failed, 0 busy")
    with open(out / "predictions.csv", newline="") as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == ["done"] * 4 + ["failed"]
    assert not (out / "f1.lock").exists()


def test_status_of_a_folder_that_is_no_cohort_is_one_line(tmp_path):
    run = mil_infer("--status", tmp_path)
    assert run.returncode == 3 and run.stderr.count("\n") == 1
    assert run.stderr.startswith(f"error: {tmp_path / 'cohort.json'}: no cohort record here")


def test_one_input_runs_as_before_and_several_inputs_resume(tmp_path):
    inputs = [make_h5(tmp_path / f"f{i}.h5", seed=i) for i in range(2)]
    single = tmp_path / "single"
    one = mil_infer(inputs[0], "--model", DEMO_MODEL, "--out", single)  # one input, no cohort option: as before
    assert one.returncode == 0 and sorted(p.name for p in single.iterdir()) == ["f0.json"]
    stamp = (single / "f0.json").stat().st_mtime_ns
    assert mil_infer(inputs[0], "--model", DEMO_MODEL, "--out", single).returncode == 0
    assert (single / "f0.json").stat().st_mtime_ns != stamp and sorted(p.name for p in single.iterdir()) == ["f0.json"]
    out = tmp_path / "out"
    first = mil_infer(*inputs, "--model", DEMO_MODEL, "--out", out)  # several inputs: a cohort run
    assert first.returncode == 0 and "2 done, 0 skipped" in first.stderr
    assert sorted(p.name for p in out.iterdir()) == ["cohort.json", "f0.json", "f1.json", "predictions.csv"]
    stamp = (out / "f0.json").stat().st_mtime_ns
    again = mil_infer(*inputs, "--model", DEMO_MODEL, "--out", out)  # resumes by default: skipped
    assert again.stdout == first.stdout and (out / "f0.json").stat().st_mtime_ns == stamp
    assert "0 done, 2 skipped" in again.stderr
    later = mil_infer(*inputs, "--model", DEMO_MODEL, "--out", out, "--rerun")
    assert later.returncode == 0 and "2 done, 0 skipped" in later.stderr
    assert (out / "f0.json").stat().st_mtime_ns != stamp
    resumed_one = mil_infer(inputs[0], "--model", DEMO_MODEL, "--out", out)  # OUT holds cohort.json: a cohort
    assert "0 done, 1 skipped" in resumed_one.stderr


def test_shard_and_slurm_array_take_disjoint_shares(tmp_path):
    inputs = [make_h5(tmp_path / "in" / f"f{i}.h5", seed=i) for i in range(6)]
    out = tmp_path / "out"
    zero = mil_infer(*inputs, "--model", DEMO_MODEL, "--out", out, "--shard", "0/2", "-q")
    one = mil_infer(*inputs, "--model", DEMO_MODEL, "--out", out, "-q",
                    SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_COUNT="2")
    assert zero.returncode == one.returncode == 0, zero.stderr + one.stderr
    first = {line.split(": ")[0] for line in zero.stdout.splitlines()}
    second = {line.split(": ")[0] for line in one.stdout.splitlines()}
    assert len(first) == len(second) == 3 and first | second == {str(p) for p in inputs}
    assert (out / "cohort.json").is_file()


@pytest.mark.parametrize("args, words", [
    (["--shard", "2/2"], "K must be 0..N-1"),
    (["--retry-failed"], "--retry-failed needs --out"),
    (["--executor", "ray"], "--executor ray needs --out"),
    ([], "Missing option '--model'"),
])
def test_cohort_usage_errors_are_one_line(tmp_path, args, words):
    model = [] if not args else ["--model", DEMO_MODEL]
    shard_out = ["--out", tmp_path / "o"] if args[:1] == ["--shard"] else []
    run = mil_infer(tmp_path / "x.h5", *model, *shard_out, *args)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and words in run.stderr


def test_device_cuda_n_selects_the_gpu_by_index():
    assert _providers("cuda:1", [CUDA_PROVIDER, CPU_PROVIDER]) == [(CUDA_PROVIDER, {"device_id": 1}), CPU_PROVIDER]
    assert _providers("cuda:0", [CUDA_PROVIDER, CPU_PROVIDER]) == [(CUDA_PROVIDER, {"device_id": 0}), CPU_PROVIDER]
    with pytest.raises(DeviceError, match="--device cuda:3"):
        _providers("cuda:3", [CPU_PROVIDER])
    with pytest.raises(DeviceError, match="unknown device"):
        _providers("cuda:x", [CUDA_PROVIDER, CPU_PROVIDER])


def test_cli_device_cuda_n_without_provider_exits_11(tmp_path):
    import onnxruntime

    if CUDA_PROVIDER in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    run = mil_infer(make_h5(tmp_path / "a.h5", seed=1), "--model", DEMO_MODEL, "--device", "cuda:1")
    assert run.returncode == 11 and run.stderr.count("\n") == 1 and "--device cuda:1" in run.stderr
    bad = mil_infer(tmp_path / "a.h5", "--model", DEMO_MODEL, "--device", "gpu:1")
    assert bad.returncode == 2 and "cuda:N" in bad.stderr
