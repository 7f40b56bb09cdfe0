"""The optional `instance_probabilities` output (batch, bag, n_classes) of models with an instance classifier.

DSMIL, CLAM_SB, CLAM_MB and IIBMIL, binary and 3-class, each exported once per module. Checked: the graph
and metadata list the output with the contract's axes; onnxruntime matches eager PyTorch
(|ort - eager| <= 1e-4 + 1e-4 * |eager|, DESIGN section 7); a bag alone equals the same bag padded in a
batch (padding holding 1e30 and NaN), with exactly 0 on padding; `mil-export validate` compares it; the
runtime's `Prediction.instance_probabilities` is {class name: (N,)} (binary: the positive class); and
each model's numbers mean what the model card says, computed independently in numpy from the weights.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from mil_export import export_onnx, validate_onnx
from mil_export.onnx_export import example_inputs, output_names
from mil_export.validate import PADDING_ERROR, format_table
from mil_runtime import contract
from mil_runtime.errors import ContractMismatchError, MilkitError, ModelFormatError
from mil_runtime.model import load_model
from mil_train.models import MILOutput, create_model, list_models
from mil_train.models.base import has_instance_classifier
from mil_train.models.clam import CLAM_SB

IN_DIM = 12
ATOL = RTOL = 1e-4
WITH_INSTANCE_CLASSIFIER = ("DSMIL", "CLAM_SB", "CLAM_MB", "IIBMIL")
CONFIGS = {"DSMIL": {"att_dim": 16}, "CLAM_SB": {"att_dim": 16}, "CLAM_MB": {"att_dim": 16},
           "IIBMIL": {"att_dim": 16}}
CLASS_NAMES = {1: ["benign", "tumor"], 3: ["normal", "tumor", "stroma"]}
CASES = [(name, n) for name in WITH_INSTANCE_CLASSIFIER for n in (1, 3)]
INSIDE_GAIN = 2.0  # CLAM cases: classifier c's "inside" logit is INSIDE_GAIN * x_c, its "outside" logit 0


def _within(ort: np.ndarray, eager: np.ndarray) -> float:
    """Largest violation of |a - b| <= atol + rtol * |b| (<= 0 when within)."""
    return float((np.abs(ort - eager) - (ATOL + RTOL * np.abs(eager))).max(initial=-1.0))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _hand_set_clam_classifiers(model) -> None:
    """Classifier c (of the clustering's 2 for binary, n_classes otherwise) scores inside = 2 * x_c, outside = 0."""
    with torch.no_grad():
        for c, classifier in enumerate(model.instance.classifiers):
            classifier.weight.zero_()
            classifier.bias.zero_()
            classifier.weight[1, c] = INSIDE_GAIN  # row 1 = INSIDE (mil_train.nn.instance_classifier)


def build(name: str, n_classes: int):
    torch.manual_seed(0)
    model = create_model(name, in_dim=IN_DIM, n_classes=n_classes, **CONFIGS[name]).eval()
    if name.startswith("CLAM"):
        _hand_set_clam_classifiers(model)  # embed_dims=(): the classifiers read the features themselves
    return model


_EXPORTS: dict[tuple[str, int], tuple] = {}


def exported_case(name: str, n_classes: int, tmp_path_factory) -> tuple:
    """(eager model, path, runner) for one case, exported once per session."""
    if (name, n_classes) not in _EXPORTS:
        model = build(name, n_classes)
        path = export_onnx(model, tmp_path_factory.mktemp("instance") / f"{name}{n_classes}.onnx",
                           class_names=CLASS_NAMES[n_classes])
        _EXPORTS[name, n_classes] = model, path, load_model(path, device="cpu")
    return _EXPORTS[name, n_classes]


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{c}" for n, c in CASES])
def exported(request, tmp_path_factory):
    return exported_case(*request.param, tmp_path_factory)


def _feeds(model, lengths, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(len(lengths), max(lengths), IN_DIM, generator=generator)
    return {k: v.numpy() for k, v in example_inputs(model, lengths, features).items()}


def _eager(model, feeds: dict) -> np.ndarray:
    with torch.inference_mode():
        out = model(torch.from_numpy(feeds[contract.FEATURES]), torch.from_numpy(feeds[contract.MASK]))
    return out.instance_probabilities.numpy()


def test_which_models_declare_an_instance_classifier():
    """Exactly the four; IIBMIL keeps its `instance_classifier` Linear and its state_dict keys."""
    declared = {name for name in list_models() if has_instance_classifier(create_model(name, in_dim=IN_DIM))}
    assert declared == set(WITH_INSTANCE_CLASSIFIER)
    iibmil = create_model("IIBMIL", in_dim=IN_DIM, att_dim=16)
    assert iibmil.instance_outputs is True and isinstance(iibmil.instance_classifier, torch.nn.Linear)
    assert {"instance_classifier.weight", "instance_classifier.bias"} <= set(iibmil.state_dict())
    abmil = create_model("ABMIL", in_dim=IN_DIM, n_classes=3)
    assert output_names(abmil) == list(contract.MIL_OUTPUTS)
    assert output_names(create_model("CLAM_MB", in_dim=IN_DIM, n_classes=3)) == [
        *contract.MIL_OUTPUTS, contract.ATTENTION_BY_CLASS, contract.INSTANCE_PROBABILITIES]


def test_graph_and_metadata_list_the_output(exported):
    model, path, runner = exported
    proto = onnx.load(str(path), load_external_data=False)
    names = [v.name for v in proto.graph.output]
    assert names == output_names(model) and names[-1] == contract.INSTANCE_PROBABILITIES
    dims = [d.dim_param or d.dim_value for d in proto.graph.output[-1].type.tensor_type.shape.dim]
    assert dims == [contract.BATCH_AXIS, contract.BAG_AXIS, model.n_classes]
    props = {e.key: e.value for e in proto.metadata_props}
    assert json.loads(props["milkit.outputs"]) == names
    assert runner.metadata.has_instance_probabilities and runner.has_instance_probabilities


@pytest.mark.parametrize("n", (1, 2, 13, 300))
def test_onnxruntime_matches_eager_alone_and_padded(exported, n):
    model, _, runner = exported
    for lengths in ((n,), (n + 3, n, n + 1)):
        feeds = _feeds(model, lengths, seed=n)
        ort = runner.session.run(feeds)[contract.INSTANCE_PROBABILITIES]
        eager = _eager(model, feeds)
        assert ort.shape == eager.shape == (len(lengths), max(lengths), model.n_classes)
        assert _within(ort, eager) <= 0, f"max |ort - eager| = {np.abs(ort - eager).max():.3e} at {lengths}"
        assert ((ort >= 0) & (ort <= 1)).all()


def test_padding_is_zero_and_never_changes_a_bag(exported):
    """Padding of 1e30 and NaN: every bag equals itself alone, and its padded rows are exactly 0."""
    model, _, runner = exported
    lengths = (13, 20, 17)
    feeds = _feeds(model, lengths, seed=3)
    mask = feeds[contract.MASK]
    hostile = feeds[contract.FEATURES].copy()
    hostile[0, 13:] = 1e30
    hostile[2][~mask[2]] = np.nan
    padded = runner.session.run({**feeds, contract.FEATURES: hostile})[contract.INSTANCE_PROBABILITIES]
    assert np.isfinite(padded).all()
    for b, n in enumerate(lengths):
        alone = runner.session.run({contract.FEATURES: hostile[b:b + 1, :n], contract.MASK: mask[b:b + 1, :n]})
        np.testing.assert_allclose(padded[b, :n], alone[contract.INSTANCE_PROBABILITIES][0], rtol=RTOL, atol=ATOL)
        assert np.all(padded[b, n:] == 0.0)


def test_validate_compares_the_output_and_its_padding(exported):
    model, path, _ = exported
    rows = validate_onnx(path, model=model, sizes=(1, 7, 49))
    for row in rows:
        assert contract.INSTANCE_PROBABILITIES in row.errors and row.passes(ATOL), row
        if row.padded:
            assert row.errors[PADDING_ERROR] <= ATOL, row
    assert contract.INSTANCE_PROBABILITIES in format_table(rows).splitlines()[0]


def test_prediction_keys_them_by_class_name(exported):
    model, _, runner = exported
    rng = np.random.default_rng(1)
    bags = [rng.standard_normal((n, IN_DIM)).astype(np.float32) for n in (9, 4, 15)]
    expected_names = CLASS_NAMES[model.n_classes][1:] if model.n_classes == 1 else CLASS_NAMES[model.n_classes]
    batch = runner.predict_batch(bags)
    for bag, prediction in zip(bags, batch):
        assert list(prediction.instance_probabilities) == expected_names
        alone = runner.predict(bag)
        truth = _eager(model, {contract.FEATURES: bag[None], contract.MASK: np.ones((1, len(bag)), bool)})[0]
        for k, name in enumerate(expected_names):
            column = prediction.instance_probabilities[name]
            assert column.dtype == np.float32 and column.shape == (len(bag),)
            np.testing.assert_allclose(column, alone.instance_probabilities[name], rtol=RTOL, atol=ATOL)
            assert _within(column, truth[:, k]) <= 0


def _meaning_dsmil(model, X: np.ndarray, p: np.ndarray) -> None:
    """Per-class sigmoid of the instance classifier; the top instance is the critical one, at sigmoid(max logit)."""
    W = model.streams.instance_classifier.weight.detach().numpy().astype(np.float64)  # (C, D)
    b = model.streams.instance_classifier.bias.detach().numpy().astype(np.float64)  # (C,)
    scores = X @ W.T + b  # (N, C)
    np.testing.assert_allclose(p, _sigmoid(scores), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(p.argmax(axis=0), scores.argmax(axis=0))  # the critical instance per class
    with torch.inference_mode():
        _, max_logits, _ = model.stream_logits(torch.from_numpy(X[None].astype(np.float32)))
    np.testing.assert_allclose(p.max(axis=0), _sigmoid(max_logits[0].double().numpy()), rtol=RTOL, atol=ATOL)


def _meaning_clam(model, X: np.ndarray, p: np.ndarray) -> None:
    """Hand-set classifiers: inside(c) = sigmoid(2 x_c); binary reads label 1's classifier (feature 1), not 0's."""
    columns = [1] if model.n_classes == 1 else list(range(model.n_classes))
    np.testing.assert_allclose(p, _sigmoid(INSIDE_GAIN * X[:, columns]), rtol=RTOL, atol=ATOL)


def _meaning_iibmil(model, X: np.ndarray, p: np.ndarray, attention: np.ndarray, logits: np.ndarray) -> None:
    """`attention` is the masked softmax of the instance score: logit(p) for binary, log p(predicted) otherwise."""
    p = p.astype(np.float64)
    score = np.log(p[:, 0]) - np.log1p(-p[:, 0]) if model.n_classes == 1 else np.log(p[:, logits.argmax()])
    expected = np.exp(score - score.max())
    np.testing.assert_allclose(attention, expected / expected.sum(), rtol=1e-3, atol=1e-5)
    if model.n_classes > 1:
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)  # softmax over the classes


def test_the_probabilities_mean_what_the_model_card_says(exported):
    model, _, runner = exported
    rng = np.random.default_rng(7)
    X = rng.standard_normal((40, IN_DIM)).astype(np.float32)
    X[17, : model.n_classes + 1] = 4.0  # a planted strong instance of every class
    prediction = runner.predict(X)
    p = np.stack(list(prediction.instance_probabilities.values()), axis=1)  # (N, n_classes)
    name = model.name
    if name == "DSMIL":
        _meaning_dsmil(model, X.astype(np.float64), p)
    elif name.startswith("CLAM"):
        _meaning_clam(model, X.astype(np.float64), p)
        assert (p.argmax(axis=0) == 17).all()  # the planted instance is every class's most probable evidence
    else:
        _meaning_iibmil(model, X, p, prediction.attention.astype(np.float64), prediction.logits)


class ForgetfulCLAM(CLAM_SB):
    """Declares instance_outputs (same name and config as CLAM_SB) but returns no instance probabilities."""

    def forward(self, X, mask=None, **inputs) -> MILOutput:
        out = super().forward(X, mask, **inputs)
        return MILOutput(logits=out.logits, attention=out.attention)


def test_a_model_that_declares_the_classifier_but_returns_nothing_is_refused(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(MilkitError, match="instance_probabilities"):
        export_onnx(ForgetfulCLAM(in_dim=IN_DIM, att_dim=16), tmp_path / "forgetful.onnx")
    assert not (tmp_path / "forgetful.onnx").exists()


def test_validate_refuses_an_eager_model_without_them_and_rebuilds_from_the_file(tmp_path_factory):
    model, path, _ = exported_case("CLAM_SB", 3, tmp_path_factory)
    torch.manual_seed(0)
    forgetful = ForgetfulCLAM(in_dim=IN_DIM, n_classes=model.n_classes, att_dim=16).eval()
    with pytest.raises(ContractMismatchError, match="instance_probabilities"):
        validate_onnx(path, model=forgetful, sizes=(3,))
    # no model given: rebuilt from the file; the clustering classifiers are now weights inference reads
    rows = validate_onnx(path, sizes=(5,))
    assert all(contract.INSTANCE_PROBABILITIES in row.errors and row.passes(ATOL) for row in rows)


def test_metadata_that_forgets_the_output_is_refused(tmp_path_factory, tmp_path):
    """An edited file whose milkit.outputs drops instance_probabilities disagrees with its graph (exit 4)."""
    _, path, _ = exported_case("DSMIL", 1, tmp_path_factory)
    proto = onnx.load(str(path))
    for entry in proto.metadata_props:
        if entry.key == "milkit.outputs":
            entry.value = json.dumps(list(contract.MIL_OUTPUTS))
    edited = tmp_path / "edited.onnx"
    onnx.save(proto, str(edited))
    with pytest.raises(ModelFormatError, match="milkit.outputs"):
        load_model(edited, device="cpu")
