"""run_slide end to end with a numpy mock encoder and model: outputs, reuse, and failures that leave nothing."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import tifffile
from slide_helpers import DarknessModel, MeanColourEncoder, shared_file
from PIL import Image

from mil_runtime.errors import ContractMismatchError, MppUnknownError, NoTissueError, SlideReadError
from mil_runtime.pipeline import run_slide
from mil_runtime.slide.open import open_slide


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_cmu_end_to_end_outputs(tmp_path, model, encoder):
    path = shared_file("slides/CMU-1-Small-Region.svs")
    result = run_slide(path, model, encoder, out_dir=tmp_path, batch_size=16, workers=2)
    stem = "CMU-1-Small-Region"
    assert _files(tmp_path) == sorted(f"{stem}{s}" for s in (
        ".json", ".heatmap.png", ".tissue.png", ".tiles.geojson", ".tiles.csv", ".features.h5"))

    # tiles: 224 px at 0.5 um/px on a 0.499 um/px scan = 224 level-0 px, read at level 0
    assert (result.plan.tile_level0, result.plan.level) == (224, 0)
    assert 20 <= result.n_tiles <= 80  # of (2220 // 224) * (2967 // 224) = 117 candidates
    np.testing.assert_array_equal(model.seen_coords, result.xy_level0[:, ::-1] // 224)  # grid (y, x)
    assert np.all(result.tissue_fraction >= 0.25)
    assert encoder.shapes[0] == (16, 224, 224, 3)

    doc = json.loads((tmp_path / f"{stem}.json").read_text())
    assert doc["prediction"]["class_name"] in doc["model"]["class_names"] and doc["n_instances"] == result.n_tiles
    assert sum(doc["probabilities"].values()) == pytest.approx(1.0)
    assert doc["mpp"] == {"value": 0.499, "source": "openslide"}
    assert doc["tiling"]["level_used"] == 0 and doc["encoder"]["name"] == "mean-colour"
    assert doc["model"]["name"] == "Darkness" and doc["features_reused"] is False
    assert set(doc["timings_s"]) >= {"open", "tissue", "read_encode", "aggregate", "write", "total"}

    heatmap = Image.open(tmp_path / f"{stem}.heatmap.png")
    mask = np.asarray(Image.open(tmp_path / f"{stem}.tissue.png")) > 0
    thumb_h, thumb_w = result.tissue.thumbnail.shape[:2]
    assert heatmap.size == (thumb_w, thumb_h) and mask.shape == (thumb_h, thumb_w)
    np.testing.assert_array_equal(mask, result.tissue.mask)
    # tiles land where the tissue is: the recoloured pixels lie mostly on the tissue mask
    changed = (np.asarray(heatmap.convert("RGB")) != result.tissue.thumbnail).any(axis=2)
    assert changed.sum() > 0 and mask[changed].mean() > 0.6

    geo = json.loads((tmp_path / f"{stem}.tiles.geojson").read_text())
    tile_features = [f for f in geo["features"] if f["properties"]["objectType"] == "tile"]
    assert geo["type"] == "FeatureCollection" and len(tile_features) == result.n_tiles
    assert len(geo["features"]) == result.n_tiles + 1  # plus the prediction's annotation
    width, height = 2220, 2967
    for feature, weight in zip(tile_features, result.attention):
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert feature["geometry"]["type"] == "Polygon" and (ring[0] == ring[-1]).all()
        assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= width
        assert ring[:, 1].min() >= 0 and ring[:, 1].max() <= height
        assert feature["properties"]["measurements"]["attention"] == pytest.approx(float(weight))

    with h5py.File(tmp_path / f"{stem}.features.h5") as h5:
        np.testing.assert_allclose(h5["features"][()], result.features)
        np.testing.assert_array_equal(h5["coords"][()], result.xy_level0)
        assert h5["coords"].attrs["patch_size_level0"] == 224
        assert h5.attrs["encoder"] == "mean-colour"


def test_second_run_reuses_features_unless_the_encoder_differs(tmp_path, model):
    path = shared_file("slides/fluorescence-7-levels.ndpi")
    first = MeanColourEncoder()
    result = run_slide(path, model, first, out_dir=tmp_path, workers=2)
    assert first.calls > 0 and (result.plan.level, result.plan.tile_level0) == (1, 491)

    again = MeanColourEncoder()
    reused = run_slide(path, model, again, out_dir=tmp_path, workers=2)
    assert again.calls == 0 and reused.features_reused
    np.testing.assert_array_equal(reused.features, result.features)

    other = MeanColourEncoder()
    other.sha256 = "2" * 64  # same name, other weights: must not reuse
    rerun = run_slide(path, model, other, out_dir=tmp_path, workers=2)
    assert other.calls > 0 and not rerun.features_reused
    assert json.loads((tmp_path / "fluorescence-7-levels.json").read_text())["features_reused"] is False


def _pyramid_tiff(path, pixels, mpp=0.5):
    """A tiled two-level TIFF (level 1 marked reduced-resolution) whose resolution tags say `mpp` um/px."""
    pixels_per_cm = 10_000.0 / mpp
    with tifffile.TiffWriter(path) as tif:
        for factor in (1, 2):
            tif.write(pixels[::factor, ::factor], tile=(256, 256), photometric="rgb", compression="zlib",
                      subfiletype=0 if factor == 1 else 1,
                      resolution=(pixels_per_cm / factor, pixels_per_cm / factor), resolutionunit="CENTIMETER")


def test_generated_slide_keeps_exactly_the_tiles_over_the_stain(tmp_path, model, encoder):
    pixels = np.full((1024, 1024, 3), 245, dtype=np.uint8)
    pixels[256:768, 256:768] = (190, 110, 170)  # a 256 x 256 um "tissue" square
    pixels[448:672, 448:672] = (120, 40, 110)  # its darkest tile
    slide = tmp_path / "square.tiff"
    _pyramid_tiff(slide, pixels)
    result = run_slide(slide, model, encoder, out_dir=tmp_path / "out", workers=2)
    assert (result.mpp, result.plan.tile_level0) == (0.5, 224)
    # tiles start at 0, 224, 448, 672; the square covers 256-768: fractions 0, 6/7, 1, 3/7 along each axis,
    # so the corner tile (672, 672) has (3/7)^2 = 0.18 < 0.25 and is dropped
    kept = {tuple(v) for v in result.xy_level0.tolist()}
    assert kept == {(x, y) for x in (224, 448, 672) for y in (224, 448, 672)} - {(672, 672)}
    np.testing.assert_allclose(min(result.tissue_fraction), 6 / 7 * 3 / 7)
    darkest = tuple(result.xy_level0[np.argmax(result.attention)])
    assert darkest == (448, 448)
    heatmap = np.asarray(Image.open(tmp_path / "out" / "square.heatmap.png").convert("RGB"))
    assert heatmap.shape == (128, 128, 3)  # 1024 px at 0.5 um/px -> 4 um/px thumbnail
    inside = heatmap[448 // 8 + 2:672 // 8 - 2, 448 // 8 + 2:672 // 8 - 2].reshape(-1, 3).mean(axis=0)
    assert inside[0] > inside[2] and inside[1] > inside[2]  # yellow end of viridis over the darkest tile
    np.testing.assert_array_equal(heatmap[:224 // 8, :224 // 8], pixels[:224:8, :224:8])  # background untouched


@pytest.mark.faults
def test_blank_slide_is_no_tissue_and_leaves_nothing(tmp_path, model, encoder):
    slide = tmp_path / "white.tiff"
    _pyramid_tiff(slide, np.full((1024, 1024, 3), 255, dtype=np.uint8))
    with open_slide(slide) as opened:
        assert opened.level_count == 2
    out = tmp_path / "out"
    with pytest.raises(NoTissueError, match="tissue-threshold"):
        run_slide(slide, model, encoder, out_dir=out)
    assert _files(out) == [] and encoder.calls == 0


@pytest.mark.faults
@pytest.mark.parametrize(
    "relative, error",
    [
        ("bad-slides/unreadable.svs", SlideReadError),
        ("bad-slides/unopenable.tiff", SlideReadError),
        ("bad-slides/not-a-slide.svs", SlideReadError),
        ("slides/tiny-16px.svs", NoTissueError),
        ("slides/boxes-4-levels.tiff", MppUnknownError),
    ],
)
def test_refused_slides_leave_no_files(tmp_path, model, encoder, relative, error):
    with pytest.raises(error):
        run_slide(shared_file(relative), model, encoder, out_dir=tmp_path)
    assert _files(tmp_path) == []


@pytest.mark.faults
def test_a_failure_while_writing_leaves_no_partial_files(tmp_path, model, encoder, monkeypatch):
    from mil_runtime.outputs import writer

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writer, "write_tiles_csv", broken)  # after heatmap, mask, GeoJSON are staged
    with pytest.raises(OSError, match="disk full"):
        run_slide(shared_file("slides/CMU-1-Small-Region.svs"), model, encoder, out_dir=tmp_path)
    assert _files(tmp_path) == []  # no outputs, no hidden temporaries


@pytest.mark.faults
def test_model_without_tiling_is_refused_before_reading(tmp_path, encoder):
    model = DarknessModel()
    model.metadata.tiling = None
    with pytest.raises(ContractMismatchError, match="tiling"):
        run_slide(shared_file("slides/CMU-1-Small-Region.svs"), model, encoder, out_dir=tmp_path)
    assert encoder.calls == 0


@pytest.mark.faults
def test_encoder_with_another_fixed_tile_size_is_refused_before_reading(tmp_path, model, encoder):
    encoder.tile_px = 256
    with pytest.raises(ContractMismatchError, match="256"):
        run_slide(shared_file("slides/CMU-1-Small-Region.svs"), model, encoder, out_dir=tmp_path)
    assert encoder.calls == 0 and _files(tmp_path) == []


def test_mpp_override_and_no_out_dir(model, encoder):
    # boxes-4-levels.tiff is 300 x 250 px: with --mpp 0.5 a 112 px tile at 1 um/px is 224 level-0 px
    tiny_model = DarknessModel(tile_px=112, mpp=1.0)
    try:
        result = run_slide(shared_file("slides/boxes-4-levels.tiff"), tiny_model, encoder, mpp=0.5,
                           tissue_threshold=0.0)
    except NoTissueError:
        pytest.fail("tissue_threshold=0 keeps every whole tile")
    assert (result.mpp, result.mpp_source) == (0.5, "override")
    assert result.plan.tile_level0 == 224 and result.plan.level == 1  # downsample 2 <= 2 (target / slide)
    assert result.n_tiles == 1 and result.outputs == {}
