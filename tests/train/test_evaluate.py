"""mil-eval: bootstrap intervals against asymptotic ones, and a checkpoint and its export scored alike."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score
from train_cli_helpers import planted_folder

from mil_runtime.errors import InputNotFoundError, ModelFormatError
from mil_train.checkpoint import save_checkpoint
from mil_train.data.torchmil_folder import TorchmilFolderDataset
from mil_train.evaluate import bootstrap_intervals, classification_intervals, main
from mil_train.models import ABMIL
from mil_train.trainer import Trainer, make_loader, seed_everything


def delong_interval(labels, scores, z=1.959964):
    """DeLong's AUROC and its normal 95% interval, from the structural components (computed by hand)."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    psi = (positives[:, None] > negatives[None, :]) + 0.5 * (positives[:, None] == negatives[None, :])  # (n1, n0)
    area = psi.mean()
    variance = psi.mean(axis=1).var(ddof=1) / len(positives) + psi.mean(axis=0).var(ddof=1) / len(negatives)
    return area, area - z * math.sqrt(variance), area + z * math.sqrt(variance)


def scored_set(n=400, shift=1.2, seed=0):
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int64)
    scores = rng.normal(size=n) + shift * labels
    return labels, 1 / (1 + np.exp(-scores))


def test_auroc_interval_matches_delong():
    labels, probabilities = scored_set()
    result = classification_intervals(labels, probabilities, 1, n_resamples=2000)
    area, low, high = delong_interval(labels, probabilities)
    assert result["auroc"]["value"] == pytest.approx(area, abs=1e-12)
    assert result["auroc"]["value"] == pytest.approx(roc_auc_score(labels, probabilities), abs=1e-12)
    # percentile bootstrap and DeLong agree to Monte Carlo error (+-0.005 at 2,000 resamples)
    assert result["auroc"]["low"] == pytest.approx(low, abs=0.012)
    assert result["auroc"]["high"] == pytest.approx(high, abs=0.012)
    assert result["auroc"]["n_resamples"] == 2000


def test_balanced_accuracy_interval_matches_the_normal_approximation():
    labels, probabilities = scored_set(seed=1)
    result = classification_intervals(labels, probabilities, 1, n_resamples=2000)["balanced_accuracy"]
    predicted = probabilities >= 0.5
    sensitivity, specificity = predicted[labels == 1].mean(), (~predicted[labels == 0]).mean()
    value = (sensitivity + specificity) / 2
    se = 0.5 * math.sqrt(sensitivity * (1 - sensitivity) / (labels == 1).sum()
                         + specificity * (1 - specificity) / (labels == 0).sum())
    assert result["value"] == pytest.approx(value, abs=1e-12)
    assert result["low"] == pytest.approx(value - 1.96 * se, abs=0.012)
    assert result["high"] == pytest.approx(value + 1.96 * se, abs=0.012)


def test_bootstrap_intervals_of_any_metric_function():
    x = np.arange(10.0)
    result = bootstrap_intervals(lambda a: {"mean": a.mean(), "never": math.nan}, [x], n_resamples=500, seed=1)
    assert result["mean"]["value"] == 4.5 and result["mean"]["low"] < 4.5 < result["mean"]["high"]
    assert result["never"]["n_resamples"] == 0 and math.isnan(result["never"]["low"])
    # the standard error of a mean of 10 draws from 0..9 is 2.87 / sqrt(10) = 0.91: the interval spans about 3.6
    assert result["mean"]["high"] - result["mean"]["low"] == pytest.approx(2 * 1.96 * x.std() / math.sqrt(10), rel=0.15)


def test_same_seed_same_interval_and_undefined_resamples_are_left_out():
    labels, probabilities = np.array([0, 0, 0, 1]), np.array([0.1, 0.4, 0.3, 0.8])
    a = classification_intervals(labels, probabilities, 1, n_resamples=300, seed=2)
    assert a == classification_intervals(labels, probabilities, 1, n_resamples=300, seed=2)
    assert a != classification_intervals(labels, probabilities, 1, n_resamples=300, seed=3)
    # a resample lacks the positive bag with probability (3/4)^4 = 32%, or is all positive: AUROC undefined there
    assert 150 < a["auroc"]["n_resamples"] < 250 and a["accuracy"]["n_resamples"] == 300
    assert a["auroc"]["value"] == 1.0 and a["auroc"]["high"] == 1.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small ABMIL trained on planted bags, its checkpoint, its ONNX export, and held-out bags."""
    root = tmp_path_factory.mktemp("eval")
    planted_folder(root / "train", [i % 2 for i in range(24)], seed=0)
    test = planted_folder(root / "test", [int(i % 3 == 0) for i in range(30)], seed=1)
    seed_everything(0)
    model = ABMIL(in_dim=4, att_dim=4, embed_dims=(8,))
    train_bags = [TorchmilFolderDataset(root / "train")[i] for i in range(24)]
    Trainer(model, lr=1e-2, epochs=4, progress=False).fit(make_loader(train_bags, batch_size=4, shuffle=True))
    checkpoint = save_checkpoint(model, root / "m.pt", provenance={"note": "test"})
    from mil_export import export_onnx

    exported = export_onnx(model.eval(), root / "m.onnx")
    return model.eval(), checkpoint, exported, test


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_mil_eval_scores_a_checkpoint_and_its_export_alike(trained, tmp_path):
    model, checkpoint, exported, test = trained
    dataset = TorchmilFolderDataset(test)
    with torch.no_grad():
        scores = [float(torch.sigmoid(model(dataset[i]["X"][None]).logits)) for i in range(len(dataset))]
    truth = [int(dataset[i]["Y"]) for i in range(len(dataset))]
    reports = {}
    for path in (checkpoint, exported):
        out = tmp_path / f"{path.suffix[1:]}.json"
        result = run([path, test, "--n-bootstrap", 200, "--json", out])
        assert result.exit_code == 0, result.output
        assert "auroc" in result.output and "95% CI" in result.output
        reports[path.suffix] = json.loads(out.read_text())
    for report in reports.values():
        assert report["n_bags"] == 30 and report["task"] == "classification"
        assert report["metrics"]["auroc"]["value"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-6)
        assert report["metrics"]["auroc"]["low"] <= report["metrics"]["auroc"]["value"] <= report["metrics"]["auroc"]["high"]
    # onnxruntime within 1e-4 of eager: the same ranks, so the same resampled metrics
    for name in ("auroc", "balanced_accuracy"):
        for key in ("value", "low", "high"):
            assert reports[".onnx"]["metrics"][name][key] == pytest.approx(reports[".pt"]["metrics"][name][key], abs=1e-6)


def test_mil_eval_refuses_missing_and_foreign_files(trained, tmp_path):
    _, _, _, test = trained
    missing = run([tmp_path / "none.pt", test])
    assert missing.exit_code == InputNotFoundError.exit_code and "does not exist" in missing.output
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    junk = run([tmp_path / "junk.pt", test])
    assert junk.exit_code == ModelFormatError.exit_code and "mil-eval: error: cannot read" in junk.output
    assert len(junk.output.strip().splitlines()) == 1


@pytest.mark.filterwarnings("ignore:A single label was found")  # sklearn, on one-class sets
@pytest.mark.parametrize("n_classes", [1, 3])
def test_resample_metrics_equal_the_trainers_metrics(n_classes):
    """The fast numpy metrics of the resamples against mil_train.metrics (sklearn) on many small sets,
    with ties, absent classes and one-class predictions."""
    from mil_train.evaluate import resample_metrics
    from mil_train.metrics import classification_metrics

    rng = np.random.default_rng(0)
    for trial in range(150):
        n = int(rng.integers(2, 12))
        kinds = 2 if n_classes == 1 else n_classes
        y = rng.integers(0, kinds, size=n)
        if n_classes == 1:
            p = rng.choice([0.2, 0.5, 0.7, rng.uniform()], size=n)  # ties and the 0.5 threshold itself
        else:
            p = rng.dirichlet(np.ones(n_classes), size=n).round(1) + 1e-3  # ties after rounding
        ours, theirs = resample_metrics(y, p, n_classes), classification_metrics(y, p, n_classes)
        for name, value in theirs.items():
            assert ours[name] == pytest.approx(value, abs=1e-12, nan_ok=True), (trial, name, y, p)


def test_probabilities_come_from_float64_logits_so_saturated_bags_keep_their_order():
    from mil_train.evaluate import probabilities_from_logits

    logits = np.array([[18.0], [22.0], [30.0], [-1.0]], dtype=np.float32)
    assert len(set(torch.sigmoid(torch.from_numpy(logits)).reshape(-1).tolist()[:3])) == 1  # float32: all 1.0
    probabilities = probabilities_from_logits(logits, 1)
    assert list(np.argsort(probabilities)) == [3, 0, 1, 2]
    softmax = probabilities_from_logits(np.array([[40.0, 0.0, 1.0], [0.0, 0.0, 0.0]]), 3)
    assert softmax.sum(axis=1) == pytest.approx([1.0, 1.0]) and softmax[1] == pytest.approx([1 / 3] * 3)


def harrell_c_index(times, events, risk):
    """Harrell's C by the definition, pair by pair: i before j with i's event observed; ties in risk 1/2."""
    concordant = comparable = 0.0
    for i in range(len(times)):
        for j in range(len(times)):
            if times[i] < times[j] and events[i] == 1:
                comparable += 1
                concordant += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return concordant / comparable


def test_mil_eval_scores_a_survival_checkpoint_by_its_c_index(tmp_path):
    synthetic = pytest.importorskip("mil_train.tasks.synthetic")
    from mil_train.models import create_model

    bags = synthetic.planted_survival_bags(40, feature_dim=8, bag_size=(6, 10), seed=3)
    root = tmp_path / "surv"
    for folder in ("features", "labels"):
        (root / folder).mkdir(parents=True)
    for i, bag in enumerate(bags):
        np.save(root / "features" / f"b{i:02d}.npy", bag["X"].numpy())
        np.save(root / "labels" / f"b{i:02d}.npy", bag["Y"].numpy())  # (time, event)
    seed_everything(0)
    model = create_model("ABMIL", in_dim=8, att_dim=4, embed_dims=[8], task={"type": "survival", "loss": "cox"})
    Trainer(model, lr=1e-2, epochs=3, progress=False).fit(make_loader(bags, batch_size=8, shuffle=True))
    path = save_checkpoint(model, tmp_path / "surv.pt")
    result = run([path, root, "--n-bootstrap", 200, "--json", tmp_path / "s.json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["task"] == "survival" and list(report["metrics"]) == ["c_index"]
    model.eval()
    with torch.no_grad():
        risk = [float(model.task.outputs(model(b["X"][None]).logits)["risk"][0]) for b in bags]
    times, events = [float(b["Y"][0]) for b in bags], [int(b["Y"][1]) for b in bags]
    c_index = report["metrics"]["c_index"]
    assert c_index["value"] == pytest.approx(harrell_c_index(times, events, risk), abs=1e-9)
    assert c_index["low"] <= c_index["value"] <= c_index["high"] and c_index["n_resamples"] == 200
    from mil_export import export_onnx  # the exported file's risk output, by onnxruntime, ranks the bags alike

    exported = run([export_onnx(model, tmp_path / "surv.onnx"), root, "--n-bootstrap", 200, "--json", tmp_path / "o.json"])
    assert exported.exit_code == 0, exported.output
    onnx_index = json.loads((tmp_path / "o.json").read_text())["metrics"]["c_index"]
    assert onnx_index == pytest.approx(c_index, abs=1e-9)


def test_mil_eval_scores_a_regression_checkpoint(tmp_path):
    synthetic = pytest.importorskip("mil_train.tasks.synthetic")
    from mil_train.models import create_model

    bags = synthetic.planted_regression_bags(30, feature_dim=8, bag_size=(5, 8), seed=2)
    root = tmp_path / "reg"
    for folder in ("features", "labels"):
        (root / folder).mkdir(parents=True)
    for i, bag in enumerate(bags):
        np.save(root / "features" / f"b{i:02d}.npy", bag["X"].numpy())
        np.save(root / "labels" / f"b{i:02d}.npy", bag["Y"].numpy().reshape(1))
    seed_everything(0)
    model = create_model("ABMIL", in_dim=8, att_dim=4, embed_dims=[8], task="regression")
    Trainer(model, lr=1e-2, epochs=2, progress=False).fit(make_loader(bags, batch_size=4, shuffle=True))
    result = run([save_checkpoint(model, tmp_path / "reg.pt"), root, "--n-bootstrap", 100, "--json", tmp_path / "r.json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    model.eval()
    with torch.no_grad():
        values = np.array([float(model.task.outputs(model(b["X"][None]).logits)["values"][0, 0]) for b in bags])
    targets = np.array([float(b["Y"]) for b in bags])
    assert report["task"] == "regression"
    assert report["metrics"]["mae"]["value"] == pytest.approx(np.abs(values - targets).mean(), rel=1e-5)
    assert report["metrics"]["rmse"]["value"] == pytest.approx(np.sqrt(((values - targets) ** 2).mean()), rel=1e-5)
