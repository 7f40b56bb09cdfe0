"""The committed demo bundle finds planted lesions on slides it never saw, and the demo command runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mil_runtime.contract import Tiling
from mil_runtime.demo import rank_auroc, write_synthetic_slide
from mil_runtime.demo.__main__ import DEFAULT_MODEL, REPO, main
from mil_runtime.encoder import find_encoder, load_encoder, sha256_file
from mil_runtime.model import load_model
from mil_runtime.pipeline import run_slide

TEST_SEEDS = range(7000, 7008)  # build_demo trains on 1000.. and validates on 2000..; these are new


def test_rank_auroc_hand_case_and_sklearn():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs won 1+1+0+1 of 4
    assert rank_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert rank_auroc([0.5, 0.5], [0, 1]) == 0.5  # a tie counts half
    assert rank_auroc([1.0, 2.0, 9.0], [1, 0, -1]) == 0.0  # -1 (ambiguous) is ignored
    assert np.isnan(rank_auroc([1.0, 2.0], [1, 1]))
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 6, 200).astype(float), rng.integers(0, 2, 200)
    assert rank_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


@pytest.fixture(scope="module")
def bundle():
    model = load_model(DEFAULT_MODEL, device="cpu")
    encoder = load_encoder(find_encoder(DEFAULT_MODEL, model.metadata), device="cpu")
    return model, encoder


def test_bundle_files_are_small_and_consistent(bundle):
    model, encoder = bundle
    meta = model.metadata
    assert meta.model_name == "ABMIL" and meta.class_names == ["clean", "lesion"]
    assert meta.tiling == Tiling(tile_px=128, mpp=1.0, overlap=0.0)
    assert meta.encoder.name == encoder.name == "tiny_cnn"
    assert meta.encoder.sha256 == sha256_file(encoder.path)  # the committed encoder is the trained-on one
    assert meta.provenance["diagnostic"] is False
    total = sum(p.stat().st_size for p in DEFAULT_MODEL.parent.glob("*.onnx"))
    assert total < 3 * 2**20
    card = (DEFAULT_MODEL.parent / "README.md").read_text()
    assert "NOT a diagnostic model" in card and "python models/build_demo.py" in card


@pytest.fixture(scope="module")
def unseen_slides(bundle, tmp_path_factory):
    """Fresh synthetic slides (even seeds with lesions, odd clean) through the runtime pipeline."""
    model, encoder = bundle
    folder = tmp_path_factory.mktemp("unseen")
    runs = []
    for i, seed in enumerate(TEST_SEEDS):
        lesions = "random 2" if i % 2 == 0 else None
        truth = write_synthetic_slide(folder / f"s{seed}.svs", height=2560, width=2560, lesions=lesions,
                                      tissue=0.6, seed=seed)
        result = run_slide(truth.path, model, encoder, workers=2)
        runs.append((truth, result))
    return runs


def test_attention_ranks_lesion_tiles_first(unseen_slides):
    aurocs = []
    for truth, result in unseen_slides:
        if not truth.is_lesion_slide:
            continue
        labels = truth.tile_labels(result.xy_level0, result.plan.tile_level0)
        assert (labels == 1).sum() >= 3 and (labels == 0).sum() >= 10  # both kinds of tile present
        aurocs.append(rank_auroc(result.attention, labels))
        np.testing.assert_allclose(result.attention.sum(), 1.0, rtol=1e-4)
    assert len(aurocs) == 4
    assert min(aurocs) >= 0.9, aurocs


def test_lesion_slides_score_above_clean_slides(unseen_slides):
    lesion = [r.class_probabilities[1] for t, r in unseen_slides if t.is_lesion_slide]
    clean = [r.class_probabilities[1] for t, r in unseen_slides if not t.is_lesion_slide]
    assert min(lesion) > max(clean), (lesion, clean)
    assert min(lesion) > 0.5 > max(clean)  # and the decision threshold sits between them
    predicted = {r.predicted_name for t, r in unseen_slides if t.is_lesion_slide}
    assert predicted == {"lesion"}


@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path):
    out = tmp_path / "demo-out"
    done = subprocess.run([sys.executable, "-m", "mil_runtime.demo", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "NOT a diagnostic model" in done.stdout
    for stem in ("CMU-1-Small-Region", "synthetic-lesions"):
        for suffix in (".json", ".heatmap.png", ".tiles.geojson", ".tissue.png", ".tiles.csv", ".features.h5"):
            path = out / f"{stem}{suffix}"
            assert path.is_file() and path.stat().st_size > 0, path
            if suffix != ".features.h5":
                assert str(path) in done.stdout or suffix not in (".json", ".heatmap.png", ".tiles.geojson")
        result = json.loads((out / f"{stem}.json").read_text())
        assert result["n_instances"] > 10 and set(result["probabilities"]) == {"clean", "lesion"}
        geojson = json.loads((out / f"{stem}.tiles.geojson").read_text())
        tiles = [f for f in geojson["features"] if f["properties"]["objectType"] == "tile"]
        assert len(tiles) == result["n_instances"] and len(geojson["features"]) == len(tiles) + 1  # + prediction
    assert json.loads((out / "CMU-1-Small-Region.json").read_text())["mpp"]["value"] == pytest.approx(0.499)
    assert not list(out.glob(".*"))  # no temporary files left behind
    assert (out / "predictions.csv").is_file()  # two slides: a cohort run, with its table


def test_demo_without_model_says_what_to_do(tmp_path, capsys):
    code = main(["--out", str(tmp_path), "--model", str(tmp_path / "missing.onnx")])
    assert code == 3
    assert "python models/build_demo.py" in capsys.readouterr().err


@pytest.mark.faults
def test_demo_passes_on_mil_infer_failures(tmp_path, capsys):
    encoder_not_model = DEFAULT_MODEL.parent / "tiny_cnn.onnx"
    code = main(["--out", str(tmp_path), "--model", str(encoder_not_model)])
    assert code == 4  # ModelFormatError from mil-infer, passed through
    assert "mil-infer failed" in capsys.readouterr().err
