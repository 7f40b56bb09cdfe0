"""Labels with time/event or target columns (mil_train.data.readers.read_label_table) and
`mil-train --task survival|regression` on a folder of feature files."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mil_train.data.readers import read_label_table
from mil_train.tasks import survival_bin_edges
from mil_train.tasks.labels import prepare_task


def write_table(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_read_label_table(tmp_path):
    table = write_table(tmp_path / "t.csv", ["slide_id", "time", "event", "age"],
                        [["a.svs", "12.5", "1", "61"], ["b", "3", "0", "70"]])
    labels = read_label_table(table, ["time", "event"], survival=True)
    assert list(labels) == ["a", "b"] and labels["a"].tolist() == [12.5, 1.0] and labels["b"].dtype == np.float32
    assert read_label_table(table, ["age"])["b"].tolist() == [70.0]
    bad = write_table(tmp_path / "bad.csv", ["slide_id", "time", "event"], [["a", "1", "1"], ["b", "", "0"]])
    with pytest.raises(ValueError, match="line 3: the time cell is empty"):
        read_label_table(bad, ["time", "event"], survival=True)
    event = write_table(tmp_path / "event.csv", ["slide_id", "time", "event"], [["a", "1", "2"]])
    with pytest.raises(ValueError, match="event 0 \\(censored\\) or 1"):
        read_label_table(event, ["time", "event"], survival=True)
    with pytest.raises(ValueError, match="no column os_months"):
        read_label_table(table, ["os_months", "event"], survival=True)


def test_prepare_task_fills_bins_and_scaling():
    from mil_train.data.bag import make_bag

    times, events = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1, 1, 0, 1, 1, 0]
    bags = [make_bag(np.zeros((2, 4), np.float32), np.array([t, e], np.float32)) for t, e in zip(times, events)]
    task, strata = prepare_task("survival", {"n_bins": 2}, bags)
    assert task["bin_edges"] == pytest.approx(survival_bin_edges(times, events, 2)) and strata == events
    task, _ = prepare_task("survival", {"loss": "cox"}, bags)
    assert "bin_edges" not in task
    targets = [make_bag(np.zeros((2, 4), np.float32), np.float32(v)) for v in (1.0, 3.0)]
    task, _ = prepare_task("regression", {}, targets, target_names=["age"])
    assert task["target_mean"] == [2.0] and task["target_std"] == [1.0] and task["target_names"] == ["age"]


@pytest.fixture(scope="module")
def feature_folder(tmp_path_factory):
    from mil_runtime.features_io import write_feature_file
    from mil_train.tasks.synthetic import planted_survival_bags

    root = tmp_path_factory.mktemp("task_cli")
    rows = []
    for i, bag in enumerate(planted_survival_bags(24, seed=4)):
        features = bag["X"].numpy()
        coords = np.stack([np.arange(len(features)) * 256, np.zeros(len(features))], axis=1).astype(np.int64)
        write_feature_file(root / f"s{i:02d}.h5", features, coords, 256, mpp=0.5)
        rows.append([f"s{i:02d}", float(bag["Y"][0]), int(bag["Y"][1]), 50 + i])
    write_table(root / "labels.csv", ["slide_id", "os", "dead", "age"], rows)
    return root, rows


def test_mil_train_survival_and_regression(tmp_path, feature_folder):
    from mil_train import cli
    from mil_train.checkpoint import load_checkpoint

    root, rows = feature_folder
    common = [str(root), "--labels", str(root / "labels.csv"), "--epochs", "2", "--batch-size", "4",
              "--model-arg", "att_dim=8"]
    survival = CliRunner().invoke(cli.main, ["ABMIL", *common, "-o", str(tmp_path / "s.pt"), "--task", "survival",
                                             "--label-columns", "os,dead", "--task-arg", "n_bins=3"])
    assert survival.exit_code == 0, survival.output
    model, payload = load_checkpoint(tmp_path / "s.pt")
    times, events = [r[1] for r in rows], [r[2] for r in rows]
    assert model.task.type == "survival" and model.task.n_bins == 3
    assert model.task.bin_edges == pytest.approx(survival_bin_edges(times, events, 3), rel=1e-6)
    assert "val_c_index" in payload["provenance"]["metrics"]

    regression = CliRunner().invoke(cli.main, ["ABMIL", *common, "-o", str(tmp_path / "r.pt"), "--task", "regression",
                                               "--label-columns", "age", "--task-arg", "loss=huber"])
    assert regression.exit_code == 0, regression.output
    model, payload = load_checkpoint(tmp_path / "r.pt")
    assert model.task.loss_name == "huber" and model.task.target_names == ["age"]
    assert model.task.target_mean == pytest.approx([np.mean([r[3] for r in rows])])
    assert {"val_mae", "val_r2"} <= set(payload["provenance"]["metrics"])

    refused = CliRunner().invoke(cli.main, ["ABMIL", *common, "-o", str(tmp_path / "x.pt"), "--task", "survival",
                                            "--class-weights", "auto"])
    assert refused.exit_code != 0 and "balance classes" in refused.output


@pytest.mark.slow
def test_train_export_infer_a_regression_model(tmp_path, feature_folder):
    """mil-train -> mil-export model -> mil-infer: the target name travels from --label-columns to the JSON."""
    import json

    from mil_export.cli import main as export_main
    from mil_runtime import cli as infer_cli
    from mil_train import cli

    root, rows = feature_folder
    trained = CliRunner().invoke(cli.main, ["ABMIL", str(root), "--labels", str(root / "labels.csv"), "--epochs", "2",
                                            "--model-arg", "att_dim=8", "-o", str(tmp_path / "r.pt"),
                                            "--task", "regression", "--label-columns", "age"])
    assert trained.exit_code == 0, trained.output
    exported = CliRunner().invoke(export_main, ["model", str(tmp_path / "r.pt"), "-o", str(tmp_path / "r.onnx")])
    assert exported.exit_code == 0, exported.output
    inferred = CliRunner().invoke(infer_cli.main, [str(root / "s00.h5"), "--model", str(tmp_path / "r.onnx"), "--json"])
    assert inferred.exit_code == 0, inferred.stderr
    document = json.loads(inferred.stdout)
    assert document["model"]["target_names"] == ["age"] and list(document["prediction"]["values"]) == ["age"]
    assert 40 < document["prediction"]["values"]["age"] < 90  # in the target's units (ages 50-73), not standardised
