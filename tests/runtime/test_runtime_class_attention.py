"""Per-class attention in the runtime: metadata, Prediction.attention_by_class, and mil-infer's outputs.

The model is the test-only ToyClassAttention (tests/class_attention_toy.py), exported here; the
slide runs use a generated synthetic slide and the demo bundle's tiny_cnn encoder.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from class_attention_toy import toy_model
from PIL import Image

from mil_runtime import contract
from mil_runtime.contract import ModelMetadata
from mil_runtime.errors import ModelFormatError
from mil_runtime.features_io import read_feature_file
from mil_runtime.model import load_model
from mil_runtime.outputs.writer import class_file_labels
from mil_runtime.session import open_session

from runtime_fixtures import FEATURE_DIM, export, make_feature_file

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo"
ENCODER = DEMO / "tiny_cnn.onnx"  # 64-d features, 128 px tiles
CLASS_NAMES = ["normal", "tumor", "other"]
SLIDE_CLASSES = ["stroma", "tumor/high grade", "Stroma"]  # a "/" and a case-only clash
SLIDE_LABELS = ["stroma", "tumor_high_grade", "Stroma_2"]
ATOL = RTOL = 1e-4
BASE_SUFFIXES = (".json", ".heatmap.png", ".tissue.png", ".tiles.geojson", ".tiles.csv", ".features.h5")


def mil_infer(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mil_runtime.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(eager toy model on 16-d features, its .onnx with class names)."""
    model = toy_model(FEATURE_DIM, 3, seed=4)
    return model, export(model, tmp_path_factory.mktemp("toy") / "toy.onnx", class_names=CLASS_NAMES)


@pytest.fixture(scope="module")
def slide_toy(tmp_path_factory) -> Path:
    """A toy on tiny_cnn features (128 px tiles at 1 um/px), tiny_cnn.onnx beside it."""
    from mil_export import export_onnx

    folder = tmp_path_factory.mktemp("slide_toy")
    shutil.copy(ENCODER, folder / ENCODER.name)
    encoder = open_session(ENCODER, device="cpu")
    ref = {"name": encoder.metadata.model_name, "output_dim": encoder.metadata.feature_dim, "sha256": encoder.sha256}
    model = toy_model(encoder.metadata.feature_dim, 3, seed=5)
    return export_onnx(model, folder / "toy_slide.onnx", class_names=SLIDE_CLASSES, encoder=ref,
                       tiling={"tile_px": 128, "mpp": 1.0, "overlap": 0.0})


@pytest.fixture(scope="module")
def slide_run(slide_toy, tmp_path_factory):
    """mil-infer on a generated 1024 px slide: (out folder, stem, the JSON it printed)."""
    from mil_runtime.demo import write_synthetic_slide

    folder = tmp_path_factory.mktemp("slide_run")
    slide = write_synthetic_slide(folder / "synthetic.svs", height=1024, width=1024, mpp=1.0, lesions=1, seed=3)
    out = folder / "out"
    run = mil_infer(slide.path, "--model", slide_toy, "--out", out, "--json", "--quiet")
    assert run.returncode == 0, run.stderr
    return out, slide.path.stem, json.loads(run.stdout)


# -- contract ------------------------------------------------------------------------------------
def _mil_metadata(**overrides) -> ModelMetadata:
    values = dict(kind="mil", model_name="Toy", feature_dim=4, inputs=["features", "mask"], n_classes=3,
                  class_names=["a", "b", "c"], activation="softmax")
    return ModelMetadata(**{**values, **overrides})


def test_outputs_key_round_trips_and_defaults_to_the_standard_outputs():
    meta = _mil_metadata(outputs=[*contract.MIL_OUTPUTS, contract.ATTENTION_BY_CLASS])
    props = meta.to_props()
    assert json.loads(props["milkit.outputs"]) == [*contract.MIL_OUTPUTS, contract.ATTENTION_BY_CLASS]
    assert ModelMetadata.from_props(props).has_class_attention
    del props["milkit.outputs"]  # a file written before the key existed
    old = ModelMetadata.from_props(props)
    assert old.outputs == list(contract.MIL_OUTPUTS) and not old.has_class_attention
    assert json.loads(_mil_metadata().to_props()["milkit.outputs"]) == list(contract.MIL_OUTPUTS)
    encoder = ModelMetadata(kind="encoder", model_name="toy", feature_dim=4, inputs=["tiles"])
    assert encoder.outputs == [contract.ENCODER_OUTPUT]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"outputs": ["logits", "probabilities", "attention", "saliency"]}, r"unknown outputs \['saliency'\]"),
        ({"outputs": ["logits", "attention"]}, r"no output \['probabilities'\]"),
        ({"outputs": ["logits", "probabilities", "attention", "attention"]}, "twice"),
        ({"outputs": [*contract.MIL_OUTPUTS, "attention_by_class"], "n_classes": 1,
          "class_names": ["neg", "pos"], "activation": "sigmoid"}, "binary model"),
        ({"class_names": ["a", "b", "a"]}, "not unique"),
    ],
)
def test_bad_outputs_metadata_is_refused_with_a_message(overrides, message):
    props = _mil_metadata().to_props()
    for key, value in overrides.items():  # edit the stored strings, as a foreign writer would
        if key == "outputs":
            props["milkit.outputs"] = json.dumps(value)
        else:
            task = json.loads(props["milkit.task"])
            task[key] = value
            props["milkit.task"] = json.dumps(task)
    with pytest.raises(ModelFormatError, match=message):
        ModelMetadata.from_props(props, source="edited.onnx")


def test_outputs_key_that_is_not_a_list_is_refused():
    props = _mil_metadata().to_props()
    props["milkit.outputs"] = json.dumps("logits")
    with pytest.raises(ModelFormatError, match="JSON list"):
        ModelMetadata.from_props(props)


def test_encoder_with_other_outputs_is_refused():
    with pytest.raises(ModelFormatError, match="one output"):
        ModelMetadata(kind="encoder", model_name="e", feature_dim=4, inputs=["tiles"], outputs=["x"]).validate()


def test_graph_outputs_must_match_the_metadata(multiclass_model, tmp_path):
    """A file that promises attention_by_class its graph lacks is refused at load."""
    _, path = multiclass_model
    proto = onnx.load(str(path))
    for entry in proto.metadata_props:
        if entry.key == "milkit.outputs":
            entry.value = json.dumps([*contract.MIL_OUTPUTS, contract.ATTENTION_BY_CLASS])
    edited = tmp_path / "edited.onnx"
    onnx.save(proto, str(edited))
    with pytest.raises(ModelFormatError, match="graph outputs .* differ from milkit.outputs"):
        load_model(edited, device="cpu")


def test_class_file_labels_are_safe_and_unique():
    labels = class_file_labels(["a/b", "a_b", "Tumor", "tumor", "", "x" * 300])
    assert list(labels.values()) == ["a_b", "a_b_1", "Tumor", "tumor_3", "class_4", "x" * 64]
    assert class_file_labels(SLIDE_CLASSES) == dict(zip(SLIDE_CLASSES, SLIDE_LABELS))


# -- predictions ---------------------------------------------------------------------------------
def test_predict_returns_one_map_per_class_matching_eager(toy):
    import torch

    model, path = toy
    runner = load_model(path, device="cpu")
    assert runner.has_class_attention
    rng = np.random.default_rng(0)
    bags = [rng.standard_normal((n, FEATURE_DIM)).astype(np.float32) for n in (1, 13, 40)]
    predictions = runner.predict_batch(bags)
    for bag, prediction in zip(bags, predictions):
        with torch.inference_mode():
            out = model(torch.from_numpy(bag)[None])
        eager = out.attention_by_class[0].numpy()  # (n_classes, N)
        by_class = prediction.attention_by_class
        assert list(by_class) == CLASS_NAMES
        stacked = np.stack(list(by_class.values()))  # (n_classes, N)
        assert stacked.shape == (3, len(bag)) and stacked.dtype == np.float32
        assert np.all(np.abs(stacked - eager) <= ATOL + RTOL * np.abs(eager))
        np.testing.assert_allclose(stacked.sum(1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(prediction.attention, by_class[prediction.predicted_name])
        alone = runner.predict(bag)  # padding in the batch changed nothing
        for name in CLASS_NAMES:
            np.testing.assert_allclose(alone.attention_by_class[name], by_class[name], rtol=0, atol=1e-6)


def test_models_with_one_map_have_no_per_class_attention(multiclass_model, binary_model, features_h5):
    features = read_feature_file(features_h5).features
    for _, path in (multiclass_model, binary_model):
        runner = load_model(path, device="cpu")
        assert not runner.has_class_attention
        assert runner.predict(features).attention_by_class is None


def test_old_demo_bundle_without_outputs_key_still_works():
    """models/demo/abmil_demo.onnx predates milkit.outputs: read as the three standard outputs."""
    path = DEMO / "abmil_demo.onnx"
    assert "milkit.outputs" not in {e.key for e in onnx.load(str(path), load_external_data=False).metadata_props}
    runner = load_model(path, device="cpu")
    assert runner.metadata.outputs == list(contract.MIL_OUTPUTS) and not runner.has_class_attention
    prediction = runner.predict(np.random.default_rng(0).standard_normal((9, 64)).astype(np.float32))
    assert prediction.attention.shape == (9,) and prediction.attention_by_class is None
    assert prediction.predicted_name in ("clean", "lesion")


# -- mil-infer -----------------------------------------------------------------------------------
def _tile_maps(doc: dict, names) -> np.ndarray:
    """(n_classes, N) per-tile attention_by_class of a JSON result."""
    return np.array([[tile["attention_by_class"][name] for tile in doc["tiles"]] for name in names])


def test_mil_infer_on_a_feature_file_reports_attention_by_class(toy, tmp_path):
    _, path = toy
    features = np.random.default_rng(1).standard_normal((23, FEATURE_DIM)).astype(np.float32)
    h5 = make_feature_file(tmp_path / "bag.h5", features)
    out = tmp_path / "out"
    run = mil_infer(h5, "--model", path, "--out", out, "--json")
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["bag.json"]  # feature files give the JSON only
    doc = json.loads((out / "bag.json").read_text())
    assert doc == json.loads(run.stdout)
    expected = load_model(path, device="cpu").predict(features)
    maps = _tile_maps(doc, CLASS_NAMES)
    np.testing.assert_allclose(maps, np.stack(list(expected.attention_by_class.values())), rtol=0, atol=1e-7)
    assert all(set(tile["attention_by_class"]) == set(CLASS_NAMES) for tile in doc["tiles"])
    predicted = doc["prediction"]["class_name"]
    np.testing.assert_allclose([t["attention"] for t in doc["tiles"]], maps[CLASS_NAMES.index(predicted)])


def test_mil_infer_without_per_class_maps_adds_no_field(multiclass_model, features_h5):
    _, path = multiclass_model
    run = mil_infer(features_h5, "--model", path, "--json")
    assert run.returncode == 0, run.stderr
    assert all("attention_by_class" not in tile for tile in json.loads(run.stdout)["tiles"])


def test_mil_infer_on_a_slide_writes_one_heatmap_per_class(slide_run):
    out, stem, printed = slide_run
    expected = sorted([f"{stem}{s}" for s in BASE_SUFFIXES] + [f"{stem}.heatmap.{lb}.png" for lb in SLIDE_LABELS])
    assert sorted(p.name for p in out.iterdir()) == expected  # and no temporaries
    doc = json.loads((out / f"{stem}.json").read_text())
    assert doc == printed
    for name, label in zip(SLIDE_CLASSES, SLIDE_LABELS):
        assert doc["outputs"][f"heatmap.{name}"] == str(out / f"{stem}.heatmap.{label}.png")
    n = doc["n_instances"]
    assert n > 10
    maps = _tile_maps(doc, SLIDE_CLASSES)  # (3, N)
    np.testing.assert_allclose(maps.sum(1), 1.0, atol=1e-5)
    predicted = doc["prediction"]["class_name"]
    np.testing.assert_allclose([t["attention"] for t in doc["tiles"]], maps[SLIDE_CLASSES.index(predicted)])

    # heatmaps: each class's PNG shows its own map; the plain heatmap is the predicted class's
    plain = np.asarray(Image.open(out / f"{stem}.heatmap.png"))
    per_class = {name: np.asarray(Image.open(out / f"{stem}.heatmap.{label}.png"))
                 for name, label in zip(SLIDE_CLASSES, SLIDE_LABELS)}
    assert all(image.shape == plain.shape for image in per_class.values())
    np.testing.assert_array_equal(per_class[predicted], plain)
    assert any(not np.array_equal(image, plain) for image in per_class.values())

    with open(out / f"{stem}.tiles.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[-4:] == ["attention", *(f"attention_{name}" for name in SLIDE_CLASSES)]
    assert len(rows) == n
    for c, name in enumerate(SLIDE_CLASSES):
        np.testing.assert_allclose([float(r[f"attention_{name}"]) for r in rows], maps[c], rtol=1e-6)

    geo = json.loads((out / f"{stem}.tiles.geojson").read_text())
    tile_features = [f for f in geo["features"] if f["properties"]["objectType"] == "tile"]
    assert len(tile_features) == n and len(geo["features"]) == n + 1  # plus the prediction's annotation
    for tile, feature in zip(doc["tiles"], tile_features):
        measurements = feature["properties"]["measurements"]
        assert set(measurements) == {"attention", "attention_rank", "attention_percentile", "tissue_fraction",
                                     *(f"attention_{c}" for c in SLIDE_CLASSES)}
        for name in SLIDE_CLASSES:
            assert measurements[f"attention_{name}"] == pytest.approx(tile["attention_by_class"][name], abs=1e-7)


def test_the_slide_feature_file_gives_the_same_maps(slide_run, slide_toy):
    out, stem, printed = slide_run
    run = mil_infer(out / f"{stem}.features.h5", "--model", slide_toy, "--json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    np.testing.assert_allclose(_tile_maps(doc, SLIDE_CLASSES), _tile_maps(printed, SLIDE_CLASSES), rtol=0, atol=1e-5)
    assert [(t["x"], t["y"]) for t in doc["tiles"]] == [(t["x"], t["y"]) for t in printed["tiles"]]


def test_a_failure_while_writing_leaves_no_per_class_heatmap(slide_toy, slide_run, tmp_path, monkeypatch):
    """The per-class heatmaps are staged with the rest: a failure later leaves nothing."""
    from mil_runtime.encoder import load_encoder
    from mil_runtime.outputs import writer
    from mil_runtime.pipeline import run_slide

    out, stem, _ = slide_run
    slide = out.parent / f"{stem}.svs"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writer, "write_tiles_csv", broken)  # after every heatmap is staged
    target = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        run_slide(slide, load_model(slide_toy, device="cpu"), load_encoder(ENCODER, device="cpu"), out_dir=target)
    assert list(target.iterdir()) == []
