"""benchmarks/classic_mil.py: which models it runs, the same folds for every model, the scores by hand,
and a smoke run through --csv (the table's shape, never its numbers)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "classic_mil.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports benchmarks/musk.py beside it
    try:
        spec = importlib.util.spec_from_file_location("_milkit_bench_classic_mil", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(SCRIPT.parent))


def write_csv(path: Path, n_bags: int = 12, seed: int = 0) -> Path:
    """A classic MIL CSV (instance label, bag id, features): positive bags hold one shifted instance."""
    rng = np.random.default_rng(seed)
    rows = []
    for bag in range(n_bags):
        positive = bag % 2
        for i in range(int(rng.integers(3, 7))):
            witness = positive and i == 0
            features = rng.normal(size=4) + (3.0 if witness else 0.0)
            rows.append([1 if witness else -1, bag, *features])
    np.savetxt(path, np.array(rows), delimiter=",", fmt="%.6g")
    return path


def test_spatial_models_are_listed_not_run_and_naming_one_is_an_error(bench):
    from mil_train.models import get_model_class, list_models

    run, skipped = bench.split_models(None)
    assert sorted(run + skipped + ["Composed"]) == list_models()  # Composed only when named
    for name in skipped:
        cls = get_model_class(name)
        assert cls.uses_graph or cls.uses_coords
    assert "ABMIL" in run and "SmABMIL" in skipped and "SETMIL" in skipped
    with pytest.raises(ValueError, match="SmABMIL need"):
        bench.split_models(["ABMIL", "SmABMIL"])
    with pytest.raises(ValueError, match="unknown model"):
        bench.split_models(["NoSuchMIL"])


def test_every_model_gets_the_same_folds(bench, tmp_path):
    path = str(write_csv(tmp_path / "toy.csv"))
    jobs = bench.jobs_for(["ABMIL", "DSMIL"], {"toy": path}, repeats=2, folds=3, epochs=1)
    assert len(jobs) == 2 * 2 * 3
    by_model = {m: [(j["repeat"], j["fold"], j["train"], j["test"]) for j in jobs if j["model"] == m]
                for m in ("ABMIL", "DSMIL")}
    assert by_model["ABMIL"] == by_model["DSMIL"]
    first = [j for j in jobs if j["model"] == "ABMIL" and j["repeat"] == 0]
    assert sorted(i for j in first for i in j["test"]) == list(range(12))  # each bag held out once a repeat
    assert [j["test"] for j in jobs if j["repeat"] == 0] != [j["test"] for j in jobs if j["repeat"] == 1]


def test_scores_are_over_each_repeats_pooled_predictions(bench):
    # repeat 0: y 1 0 1 0, p .9 .6 .4 .1 -> 2 of 4 right at 0.5; 3 of the 4 positive-negative pairs in order
    # (only .4 < .6 is not) -> AUROC 0.75; repeat 1: all right, AUROC 1
    results = [
        {"model": "M", "dataset": "d", "repeat": 0, "fold": 0, "y": [1, 0], "p": [0.9, 0.6], "seconds": 1.0},
        {"model": "M", "dataset": "d", "repeat": 0, "fold": 1, "y": [1, 0], "p": [0.4, 0.1], "seconds": 2.0},
        {"model": "M", "dataset": "d", "repeat": 1, "fold": 0, "y": [1, 0, 1, 0], "p": [0.7, 0.2, 0.8, 0.3],
         "seconds": 3.0},
    ]
    row = bench.summarise(results, "M", "d")
    assert row["accuracy"] == [0.5, 1.0] and row["auroc"] == [0.75, 1.0] and row["seconds"] == 6.0


def test_smoke_run_through_csv(bench, tmp_path, capsys):
    path = write_csv(tmp_path / "toy.csv")
    out = tmp_path / "out.json"
    assert bench.main(["--models", "ABMIL", "--datasets", "", "--csv", f"toy={path}", "--repeats", "1",
                       "--folds", "2", "--epochs", "1", "--workers", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| ABMIL | toy |" in printed
    import json

    saved = json.loads(out.read_text())
    assert [r["model"] for r in saved["rows"]] == ["ABMIL"] and len(saved["results"]) == 2
    assert sum(len(r["y"]) for r in saved["results"]) == 12  # every bag scored once
