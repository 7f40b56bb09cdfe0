"""`mil-infer` on a real slide, and the same slide's feature file: both routes must agree."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mil_runtime.encoder import encoder_filename, sha256_file
from mil_runtime.errors import ContractMismatchError, SlideReadError
from mil_runtime.outputs.record import read_output_set

from runtime_fixtures import abmil

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"  # ../shared/data beside the checkout
SLIDE = ROOT / "tests" / "data" / "CMU-1-Small-Region.svs"  # vendored, CC0: 2220 x 2967 px at 0.499 mpp
ENCODER_NAME = "tiny_cnn"


def mil_infer(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mil_runtime.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def slide_model(tmp_path_factory) -> Path:
    """An ABMIL on tiny_cnn features, 112 px tiles at 2 um/px, with its encoder beside it."""
    from mil_export import export_onnx
    from mil_export.encoders import build_encoder, export_encoder

    folder = tmp_path_factory.mktemp("slide_model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no pretrained weights": fine for plumbing
        encoder, _ = build_encoder(ENCODER_NAME)
    encoder_path = export_encoder(encoder, folder / encoder_filename(ENCODER_NAME), name=ENCODER_NAME)
    model = abmil(3, seed=2, in_dim=encoder.output_dim)
    ref = {"name": ENCODER_NAME, "output_dim": encoder.output_dim, "sha256": sha256_file(encoder_path)}
    return export_onnx(model, folder / "abmil_slide.onnx", class_names=["a", "b", "c"], encoder=ref,
                       tiling={"tile_px": 112, "mpp": 2.0, "overlap": 0.0})


@pytest.mark.slow  # 11-15 s: moved out of the quick loop, which reached its 10-minute budget
def test_slide_then_its_feature_file_give_the_same_prediction(tmp_path, slide_model):
    if not SLIDE.exists():
        pytest.skip(f"{SLIDE} is missing")
    out = tmp_path / "out"
    slide_run = mil_infer(SLIDE, "--model", slide_model, "--out", out, "--json", "--quiet")
    assert slide_run.returncode == 0, slide_run.stderr
    slide_result = json.loads(slide_run.stdout)
    assert (out / "CMU-1-Small-Region.json").is_file()
    features = out / "CMU-1-Small-Region.features.h5"
    assert features.is_file()
    assert slide_result["n_instances"] > 0

    h5_run = mil_infer(features, "--model", slide_model, "--json")
    assert h5_run.returncode == 0, h5_run.stderr
    h5_result = json.loads(h5_run.stdout)
    assert h5_result["n_instances"] == slide_result["n_instances"]
    assert h5_result["encoder"]["name"] == ENCODER_NAME
    for name, p in slide_result["probabilities"].items():
        assert h5_result["probabilities"][name] == pytest.approx(p, abs=1e-5)

    # a feature file from another encoder is refused like a slide with the wrong --encoder
    import h5py

    with h5py.File(features, "r+") as h5:
        h5.attrs["encoder"] = "resnet50_trunc"
    refused = mil_infer(features, "--model", slide_model)
    assert refused.returncode == ContractMismatchError.exit_code
    assert refused.stderr.count("\n") == 1 and "resnet50_trunc" in refused.stderr


@pytest.mark.faults
def test_unreadable_slide_is_one_line(tmp_path, slide_model):
    fake = tmp_path / "fake.svs"
    fake.write_text("this is not a slide\n")
    out = tmp_path / "out"
    result = mil_infer(fake, "--model", slide_model, "--out", out)
    assert result.returncode == SlideReadError.exit_code, result.stderr
    assert result.stderr.startswith(f"error: {fake}: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.faults
@pytest.mark.slow  # 11-15 s: moved out of the quick loop, which reached its 10-minute budget
def test_every_bad_slide_is_one_line_and_the_good_one_still_completes(tmp_path, slide_model):
    """One call, the bad slides of the issue first, a real slide last (given as a quoted glob)."""
    from mil_runtime.demo.synthetic_slide import write_blank_slide
    from mil_runtime.errors import MppUnknownError, NoTissueError

    if not SLIDE.exists():
        pytest.skip(f"{SLIDE} is missing")
    blank = tmp_path / "slides" / "blank.svs"
    blank.parent.mkdir()
    write_blank_slide(blank, height=1024, width=1024)
    expected = {  # input -> exit code of its error line
        SHARED_DATA / "bad-slides" / "unreadable.svs": SlideReadError.exit_code,
        SHARED_DATA / "bad-slides" / "unopenable.tiff": SlideReadError.exit_code,
        SHARED_DATA / "bad-slides" / "not-a-slide.svs": SlideReadError.exit_code,
        SHARED_DATA / "slides" / "tiny-16px.svs": NoTissueError.exit_code,  # smaller than one tile
        SHARED_DATA / "slides" / "boxes-4-levels.tiff": MppUnknownError.exit_code,  # 352.8 um/px: no mpp
        blank: NoTissueError.exit_code,
    }
    missing = [p for p in expected if not p.exists()]
    if missing:
        pytest.skip(f"needs {missing[0]}, which is not on this machine")
    good_pattern = str(SLIDE.parent / "CMU-1-Small-*.svs")
    out = tmp_path / "out"
    run = mil_infer(*expected, good_pattern, "--model", slide_model, "--out", out, "--quiet")

    assert run.returncode == SlideReadError.exit_code  # the first failure's code
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == len(expected)
    for line, path in zip(lines, expected):
        assert line.startswith(f"error: {path}: ")
    assert "--mpp" in lines[4]
    assert run.stdout.strip().splitlines()[-1].startswith(f"{SLIDE}: ")  # the glob matched the real slide
    # several inputs make a cohort run: from several folders, OUT mirrors them (docs/cohort.md)
    suffixes = [".json", ".heatmap.png", ".tissue.png", ".tiles.geojson", ".tiles.csv", ".features.h5"]
    written = [p for p in out.rglob("CMU-1-Small-Region*")]
    assert sorted(p.name for p in written) == sorted(f"CMU-1-Small-Region{s}" for s in suffixes)
    assert len({p.parent for p in written}) == 1 and read_output_set(written[0].parent, "CMU-1-Small-Region").complete
    failures = sorted(p.name for p in out.rglob("*.failed.json"))
    assert failures == sorted(f"{p.stem}.failed.json" for p in expected)  # one record per refused slide
    assert (out / "cohort.json").is_file() and (out / "predictions.csv").is_file()

    for path, code in expected.items():  # each alone exits with its own documented code
        alone = mil_infer(path, "--model", slide_model, "--out", tmp_path / "alone", "--quiet")
        assert alone.returncode == code, (path, alone.stderr)
        assert alone.stderr.count("\n") == 1
    assert not (tmp_path / "alone").exists() or list((tmp_path / "alone").iterdir()) == []


def test_outputs_roi_and_frame_through_mil_infer(tmp_path, slide_model):
    if not SLIDE.exists():
        pytest.skip(f"{SLIDE} is missing")
    roi = tmp_path / "CMU-1-Small-Region.geojson"  # the top half of the region, as QuPath exports it
    roi.write_text(json.dumps([{"type": "Feature", "properties": {"objectType": "annotation"},
                                "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [2220, 0], [2220, 1400],
                                                                                 [0, 1400], [0, 0]]]}}]))
    out = tmp_path / "out"
    run = mil_infer(SLIDE, "--model", slide_model, "--out", out, "--json", "--quiet",
                    "--outputs", "geojson,csv", "--roi", tmp_path, "--geojson-frame", "level0")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert sorted(p.name for p in out.iterdir()) == [
        "CMU-1-Small-Region.json", "CMU-1-Small-Region.tiles.csv", "CMU-1-Small-Region.tiles.geojson"]
    assert result["roi"]["file"] == str(roi) and result["roi"]["n_polygons"] == 1
    tile_px_level0 = result["tiling"]["tile_level0"]
    assert result["tiles"] and all(t["y"] + tile_px_level0 / 2 <= 1400 for t in result["tiles"])
    assert result["output_options"] == {"outputs": ["json", "geojson", "csv"], "geojson_frame": "level0",
                                        "geojson_offset": [0, 0]}


@pytest.mark.faults
def test_unknown_output_name_is_a_usage_error(tmp_path, slide_model):
    run = mil_infer(SLIDE, "--model", slide_model, "--out", tmp_path, "--outputs", "json,pdf")
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "unknown output 'pdf'" in run.stderr and "see mil-infer --help" in run.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.faults
def test_roi_on_a_feature_file_is_refused(tmp_path, slide_model, features_h5_for_slide_model):
    roi = tmp_path / "roi.geojson"
    roi.write_text(json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]}))
    run = mil_infer(features_h5_for_slide_model, "--model", slide_model, "--roi", roi)
    assert run.returncode == 6 and run.stderr.count("\n") == 1 and "give the slide instead" in run.stderr


@pytest.fixture
def features_h5_for_slide_model(tmp_path, slide_model) -> Path:
    if not SLIDE.exists():
        pytest.skip(f"{SLIDE} is missing")
    out = tmp_path / "encoded"
    assert mil_infer(SLIDE, "--model", slide_model, "--out", out, "--quiet").returncode == 0
    return out / "CMU-1-Small-Region.features.h5"
