"""benchmarks/digit_bags.py: a smoke run gives one row per number of training bags (the shape of the
table and scores in [0, 1], never their values)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "digit_bags.py"


def test_smoke_run_gives_one_row_per_size(capsys):
    spec = importlib.util.spec_from_file_location("_milkit_bench_digit_bags", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--train-bags", "6,8", "--test-bags", "30", "--seeds", "1", "--epochs", "1",
                       "--workers", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines[1:]] == ["6", "8"]
    for line in lines[1:]:
        bag, inst = (float(cell.split("±")[0]) for cell in line.split("|")[2:4])
        assert 0.0 <= bag <= 1.0 and 0.0 <= inst <= 1.0
