"""Regression and survival models export like classifiers: named outputs per task, metadata that
declares the task, onnxruntime within 1e-4 + 1e-4 |eager| alone and padded, deterministic; old and
classification files keep their metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from mil_export import export_onnx
from mil_export.onnx_export import build_metadata, read_metadata
from mil_export.validate import validate_onnx
from mil_runtime import contract
from mil_runtime.contract import ModelMetadata
from mil_runtime.errors import ModelFormatError
from mil_train.models import create_model, list_models

ONNX_TOL = 1e-4
SIZES = (1, 2, 13, 50)
TASKS = {
    "nll": {"type": "survival", "n_bins": 4, "bin_edges": [0.5, 1.0, 2.0]},
    "cox": {"type": "survival", "loss": "cox"},
    "regression": {"type": "regression", "n_targets": 2, "target_names": ["age", "grade"],
                   "target_mean": [60.0, 2.0], "target_std": [10.0, 1.0]},
}
OUTPUTS = {"nll": ["risk", "hazards", "survival", "attention"], "cox": ["risk", "attention"],
           "regression": ["values", "attention"]}


def small_model(name: str, task: dict, in_dim: int = 8):
    torch.manual_seed(0)
    kwargs = {"att_dim": 16} if name in ("ABMIL", "CLAM_SB", "PatchGCN") else {}
    return create_model(name, in_dim=in_dim, task=task, **kwargs).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder, cache = tmp_path_factory.mktemp("task_models"), {}

    def get(name: str, task_key: str):
        if (name, task_key) not in cache:
            model = small_model(name, TASKS[task_key])
            cache[name, task_key] = model, export_onnx(model, folder / f"{name}-{task_key}.onnx")
        return cache[name, task_key]

    return get


CASES = [("ABMIL", "nll"), ("ABMIL", "cox"), ("ABMIL", "regression"),
         pytest.param("PatchGCN", "nll", marks=pytest.mark.slow), pytest.param("CLAM_SB", "cox", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", ["CLAM_SB", "CLAM_MB", "DSMIL", "IIBMIL"])
def test_per_class_outputs_are_for_classifiers_only(name):
    from mil_export.onnx_export import output_names

    for task_key, task in TASKS.items():
        assert output_names(small_model(name, task)) == OUTPUTS[task_key], (name, task_key)
    torch.manual_seed(0)
    classifier = create_model(name, in_dim=8, n_classes=3)
    assert output_names(classifier)[:3] == list(contract.MIL_OUTPUTS) and len(output_names(classifier)) > 3


@pytest.mark.parametrize("name,task_key", CASES)
def test_outputs_metadata_and_parity(exported, name, task_key):
    model, path = exported(name, task_key)
    proto = onnx.load(str(path))
    assert [o.name for o in proto.graph.output] == OUTPUTS[task_key]  # CLAM's instance output is a classifier's
    meta = read_metadata(path)
    assert meta.task_type == TASKS[task_key]["type"] and meta.outputs == OUTPUTS[task_key]
    task = json.loads({p.key: p.value for p in proto.metadata_props}["milkit.task"])
    assert task["type"] == TASKS[task_key]["type"] and "n_classes" not in task
    if task_key == "nll":
        assert task["bin_edges"] == [0.5, 1.0, 2.0] and task["n_bins"] == 4
    if task_key == "regression":
        assert meta.target_names == ["age", "grade"]
    rows = validate_onnx(path, model, sizes=SIZES)  # alone and padded, padded-vs-alone drift included
    worst = max(rows, key=lambda row: row.scaled)
    assert all(row.passes(ONNX_TOL) for row in rows), f"bag {worst.bag}: {worst.errors}"
    assert set(rows[1].errors) == {*OUTPUTS[task_key], "padded_vs_alone"}


def test_exported_shapes_and_determinism(exported):
    import onnxruntime as ort

    _, path = exported("ABMIL", "nll")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shapes = {o.name: o.shape for o in session.get_outputs()}
    assert shapes == {"risk": ["batch"], "hazards": ["batch", 4], "survival": ["batch", 4],
                      "attention": ["batch", "bag"]}
    features = np.random.default_rng(0).standard_normal((2, 9, 8)).astype(np.float32)
    mask = np.ones((2, 9), dtype=bool)
    mask[1, 5:] = False
    first = session.run(None, {"features": features, "mask": mask})
    second = session.run(None, {"features": features, "mask": mask})
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    risk, hazards, survival, attention = first
    assert np.allclose(survival, np.cumprod(1 - hazards, axis=1), atol=1e-6)  # S_k = prod (1 - h_j)
    assert np.allclose(risk, -survival.sum(axis=1), atol=1e-6)
    assert np.all(attention[1, 5:] == 0)


def test_regression_values_are_in_target_units(exported):
    model, path = exported("ABMIL", "regression")
    from mil_runtime.session import open_session

    features = torch.randn(1, 7, 8, generator=torch.Generator().manual_seed(1))
    values = open_session(path, device="cpu").run({"features": features.numpy(), "mask": np.ones((1, 7), bool)})
    with torch.no_grad():
        raw = model(features).logits  # the standardised prediction
    expected = raw * torch.tensor([10.0, 1.0]) + torch.tensor([60.0, 2.0])
    assert np.allclose(values["values"], expected.numpy(), atol=1e-4, rtol=1e-4)


def test_classification_metadata_is_unchanged():
    torch.manual_seed(0)
    model = create_model("ABMIL", in_dim=8, n_classes=1)
    props = build_metadata(model).to_props()
    assert json.loads(props["milkit.task"]) == {"n_classes": 1, "class_names": ["negative", "positive"],
                                                "activation": "sigmoid"}  # no "type": written as always
    assert json.loads(props["milkit.outputs"]) == ["logits", "probabilities", "attention"]
    assert ModelMetadata.from_props(props).task_type == contract.CLASSIFICATION


def test_contract_refuses_inconsistent_task_metadata():
    model = small_model("ABMIL", TASKS["nll"])
    props = build_metadata(model).to_props()
    wrong = {**props, "milkit.outputs": json.dumps(["logits", "probabilities", "attention"])}
    with pytest.raises(ModelFormatError, match="survival model has the outputs"):
        ModelMetadata.from_props(wrong)
    unknown = {**props, "milkit.task": json.dumps({"type": "segmentation"})}
    with pytest.raises(ModelFormatError, match="upgrade milkit"):
        ModelMetadata.from_props(unknown)
    bins = {**props, "milkit.task": json.dumps({**json.loads(props["milkit.task"]), "bin_edges": [1.0]})}
    with pytest.raises(ModelFormatError, match="bin_edges"):
        ModelMetadata.from_props(bins)


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_every_model_exports_a_survival_head(tmp_path, name):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
    from model_cases import small_config

    config = small_config(name, 8, 1)
    config.pop("n_classes")
    torch.manual_seed(0)
    model = create_model(name, task=TASKS["nll"], **config).eval()
    path = export_onnx(model, tmp_path / f"{name}.onnx")
    rows = validate_onnx(path, model, sizes=(1, 13, 50))
    assert all(row.passes(ONNX_TOL) for row in rows), [row.errors for row in rows]


def test_an_older_file_still_reads_as_a_classifier():
    """models/demo/abmil_demo.onnx predates tasks (and milkit.outputs): it loads and predicts as before."""
    from pathlib import Path

    from mil_runtime.model import load_model

    demo = Path(__file__).resolve().parents[2] / "models" / "demo" / "abmil_demo.onnx"
    if not demo.exists():
        pytest.skip(f"{demo} is missing")
    runner = load_model(demo, device="cpu")
    assert runner.metadata.task_type == contract.CLASSIFICATION and runner.task == contract.CLASSIFICATION
    features = np.random.default_rng(0).standard_normal((5, runner.metadata.feature_dim)).astype(np.float32)
    prediction = runner.predict(features)
    assert prediction.task == contract.CLASSIFICATION and prediction.predicted_name in runner.class_names
    assert prediction.task_outputs() == {} and prediction.class_probabilities.sum() == pytest.approx(1.0, abs=1e-6)
