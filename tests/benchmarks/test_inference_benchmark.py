"""benchmarks/inference.py: a smoke run on ABMIL at a tiny size (the table's shape, never its timings),
and the skips (max_bag_size, no torchmil counterpart) without running anything."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "inference.py"
NUMBER = r"[\d,]+(\.\d+)?"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("_milkit_bench_inference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(section: str, first_header_cell: str) -> tuple[list[str], list[list[str]]]:
    """Header cells and body rows of the markdown table whose header starts with `first_header_cell`."""
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header_cell} |"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, separator, body = table[0], table[1], table[2:]
    assert all(set(cell) == {"-"} for cell in separator) and len(separator) == len(header)
    return header, body


@pytest.mark.slow
def test_smoke_run_on_abmil_gives_one_full_row_per_table(tmp_path):
    out = tmp_path / "section.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "ABMIL", "--sizes", "40", "--repeats", "1", "--markdown", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    section = out.read_text()
    assert section.lstrip().startswith("## Inference time and memory")
    assert re.search(r"Machine: .+, \d+ cores .*torch .*onnxruntime .*torchmil ", section)

    header, body = table_rows(section, "model")
    assert len(header) == 10 and len(body) == 1
    row = body[0]
    assert len(row) == len(header) and row[:2] == ["ABMIL", "40"]
    assert all(re.fullmatch(NUMBER, cell) for cell in row[2:6]), row  # (a)-(d): one median each
    assert all(re.fullmatch(NUMBER + "x", cell) for cell in row[6:8]), row  # the two ratios
    assert float(row[8]) < 1e-4, row  # the four variants compute the same thing
    assert row[9] == ""  # nothing skipped

    memory_header, memory_body = table_rows(section[section.index("Peak RSS"):], "model")
    assert len(memory_header) == 6 and len(memory_body) == 1
    assert memory_body[0][:2] == ["ABMIL", "40"]
    assert all(re.fullmatch(r"[\d,]+ \(\+[\d,]+\)", cell) for cell in memory_body[0][2:]), memory_body[0]


def test_sizes_above_max_bag_size_are_skipped_without_running(bench, monkeypatch):
    def no_worker(*args, **kwargs):
        raise AssertionError("a skipped size must not start a measuring process")

    monkeypatch.setattr(bench, "run_worker", no_worker)
    spec = {"name": "Quadratic", "max_bag_size": 5_000, "skip": {}}
    row = bench.measure(spec, 10_000, repeats=1, memory=True, timeout=1)
    assert row["note"] == "exceeds max_bag_size (5,000)" and row["median_s"] == {}
    header, body = table_rows(bench.time_table([row]), "model")
    assert body == [["Quadratic", "10,000", *["—"] * 7, "exceeds max_bag_size (5,000)"]]


def test_a_model_without_torchmil_counterpart_runs_the_other_variants(bench, monkeypatch):
    seen = []

    def fake_worker(spec, timeout):
        seen.append((spec["mode"], spec.get("variant"), tuple(spec["variants"])))
        if spec["mode"] == "time":
            return {"median_s": {v: 0.002 for v in spec["variants"]}, "max_diff_vs_milkit": {"ort_predict": 1e-7},
                    "errors": {}}
        return {"peak_mb": 900.0, "rise_mb": 12.0, "reset": True}

    monkeypatch.setattr(bench, "run_worker", fake_worker)
    spec = {"name": "OursOnly", "max_bag_size": None, "skip": {"torchmil": bench.NO_COUNTERPART}}
    row = bench.measure(spec, 1_000, repeats=1, memory=True, timeout=1)
    assert seen[0] == ("time", None, ("milkit", "ort_predict", "ort_session"))
    assert [variant for _, variant, _ in seen[1:]] == ["milkit", "ort_predict", "ort_session"]
    _, body = table_rows(bench.time_table([row]), "model")
    assert body[0][2] == "—" and body[0][3:6] == ["2.00"] * 3
    assert body[0][6] == "—" and body[0][7] == "1.00x"
    assert body[0][9] == "(a) no torchmil counterpart"
    _, memory_body = table_rows(bench.memory_table([row]), "model")
    assert memory_body[0][2:] == ["—", "900 (+12)", "900 (+12)", "900 (+12)"]


def test_prepare_model_marks_a_model_without_adapter(bench, tmp_path, monkeypatch):
    import mil_export
    from mil_train.models import ABMIL, registry

    class NoAdapterABMIL(ABMIL):
        name = "_TestNoAdapterABMIL"

    def fake_export(model, path):  # the real export is covered by the smoke run
        path.write_bytes(b"onnx")
        return path

    monkeypatch.setitem(registry._REGISTRY, NoAdapterABMIL.name, NoAdapterABMIL)
    monkeypatch.setattr(mil_export, "export_onnx", fake_export)
    spec = bench.prepare_model(NoAdapterABMIL.name, tmp_path)
    assert spec["skip"] == {"torchmil": bench.NO_COUNTERPART}
    assert Path(spec["onnx"]).is_file() and Path(spec["milkit_state"]).is_file() and "torchmil_state" not in spec
    assert spec["config"]["in_dim"] == 1024 and spec["config"]["n_classes"] == 1


def test_prepare_model_with_torchmil_counterpart_saves_both_weights(bench, tmp_path, monkeypatch):
    import mil_export
    import torch

    monkeypatch.setattr(mil_export, "export_onnx", lambda model, path: path)
    spec = bench.prepare_model("ABMIL", tmp_path)
    assert spec["skip"] == {}
    torchmil_state = torch.load(spec["torchmil_state"], weights_only=True)
    milkit_state = torch.load(spec["milkit_state"], weights_only=True)
    # milkit's model holds torchmil's weights: the attention's first layer is the same tensor
    assert torch.equal(milkit_state["pool.V.0.weight"], torchmil_state["pool.fc1.module.weight"])
