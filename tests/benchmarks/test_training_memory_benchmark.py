"""benchmarks/training_memory.py: a worker trains and measures, the guard kills a worker over its memory
limit, and a model that cannot train at a size says what limits it (declared N x N attention, or a limit
hit at a smaller size)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "training_memory.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("_milkit_bench_training_memory", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_grid_coords_fill_a_near_square_grid_row_by_row():
    bench = load_bench()
    assert bench.grid_coords(5).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1]]


def test_worker_trains_the_model_and_reports_speed_and_memory():
    bench = load_bench()
    result = bench.worker({"model": "ABMIL", "size": 64, "steps": 2, "device": "cpu", "threads": 1})
    assert result["bags_per_s"] > 0 and result["seconds"] > 0
    assert 0 < result["peak_mb"] <= result["process_peak_mb"] + 1e-6
    assert result["cuda_peak_mb"] is None


def test_graph_models_train_on_their_own_graph():
    bench = load_bench()
    from mil_train.models import create_model

    bag = bench.make_training_bag(create_model("SmABMIL", in_dim=bench.IN_DIM, n_classes=1), 9)
    # grid8 on a full 3 x 3 grid: 4 corners x 3 + 4 edges x 5 + centre x 8 = 40 directed edges.
    assert bag["edge_index"].shape == (2, 40)


def test_guard_kills_a_worker_over_its_memory_limit():
    bench = load_bench()
    spec = {"model": "ABMIL", "size": 64, "steps": 1, "device": "cpu", "threads": 1}
    result = bench.run_guarded(spec, limit_mb=40, timeout=60)  # importing torch alone passes 40 MB
    assert result["killed"].startswith("memory limit")


def test_limits_are_named_and_larger_sizes_skipped(monkeypatch):
    bench = load_bench()
    assert bench.attention_limit("ABMIL", 50_000) is None
    assert "N x N attention" in bench.attention_limit("TransformerABMIL", 50_000)
    calls = []

    def fake_guard(spec, limit_mb, timeout):  # the 10,000 run hits the time limit
        calls.append(spec["size"])
        return {"killed": "time limit (> 1 s)"} if spec["size"] >= 10_000 else {
            "bags_per_s": 2.0, "seconds": 1.0, "peak_mb": 900.0, "process_peak_mb": 950.0, "cuda_peak_mb": None}

    monkeypatch.setattr(bench, "run_guarded", fake_guard)
    args = argparse.Namespace(steps=2, device="cpu", threads=1, limit_gb=6.0, timeout=1.0)
    (row,) = bench.measure(["ABMIL"], [1_000, 10_000, 50_000], args, log=lambda text: None)
    assert calls == [1_000, 10_000]
    assert bench.cell(row["cells"][50_000]) == "not run: limited at 10,000"
    assert bench.cell(row["cells"][1_000]).startswith("2 bags/s, 0.88 GB")
