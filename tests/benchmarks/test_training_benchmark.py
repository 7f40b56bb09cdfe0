"""benchmarks/training.py: both trainers see the same bags in the same order with the same graph, and a smoke
run on ABMIL gives the table's row (its shape and the accuracy check, never its numbers)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "training.py"


def load_script():
    spec = importlib.util.spec_from_file_location("_milkit_bench_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_sides_get_the_same_bags_in_the_same_order_and_the_same_graph():
    pytest.importorskip("torchmil")
    bench = load_script()
    raw = bench.generate_bags(6, (5, 30), seed=3)
    train_m, val_m, train_t, val_t = bench.make_data(raw, 4, graph=True)
    assert len(train_m) == len(train_t) == 4 and len(val_m) == len(val_t) == 2
    for m, t in zip(train_m + val_m, train_t + val_t):
        assert m["X"].data_ptr() == t["X"].data_ptr()  # one tensor, not a copy
        n = m["X"].shape[0]
        dense = torch.zeros(n, n)  # the edge list written out by hand
        for (s, d), w in zip(m["edge_index"].T.tolist(), m["edge_weight"].tolist()):
            dense[s, d] += w
        assert torch.equal(t["adj"].to_dense(), dense)
        assert dense.sum() > 0
    orders = []
    for side, bags in (("milkit", train_m), ("torchmil", train_t)):
        ptrs = {bag["X"].data_ptr(): i for i, bag in enumerate(bags)}
        order = []
        for _ in range(2):  # two epochs: the shuffles agree epoch by epoch
            for batch in bench.loader(bags, side, shuffle=True):
                X = batch["X"][0]
                order.append(next(i for i, bag in enumerate(bags) if torch.equal(bag["X"], X)))
        orders.append(order)
        assert sorted(order[:4]) == list(range(4)) and len(ptrs) == 4
    assert orders[0] == orders[1]
    assert orders[0][:4] != [0, 1, 2, 3] or orders[0][4:] != [0, 1, 2, 3]  # it does shuffle


def test_the_extra_signal_marks_exactly_the_witnesses():
    bench = load_script()
    from mil_train.data.synthetic import synthetic_bags

    plain = synthetic_bags(4, feature_dim=bench.IN_DIM, bag_size=(20, 40), seed=5, with_coords=True)
    raw = bench.generate_bags(4, (20, 40), seed=5)
    for bag, ours in zip(plain, raw):
        shift = ours["X"] - bag["X"]  # (N, D)
        witness = bag["y_inst"] == 1
        assert torch.allclose(shift[witness, : bench.EXTRA_SIGNAL_DIMS], torch.full_like(
            shift[witness, : bench.EXTRA_SIGNAL_DIMS], bench.EXTRA_SHIFT))
        assert torch.count_nonzero(shift[~witness]) == 0 and torch.count_nonzero(shift[:, bench.EXTRA_SIGNAL_DIMS:]) == 0


@pytest.mark.slow
def test_smoke_run_on_abmil_gives_one_row_with_every_variant_the_two_process_one_included(tmp_path):
    pytest.importorskip("torchmil")
    out = tmp_path / "training.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "ABMIL", "--train-bags", "4", "--val-bags", "4", "--epochs", "2",
         "--bag-size", "50,100", "--threads", "1", "--markdown", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ABMIL |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip().strip("|").split("|")]
    assert all(re.fullmatch(r"\d+\.\d s \(\d+\.\d\d\)", c) for c in cells[1:6]), cells  # (a)-(e) all ran
    assert all(re.fullmatch(r"\d+\.\d\dx", c) for c in cells[6:8] + cells[9:10]), cells
    assert "(a = b)" in cells[10], cells  # same weights, same order, no dropout: the same accuracy
    assert float(cells[11]) < 1e-3, cells
