"""QuPath out and in: the tile GeoJSON (ids, measurements, valid rings, the prediction annotation), its
coordinate frame on a slide with OpenSlide bounds, regions of interest from QuPath's annotation export,
and `--outputs` choosing the members of the set.

The slide with bounds is a generated Leica SCN (BigTIFF whose XML places the scanned image at an
offset inside the collection): OpenSlide reports that offset as openslide.bounds-x/y, and level 0
spans the whole collection, with the scan at (bounds-x, bounds-y). QuPath crops to the bounds, so
a pixel at (x, y) of the scanned image is (x, y) in QuPath and (x + bounds-x, y + bounds-y) in level 0.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import Point, shape
from slide_helpers import DarknessModel, MeanColourEncoder

from mil_runtime.errors import InputNotFoundError, InvalidInputError
from mil_runtime.model import Prediction
from mil_runtime.outputs.record import read_output_set
from mil_runtime.pipeline import run_slide
from mil_runtime.slide.open import open_slide
from mil_runtime.slide.regions import find_roi_file, read_regions

tifffile = pytest.importorskip("tifffile")

MPP = 0.5
NM_PER_PX = 500  # Leica "clicks" are nanometres
SCAN_W, SCAN_H = 2048, 1536  # the scanned image, px
BOUNDS = (256, 128)  # where the scan sits inside the collection, level-0 px
MARGIN = (384, 256)  # collection size = scan + bounds + this
TISSUE = (512, 384, 1536, 1152)  # (x0, y0, x1, y1) of the stained block, in scan (QuPath) px
DARK = (1024, 768, 1280, 1024)  # a darker square inside it: the darkness model's most attended tiles
TILE = 128


def scan_pixels() -> np.ndarray:
    image = np.full((SCAN_H, SCAN_W, 3), 235, dtype=np.uint8)  # (H, W, 3) glass
    x0, y0, x1, y1 = TISSUE
    image[y0:y1, x0:x1] = (200, 110, 170)  # eosin pink
    x0, y0, x1, y1 = DARK
    image[y0:y1, x0:x1] = (120, 50, 130)  # hematoxylin-dark
    return image


def write_leica_scn(path: Path) -> Path:
    width, height = SCAN_W + BOUNDS[0] + MARGIN[0], SCAN_H + BOUNDS[1] + MARGIN[1]
    pixels = scan_pixels()
    description = f"""<?xml version="1.0" encoding="utf-8"?>
<scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01">
 <collection name="milkit-bounds" uuid="1" sizeX="{width * NM_PER_PX}" sizeY="{height * NM_PER_PX}">
  <barcode>milkit</barcode>
  <image name="main" uuid="2">
   <device model="Leica SCN400;Leica SCN" version="1.5"/>
   <pixels sizeX="{SCAN_W}" sizeY="{SCAN_H}">
    <dimension sizeX="{SCAN_W}" sizeY="{SCAN_H}" r="0" ifd="0"/>
    <dimension sizeX="{SCAN_W // 4}" sizeY="{SCAN_H // 4}" r="1" ifd="1"/>
   </pixels>
   <view sizeX="{SCAN_W * NM_PER_PX}" sizeY="{SCAN_H * NM_PER_PX}" offsetX="{BOUNDS[0] * NM_PER_PX}"
         offsetY="{BOUNDS[1] * NM_PER_PX}" spacingZ="0"/>
   <scanSettings><objectiveSettings><objective>20</objective></objectiveSettings>
    <illuminationSettings><illuminationSource>brightfield</illuminationSource></illuminationSettings>
   </scanSettings>
  </image>
 </collection>
</scn>"""
    resolution = (1e4 / MPP, 1e4 / MPP)  # px per cm
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(pixels, tile=(256, 256), compression="zlib", photometric="rgb", description=description,
                  resolution=resolution, resolutionunit="CENTIMETER", metadata=None)
        tif.write(np.ascontiguousarray(pixels[::4, ::4]), tile=(256, 256), compression="zlib",
                  photometric="rgb", metadata=None)
    return path


@pytest.fixture(scope="module")
def bounds_slide(tmp_path_factory) -> Path:
    path = write_leica_scn(tmp_path_factory.mktemp("scn") / "bounded.scn")
    with open_slide(path) as slide:  # the premise: OpenSlide reports the offset as its bounds
        assert (int(slide.properties["openslide.bounds-x"]), int(slide.properties["openslide.bounds-y"])) == BOUNDS
    return path


def run(slide: Path, out: Path, **options):
    return run_slide(slide, DarknessModel(tile_px=TILE, mpp=MPP), MeanColourEncoder(), out_dir=out, **options)


def tiles_of(collection: dict) -> list[dict]:
    return [f for f in collection["features"] if f["properties"]["objectType"] == "tile"]


def corners(collection: dict) -> np.ndarray:
    return np.array([f["geometry"]["coordinates"][0][0] for f in tiles_of(collection)])  # (N, 2) (x, y)


def test_geojson_frames_on_a_slide_with_bounds(bounds_slide, tmp_path):
    results = {frame: run(bounds_slide, tmp_path / frame, geojson_frame=frame) for frame in ("bounds", "level0")}
    np.testing.assert_array_equal(results["bounds"].xy_level0, results["level0"].xy_level0)
    xy = results["level0"].xy_level0  # (N, 2) level 0
    geo = {frame: json.loads((tmp_path / frame / "bounded.tiles.geojson").read_text()) for frame in results}
    np.testing.assert_array_equal(corners(geo["level0"]), xy)
    np.testing.assert_array_equal(corners(geo["bounds"]), xy - np.array(BOUNDS))
    # the bounds frame is the scanned image's own pixels (QuPath's): every tile lies on the stained block
    pixels, tile_xy = scan_pixels(), corners(geo["bounds"])
    assert (tile_xy >= 0).all()
    for x, y in tile_xy:
        patch = pixels[y:y + TILE, x:x + TILE]
        assert (patch != 235).any(axis=2).mean() >= 0.25, (x, y)
    # and the most attended tile is in the dark square, in QuPath's pixels
    top = tiles_of(geo["bounds"])[int(np.argmax(results["bounds"].attention))]
    x, y = top["geometry"]["coordinates"][0][0]
    assert DARK[0] - TILE <= x <= DARK[2] and DARK[1] - TILE <= y <= DARK[3]
    record = json.loads((tmp_path / "bounds" / "bounded.json").read_text())
    assert record["output_options"]["geojson_frame"] == "bounds"
    assert record["output_options"]["geojson_offset"] == list(BOUNDS)
    assert [[t["x"], t["y"]] for t in record["tiles"]] == xy.tolist()  # JSON and CSV stay in level 0
    other = json.loads((tmp_path / "level0" / "bounded.json").read_text())
    assert other["output_set"]["run_key"] != record["output_set"]["run_key"]  # another frame, another set


def test_tile_geojson_is_what_qupath_imports(bounds_slide, tmp_path):
    result = run(bounds_slide, tmp_path)
    collection = json.loads((tmp_path / "bounded.tiles.geojson").read_text())
    tiles = tiles_of(collection)
    assert len(tiles) == result.n_tiles
    ids = [uuid.UUID(f["id"]) for f in collection["features"]]  # every feature: a UUID, all distinct
    assert len(set(ids)) == len(ids)
    order = np.argsort(-result.attention, kind="stable")
    for rank, i in enumerate(order, start=1):
        tile = tiles[i]
        polygon = shape(tile["geometry"])
        ring = tile["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and polygon.is_valid and polygon.area == TILE * TILE
        values = tile["properties"]["measurements"]
        assert values["attention"] == pytest.approx(float(result.attention[i]))
        if result.attention[i] != result.attention[order[rank - 2]] or rank == 1:  # untied: its own rank
            assert values["attention_rank"] == rank
        assert 0.0 <= values["attention_percentile"] <= 1.0
    annotations = [f for f in collection["features"] if f["properties"]["objectType"] == "annotation"]
    assert len(annotations) == 1
    annotation = annotations[0]["properties"]
    assert annotation["classification"]["name"] == result.predicted_name
    probabilities = dict(zip(result.class_names, result.class_probabilities.tolist()))
    assert annotation["measurements"] == pytest.approx({f"prob_{k}": v for k, v in probabilities.items()})
    extent = shape(annotations[0]["geometry"])
    assert extent.is_valid and all(extent.covers(shape(t["geometry"])) for t in tiles)
    again = run(bounds_slide, tmp_path / "again")  # ids are stable: the same tile keeps its id
    assert json.loads((tmp_path / "again" / "bounded.tiles.geojson").read_text())["features"][0]["id"] == tiles[0]["id"]


def qupath_export(path: Path, geometries: list[dict]) -> Path:
    """An annotation export as QuPath writes it: a FeatureCollection of annotation Features."""
    features = [{"type": "Feature", "id": str(uuid.uuid4()), "geometry": g,
                 "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}
                for g in geometries]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def square(x0, y0, x1, y1) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def tile_centres(xy: np.ndarray) -> list[Point]:
    return [Point(x + TILE / 2, y + TILE / 2) for x, y in xy.tolist()]


def test_roi_restricts_tiling_with_holes_and_multipolygons(bounds_slide, tmp_path):
    everything = run(bounds_slide, tmp_path / "all")
    # in QuPath's (bounds) frame: the left half of the block with a hole, and a separate square on the right
    hole = square(640, 512, 896, 768)
    left = {"type": "Polygon", "coordinates": [square(512, 384, 1024, 1152), hole]}
    right = {"type": "MultiPolygon", "coordinates": [[square(1280, 384, 1536, 640)]]}
    roi = qupath_export(tmp_path / "bounded.geojson", [left, right, {"type": "Point", "coordinates": [5, 5]}])
    result = run(bounds_slide, tmp_path / "roi", roi=roi)
    inside = shape(left).union(shape({"type": "MultiPolygon", "coordinates": right["coordinates"]}))
    qupath_xy = result.xy_level0 - np.array(BOUNDS)
    assert 0 < result.n_tiles < everything.n_tiles
    assert {tuple(p) for p in result.xy_level0.tolist()} <= {tuple(p) for p in everything.xy_level0.tolist()}
    for centre in tile_centres(qupath_xy):  # every kept tile lies mostly inside the regions, none in the hole
        assert inside.buffer(TILE / 2).contains(centre)
        assert not shape({"type": "Polygon", "coordinates": [hole]}).buffer(-TILE / 2).contains(centre)
    expected = [p for p, c in zip(everything.xy_level0.tolist(), tile_centres(everything.xy_level0 - np.array(BOUNDS)))
                if inside.buffer(-TILE / 2).contains(c)]  # tiles well inside the regions are all kept
    assert {tuple(p) for p in expected} <= {tuple(p) for p in result.xy_level0.tolist()}
    assert any("Point" in w for w in result.warnings)
    record = json.loads((tmp_path / "roi" / "bounded.json").read_text())
    assert record["roi"]["n_polygons"] == 2 and record["roi"]["frame"] == "bounds"
    assert record["roi"]["offset"] == list(BOUNDS) and record["roi"]["file"] == str(roi)
    first_ring = np.array(record["roi"]["geometry"]["coordinates"][0][0])  # recorded in level 0
    np.testing.assert_array_equal(first_ring, np.array(square(512, 384, 1024, 1152)) + np.array(BOUNDS))
    plain = json.loads((tmp_path / "all" / "bounded.json").read_text())
    assert plain["roi"] is None and plain["output_set"]["run_key"] != record["output_set"]["run_key"]


def test_roi_folder_is_matched_by_stem_and_level0_frame_is_not_shifted(bounds_slide, tmp_path):
    folder = tmp_path / "regions"
    folder.mkdir()
    block = square(*np.add(TISSUE, [*BOUNDS, *BOUNDS]).tolist())  # the block in level-0 px
    qupath_export(folder / "bounded.geojson", [{"type": "Polygon", "coordinates": [block]}])
    assert find_roi_file(folder, bounds_slide) == folder / "bounded.geojson"
    result = run(bounds_slide, tmp_path / "out", roi=folder, geojson_frame="level0")
    everything = run(bounds_slide, tmp_path / "all", geojson_frame="level0")
    np.testing.assert_array_equal(result.xy_level0, everything.xy_level0)  # the region is the whole block
    with pytest.raises(InputNotFoundError, match="other.geojson"):
        find_roi_file(folder, "slides/other.svs")


@pytest.mark.faults
@pytest.mark.parametrize("text, message", [
    ("{not json", "not JSON"),
    (json.dumps({"type": "FeatureCollection", "features": []}), "no Polygon or MultiPolygon"),
    (json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [1, "a"], [2, 2]]]}), "list of \\[x, y\\] numbers"),
    (json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}), "at least 3"),
])
def test_bad_roi_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "roi.geojson"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=message) as caught:
        read_regions(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_roi_outside_the_tissue_is_no_tissue(bounds_slide, tmp_path):
    from mil_runtime.errors import NoTissueError

    roi = qupath_export(tmp_path / "glass.geojson", [{"type": "Polygon", "coordinates": [square(0, 0, 300, 300)]}])
    with pytest.raises(NoTissueError, match="inside --roi"):
        run(bounds_slide, tmp_path / "out", roi=roi)
    assert not list((tmp_path / "out").glob("bounded*"))


def test_outputs_choose_the_members_of_the_set(bounds_slide, tmp_path):
    run(bounds_slide, tmp_path, outputs="geojson,csv")
    found = read_output_set(tmp_path, "bounded")
    assert found.complete, found.reason
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bounded.json", "bounded.tiles.csv", "bounded.tiles.geojson"]
    assert set(found.record["output_set"]["files"]) == {"bounded.tiles.csv", "bounded.tiles.geojson"}
    assert found.record["output_options"]["outputs"] == ["json", "geojson", "csv"]
    default = run(bounds_slide, tmp_path / "default")
    assert found.run_key != read_output_set(tmp_path / "default", "bounded").run_key  # other outputs, other set
    assert set(default.outputs) == {"result", "heatmap", "tissue_mask", "geojson", "tiles_csv", "features"}
    with pytest.raises(InvalidInputError, match="unknown output 'pdf'"):
        run(bounds_slide, tmp_path / "bad", outputs="json,pdf")
    with pytest.raises(InvalidInputError, match="needs a DICOM input"):
        run(bounds_slide, tmp_path / "bad", outputs="json,dicom")
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").iterdir())


class InstanceClassifierModel(DarknessModel):
    """The darkness model with an instance classifier: each tile's probability of "positive" is its darkness."""

    def predict(self, features, coords=None, *, source=""):
        prediction = super().predict(features, coords, source=source)
        darkness = np.clip(features[:, 3], 0, 1).astype(np.float32)
        return Prediction(**{**prediction.__dict__, "instance_probabilities": {"positive": darkness}})


def test_instance_probabilities_become_prob_columns(bounds_slide, tmp_path):
    result = run_slide(bounds_slide, InstanceClassifierModel(tile_px=TILE, mpp=MPP), MeanColourEncoder(),
                       out_dir=tmp_path)
    darkness = result.features[:, 3]
    tiles = tiles_of(json.loads((tmp_path / "bounded.tiles.geojson").read_text()))
    np.testing.assert_allclose([t["properties"]["measurements"]["prob_positive"] for t in tiles], darkness, rtol=1e-6)
    import csv

    with open(tmp_path / "bounded.tiles.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    np.testing.assert_allclose([float(r["prob_positive"]) for r in rows], darkness, rtol=1e-6)


def test_the_run_key_is_known_before_the_slide_is_opened(bounds_slide, tmp_path):
    """The key a run records equals the one computed from the request alone (what a cohort's resume uses)."""
    from mil_runtime.run_key import compute_run_key, file_sha256, run_settings
    from mil_runtime.slide.tissue import TISSUE_THRESHOLD

    roi = qupath_export(tmp_path / "r.geojson", [{"type": "Polygon", "coordinates": [square(*TISSUE)]}])
    runs = {
        "plain": ({}, run_settings(tissue_threshold=TISSUE_THRESHOLD, outputs=["json", "heatmap", "tissue", "geojson",
                                                                               "csv", "features"],
                                   geojson_frame="bounds")),
        "chosen": ({"roi": roi, "mpp": 0.5, "tissue_threshold": 0.4, "outputs": "csv,json", "geojson_frame": "level0"},
                   run_settings(mpp_override=0.5, tissue_threshold=0.4, roi_sha256=file_sha256(roi), roi_frame="level0",
                                outputs=["json", "csv"], geojson_frame="level0")),
    }
    keys = set()
    for name, (options, settings) in runs.items():
        result = run(bounds_slide, tmp_path / name, **options)
        expected = compute_run_key(bounds_slide, model_sha256=result.runner.sha256, encoder_sha256=result.encoder["sha256"],
                                   settings=settings)
        assert read_output_set(tmp_path / name, "bounded").run_key == expected
        keys.add(expected)
    assert len(keys) == 2
