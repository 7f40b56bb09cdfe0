"""`mil-infer` on feature files, run as a real process: results, JSON contents, and every refusal."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mil_runtime.errors import (
    ContractMismatchError,
    InputNotFoundError,
    InvalidInputError,
    ModelFormatError,
    OutputError,
)

from runtime_fixtures import FEATURE_DIM, TILE_PX, grid_coords_px, make_feature_file


def mil_infer(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mil_runtime.cli", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def random_features(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, FEATURE_DIM)).astype(np.float32)


# -- refusals ------------------------------------------------------------------------------------
def _dim_mismatch(tmp: Path, model: Path):
    return make_feature_file(tmp / "dim8.h5", random_features(5)[:, :8]), model


def _nan(tmp: Path, model: Path):
    features = random_features(6)
    features[2, 3] = np.nan
    return make_feature_file(tmp / "nan.h5", features), model


def _inf(tmp: Path, model: Path):
    features = random_features(6)
    features[0, 0] = -np.inf
    return make_feature_file(tmp / "inf.h5", features), model


def _empty(tmp: Path, model: Path):
    return make_feature_file(tmp / "empty.h5", np.zeros((0, FEATURE_DIM), dtype=np.float32)), model


def _not_hdf5(tmp: Path, model: Path):
    path = tmp / "text.h5"
    path.write_text("not an hdf5 file\n")
    return path, model


def _foreign_onnx(tmp: Path, model: Path):
    """A valid ONNX model without milkit metadata."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp / "identity.onnx"))
    return make_feature_file(tmp / "ok.h5", random_features(4)), tmp / "identity.onnx"


def _truncated_onnx(tmp: Path, model: Path):
    data = model.read_bytes()
    (tmp / "half.onnx").write_bytes(data[: len(data) // 2])
    return make_feature_file(tmp / "ok.h5", random_features(4)), tmp / "half.onnx"


def _missing_model(tmp: Path, model: Path):
    return make_feature_file(tmp / "ok.h5", random_features(4)), tmp / "absent.onnx"


def _missing_input(tmp: Path, model: Path):
    return tmp / "absent.h5", model


REFUSALS = {
    "feature-dim-mismatch": (_dim_mismatch, ContractMismatchError, "expects 16-d"),
    "nan-features": (_nan, InvalidInputError, "NaN in 1 row"),
    "inf-features": (_inf, InvalidInputError, "Inf in 1 row"),
    "empty-bag": (_empty, InvalidInputError, "empty"),
    "not-hdf5": (_not_hdf5, InvalidInputError, "not an HDF5 file"),
    "onnx-not-milkit": (_foreign_onnx, ModelFormatError, "not a milkit model"),
    "truncated-onnx": (_truncated_onnx, ModelFormatError, "not a readable ONNX"),
    "missing-model": (_missing_model, InputNotFoundError, "not found"),
    "missing-input": (_missing_input, InputNotFoundError, "not found"),
}


def assert_one_error_line(result: subprocess.CompletedProcess, code: int, words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and words in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert result.returncode == code, result.stderr
    return lines[0]


@pytest.mark.faults
@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal_is_one_line_with_documented_code(tmp_path, binary_model, case):
    build, error, words = REFUSALS[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source, model = build(inputs, binary_model[1])
    out = tmp_path / "out"
    result = mil_infer(source, "--model", model, "--out", out)
    line = assert_one_error_line(result, error.exit_code, words)
    named = model if case in ("onnx-not-milkit", "truncated-onnx", "missing-model") else source
    assert str(named) in line
    assert result.stdout == ""
    assert not out.exists() or list(out.iterdir()) == []  # nothing partial, no temporaries


@pytest.mark.faults
def test_unwritable_out_is_refused_before_anything_runs(tmp_path, binary_model, features_h5):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = mil_infer(features_h5, "--model", binary_model[1], "--out", blocker / "results")
    line = assert_one_error_line(result, OutputError.exit_code, "choose another --out")
    assert str(blocker / "results") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a_file", features_h5.name])
    assert blocker.read_text() == "x"


@pytest.mark.faults
def test_one_bad_input_does_not_stop_the_others(tmp_path, binary_model):
    good_a = make_feature_file(tmp_path / "good_a.h5", random_features(9, seed=1))
    good_b = make_feature_file(tmp_path / "good_b.h5", random_features(3, seed=2))
    features = random_features(5)
    features[4] = np.nan
    bad = make_feature_file(tmp_path / "bad.h5", features)
    out = tmp_path / "out"
    result = mil_infer(good_a, bad, tmp_path / "absent.h5", good_b, "--model", binary_model[1], "--out", out)
    assert result.returncode == InvalidInputError.exit_code  # the first failure's code
    *errors, summary = result.stderr.strip().splitlines()  # several inputs: a cohort run, which sums up last
    assert [line.split(": ")[1] for line in errors] == [str(bad), str(tmp_path / "absent.h5")]
    assert summary.startswith(f"cohort {out}: 2 done, 0 skipped (done before), 2 failed")
    assert "Traceback" not in result.stderr
    printed = result.stdout.strip().splitlines()
    assert [line.split(": ")[0] for line in printed] == [str(good_a), str(good_b)]
    assert sorted(p.name for p in out.iterdir()) == ["absent.failed.json", "bad.failed.json", "cohort.json",
                                                     "good_a.json", "good_b.json", "predictions.csv"]


# -- results ---------------------------------------------------------------------------------------
def test_json_result_contents(tmp_path, multiclass_model):
    model, model_path = multiclass_model
    features = random_features(12, seed=7)
    source = make_feature_file(tmp_path / "slide_b.h5", features, encoder="toy_encoder", encoder_sha256="ab" * 32)
    out = tmp_path / "out"
    result = mil_infer(source, "--model", model_path, "--out", out, "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    written = json.loads((out / "slide_b.json").read_text())
    assert printed == written

    with torch.no_grad():
        eager = model(torch.from_numpy(features)[None])
        probabilities = model.probabilities(eager.logits)[0].numpy()
        attention = eager.attention[0].numpy()
    names = ["normal", "tumor", "other"]
    assert written["input"] == {"path": str(source), "type": "features"}
    assert written["model"]["name"] == "ABMIL"
    assert written["model"]["file"] == str(model_path)
    assert written["model"]["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert written["model"]["class_names"] == names
    assert written["milkit_version"] and written["model"]["milkit_version"]
    assert (written["encoder"]["name"], written["encoder"]["sha256"]) == ("toy_encoder", "ab" * 32)
    assert list(written["probabilities"]) == names
    np.testing.assert_allclose([written["probabilities"][n] for n in names], probabilities, atol=1e-5)
    best = int(np.argmax(probabilities))
    assert written["prediction"] == {
        "class_name": names[best],
        "class_index": best,
        "probability": pytest.approx(float(probabilities[best]), abs=1e-5),
    }
    assert written["n_instances"] == 12
    assert written["device"] == "cpu"
    assert written["mpp"] == {"value": 0.5, "source": "feature-file"}
    assert written["tiling"]["tile_px_level0"] == TILE_PX
    assert set(written["timings_s"]) >= {"read", "predict", "total"}
    assert all(t >= 0 for t in written["timings_s"].values())
    assert written["warnings"] == []
    coords = grid_coords_px(12)
    assert [(t["x"], t["y"]) for t in written["tiles"]] == [tuple(map(int, xy)) for xy in coords]
    np.testing.assert_allclose([t["attention"] for t in written["tiles"]], attention, atol=1e-5)


def test_human_line_and_binary_probabilities(tmp_path, binary_model):
    model, model_path = binary_model
    features = random_features(8, seed=3)
    source = make_feature_file(tmp_path / "slide_c.h5", features)
    result = mil_infer(source, "--model", model_path)
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        p = float(torch.sigmoid(model(torch.from_numpy(features)[None]).logits)[0, 0])
    name, prob = ("positive", p) if p >= 0.5 else ("negative", 1 - p)
    assert result.stdout.strip() == f"{source}: {name} (p={prob:.3f}, 8 instances)"
    assert result.stderr == ""


def test_feature_file_without_coords_warns(tmp_path, binary_model):
    source = tmp_path / "nocoords.h5"
    with h5py.File(source, "w") as h5:
        h5["features"] = random_features(4)
    result = mil_infer(source, "--model", binary_model[1], "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["tiles"][0]["x"] is None and len(printed["tiles"]) == 4
    assert "no coords" in printed["warnings"][0]
    assert result.stderr.startswith("warning: ")


@pytest.mark.faults
def test_unexpected_error_is_one_line_unless_debug(monkeypatch, features_h5, binary_model):
    from click.testing import CliRunner

    from mil_runtime import cli

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "infer_input", broken)
    args = [str(features_h5), "--model", str(binary_model[1])]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {features_h5}: unexpected RuntimeError: boom second line " \
        "(set MILKIT_DEBUG=1 for the traceback)"
    debug = CliRunner().invoke(cli.main, args, env={"MILKIT_DEBUG": "1"})
    assert debug.exit_code == 1 and "Traceback" in debug.stderr


def test_help_documents_exit_codes():
    result = mil_infer("--help")
    assert result.returncode == 0
    for code, words in [(3, "does not exist"), (4, "not a milkit model"), (6, "NaN/Inf"), (7, "cannot be written")]:
        assert any(line.split()[:1] == [str(code)] and words in line for line in result.stdout.splitlines()), code


def test_help_exit_code_table_matches_the_error_classes():
    """--help reads its table from mil_runtime.errors' docstring: it must name every class's code."""
    import inspect
    import re

    from mil_runtime import errors

    documented = {}
    for line in errors.__doc__.splitlines():
        row = re.match(r"\|\s*(\d+)\s*\|\s*(\w+)", line)
        if row and row.group(2)[0].isupper():
            documented[row.group(2)] = int(row.group(1))
    classes = {name: cls.exit_code for name, cls in inspect.getmembers(errors, inspect.isclass)
               if issubclass(cls, errors.MilkitError)}
    assert documented == classes
