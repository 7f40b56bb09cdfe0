"""The runtime on regression and survival models: Prediction per task (equal to eager within
1e-4 + 1e-4 |eager|, padded batches equal to bags alone), mil-infer's JSON and one-line summary, and
the cohort table's risk / value columns. Tests build models with torch; mil_runtime never imports it."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from runtime_fixtures import FEATURE_DIM, export, make_feature_file

ONNX_TOL = 1e-4
SURVIVAL = {"type": "survival", "n_bins": 4, "bin_edges": [0.5, 1.0, 2.0]}
REGRESSION = {"type": "regression", "n_targets": 2, "target_names": ["age", "grade"]}


def task_model(task: dict):
    import torch

    from mil_train.models import create_model

    torch.manual_seed(0)
    return create_model("ABMIL", in_dim=FEATURE_DIM, att_dim=8, task=task).eval()


@pytest.fixture(scope="module")
def survival_model(tmp_path_factory):
    model = task_model(SURVIVAL)
    return model, export(model, tmp_path_factory.mktemp("tasks") / "survival.onnx")


@pytest.fixture(scope="module")
def regression_model(tmp_path_factory):
    model = task_model(REGRESSION)
    return model, export(model, tmp_path_factory.mktemp("tasks") / "regression.onnx")


def eager(model, features: np.ndarray) -> dict:
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(features)[None])
        return {name: value[0].numpy() for name, value in model.task.outputs(out.logits).items()}


def close(actual, expected) -> bool:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return bool(np.all(np.abs(actual - expected) <= ONNX_TOL + ONNX_TOL * np.abs(expected)))


def test_survival_prediction_matches_eager_and_padding(survival_model):
    from mil_runtime.model import load_model

    model, path = survival_model
    runner = load_model(path, device="cpu")
    assert runner.task == "survival" and runner.class_names == []
    rng = np.random.default_rng(0)
    bags = [rng.standard_normal((n, FEATURE_DIM)).astype(np.float32) for n in (5, 17, 1)]
    alone = [runner.predict(bag) for bag in bags]
    batched = runner.predict_batch(bags)
    for bag, one, padded in zip(bags, alone, batched):
        expected = eager(model, bag)
        assert close(one.risk, expected["risk"]) and close(one.hazards, expected["hazards"])
        assert close(one.survival, expected["survival"])
        assert close(padded.risk, one.risk) and close(padded.survival, one.survival)
        assert close(padded.attention, one.attention) and len(padded.attention) == len(bag)
    prediction = alone[0]
    assert prediction.predicted_name is None and math.isnan(prediction.probability)
    assert prediction.logits.size == 0 and prediction.probabilities_by_name() == {}
    assert set(prediction.task_outputs()) == {"risk", "hazards", "survival"}


def test_regression_prediction_is_keyed_by_target(regression_model):
    from mil_runtime.model import load_model

    model, path = regression_model
    features = np.random.default_rng(1).standard_normal((9, FEATURE_DIM)).astype(np.float32)
    prediction = load_model(path, device="cpu").predict(features)
    assert list(prediction.values) == ["age", "grade"]
    assert close(list(prediction.values.values()), eager(model, features)["values"])
    assert prediction.risk is None and prediction.task_outputs() == {"values": prediction.values}


def test_mil_infer_writes_the_task_outputs(tmp_path, survival_model, regression_model):
    from mil_runtime import cli

    rng = np.random.default_rng(2)
    inputs = [make_feature_file(tmp_path / f"s{i}.h5", rng.standard_normal((6 + i, FEATURE_DIM)).astype(np.float32))
              for i in range(2)]
    single = CliRunner().invoke(cli.main, [str(inputs[0]), "--model", str(survival_model[1]), "--out",
                                           str(tmp_path / "one"), "--quiet"])
    assert single.exit_code == 0, single.stderr
    document = json.loads((tmp_path / "one" / "s0.json").read_text())
    assert document["model"]["task"] == "survival" and document["model"]["bin_edges"] == [0.5, 1.0, 2.0]
    assert set(document["prediction"]) == {"risk", "hazards", "survival"} and "probabilities" not in document
    assert len(document["prediction"]["survival"]) == 4 and len(document["tiles"]) == 6
    assert "risk=" in single.stdout + single.stderr

    cohort = CliRunner().invoke(cli.main, [*map(str, inputs), "--model", str(regression_model[1]), "--out",
                                           str(tmp_path / "cohort"), "--quiet"])
    assert cohort.exit_code == 0, cohort.stderr
    with open(tmp_path / "cohort" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["status"] for row in rows] == ["done", "done"]
    assert {"value_age", "value_grade"} <= set(rows[0]) and not any(k.startswith("p_") for k in rows[0])
    record = json.loads((tmp_path / "cohort" / "s1.json").read_text())
    assert float(rows[1]["value_age"]) == pytest.approx(record["prediction"]["values"]["age"])


@pytest.mark.slow
def test_mil_infer_on_a_slide_with_a_survival_model(tmp_path):
    """The slide route: JSON prediction, and the GeoJSON's annotation named and measured by the risk."""
    import warnings
    from pathlib import Path

    from mil_export import export_onnx
    from mil_export.encoders import build_encoder, export_encoder
    from mil_runtime import cli
    from mil_runtime.encoder import encoder_filename, sha256_file

    slide = Path(__file__).resolve().parents[1] / "data" / "CMU-1-Small-Region.svs"
    if not slide.exists():
        pytest.skip(f"{slide} is missing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no pretrained weights: fine for plumbing
        encoder, _ = build_encoder("tiny_cnn")
    encoder_path = export_encoder(encoder, tmp_path / encoder_filename("tiny_cnn"), name="tiny_cnn")
    import torch

    from mil_train.models import create_model

    torch.manual_seed(0)
    model = create_model("ABMIL", in_dim=encoder.output_dim, att_dim=8, task=SURVIVAL).eval()
    path = export_onnx(model, tmp_path / "survival.onnx", tiling={"tile_px": 112, "mpp": 2.0, "overlap": 0.0},
                       encoder={"name": "tiny_cnn", "output_dim": encoder.output_dim,
                                "sha256": sha256_file(encoder_path)})
    run = CliRunner().invoke(cli.main, [str(slide), "--model", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    assert run.exit_code == 0, run.stderr
    document = json.loads((tmp_path / "out" / f"{slide.stem}.json").read_text())
    assert set(document["prediction"]) == {"risk", "hazards", "survival"}
    geojson = json.loads((tmp_path / "out" / f"{slide.stem}.tiles.geojson").read_text())
    annotation = geojson["features"][-1]["properties"]
    assert annotation["measurements"] == {"risk": pytest.approx(document["prediction"]["risk"])}
    assert annotation["name"].startswith("milkit prediction: risk=")


def test_the_service_answers_a_survival_prediction_without_classes(survival_model):
    """mil-serve's prediction body (POST /v1/predict, re-aggregation) for a survival model: its risk and
    curves, as the record has them, and JSON without NaN (a classifier's class_name/probability would be
    None/NaN here)."""
    import json

    pytest.importorskip("fastapi")
    from mil_runtime.model import load_model
    from mil_runtime.serve.app import prediction_body

    _, path = survival_model
    features = np.random.default_rng(3).normal(size=(12, FEATURE_DIM)).astype(np.float32)
    prediction = load_model(path).predict(features)
    body = json.loads(json.dumps(prediction_body(prediction, None, 12), allow_nan=False))
    assert body["prediction"] == json.loads(json.dumps(prediction.task_outputs()))
    assert "probabilities" not in body and body["n_tiles"] == 12 and len(body["attention"]) == 12
