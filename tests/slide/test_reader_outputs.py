"""Threaded tile reading, and the output formats: GeoJSON, heatmap, CSV, colour map."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from slide_helpers import shared_file
from PIL import Image

from mil_runtime.outputs.colormap import apply_colormap, viridis_lut
from mil_runtime.outputs.geojson import tiles_feature_collection
from mil_runtime.outputs.heatmap import attention_heatmap, normalise
from mil_runtime.outputs.tables import COLUMNS, write_tiles_csv
from mil_runtime.slide.grid import plan_grid
from mil_runtime.slide.mpp import resolve_mpp
from mil_runtime.slide.open import open_slide
from mil_runtime.slide.reader import TileReader


def test_threaded_reader_matches_direct_reads_in_order():
    path = shared_file("slides/fluorescence-7-levels.ndpi")
    with open_slide(path) as slide:
        mpp, _ = resolve_mpp(slide.properties)
        plan = plan_grid(slide.dimensions, slide.level_downsamples, mpp, tile_px=224, target_mpp=0.5)
        xy = plan.positions(slide.dimensions)[::7][:10]  # 10 tiles spread over the slide
        expected = []
        for x, y in xy:
            region = slide.read_rgb((int(x), int(y)), plan.level, (plan.read_px, plan.read_px))
            expected.append(np.asarray(Image.fromarray(region).resize((224, 224), Image.Resampling.BILINEAR)))
    batches = list(TileReader(path, plan, xy, batch_size=4, workers=3, prefetch=3))
    assert [start for start, _ in batches] == [0, 4, 8]
    assert [tiles.shape for _, tiles in batches] == [(4, 224, 224, 3), (4, 224, 224, 3), (2, 224, 224, 3)]
    tiles = np.concatenate([t for _, t in batches])
    assert tiles.dtype == np.uint8
    np.testing.assert_array_equal(tiles, np.stack(expected))


def test_geojson_is_a_qupath_tile_collection():
    xy = np.array([[0, 0], [491, 982]])
    collection = tiles_feature_collection(xy, 491, {"attention": np.array([0.25, 0.75]),
                                                    "tissue_fraction": np.array([1.0, np.nan])})
    collection = json.loads(json.dumps(collection, allow_nan=False))  # valid strict JSON
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 2
    second = collection["features"][1]
    assert second["type"] == "Feature" and second["geometry"]["type"] == "Polygon"
    ring = second["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 5
    assert {tuple(p) for p in ring} == {(491, 982), (982, 982), (982, 1473), (491, 1473)}
    assert second["properties"]["objectType"] == "tile"
    assert second["properties"]["measurements"] == {"attention": 0.75}  # NaN left out, not written


def test_heatmap_has_thumbnail_size_and_colours_only_tiles():
    thumbnail = np.full((50, 80, 3), 240, dtype=np.uint8)
    # level-0 scale 10 px per thumbnail px; tiles 100 px = 10 thumbnail px
    xy = np.array([[0, 0], [300, 200]])
    image = attention_heatmap(thumbnail, (10.0, 10.0), xy, 100, np.array([0.1, 0.9]), alpha=1.0)
    assert image.shape == thumbnail.shape and image.dtype == np.uint8
    lut = viridis_lut()
    np.testing.assert_array_equal(image[0:10, 0:10], np.broadcast_to(lut[0], (10, 10, 3)))  # lowest: purple
    np.testing.assert_array_equal(image[20:30, 30:40], np.broadcast_to(lut[-1], (10, 10, 3)))  # highest: yellow
    changed = (image != thumbnail).any(axis=2)
    assert changed.sum() == 2 * 10 * 10


def test_heatmap_colours_by_percentile_rank_not_raw_value():
    # one dominant tile must not push the runner-up into the lowest colour (min-max scaling would:
    # (0.02 - 0.01) / (0.97 - 0.01) ~ 0.01); ranks of [0.01, 0.02, 0.97] are 0, 0.5, 1
    np.testing.assert_allclose(normalise(np.array([0.01, 0.02, 0.97])), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(normalise(np.array([0.3, 0.1, 0.3, 0.2])), [5 / 6, 0.0, 5 / 6, 1 / 3])  # ties
    np.testing.assert_allclose(normalise(np.array([0.25, 0.25])), [0.5, 0.5])
    thumbnail = np.full((10, 30, 3), 240, dtype=np.uint8)
    xy = np.array([[0, 0], [100, 0], [200, 0]])
    image = attention_heatmap(thumbnail, (10.0, 10.0), xy, 100, np.array([0.01, 0.02, 0.97]), alpha=1.0)
    np.testing.assert_array_equal(image[0:10, 10:20], np.broadcast_to(apply_colormap(np.array([0.5]))[0], (10, 10, 3)))


def test_colormap_endpoints_and_monotone_brightness():
    lut = viridis_lut()
    assert lut.shape == (256, 3)
    assert tuple(lut[0]) == (68, 1, 84) and tuple(lut[-1]) == (253, 231, 37)
    brightness = lut.astype(float) @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(brightness) > -0.5)  # perceptually ordered: dark to light
    np.testing.assert_array_equal(apply_colormap(np.array([-1.0, 2.0])), lut[[0, -1]])


def test_tiles_csv_rows():
    handle = io.StringIO()
    write_tiles_csv(handle, np.array([[0, 224], [224, 224]]), 224, np.array([[1, 0], [1, 1]]),
                    np.array([0.5, 1.0]), np.array([0.25, 0.75]))
    rows = list(csv.DictReader(io.StringIO(handle.getvalue())))
    assert tuple(rows[0]) == COLUMNS and len(rows) == 2
    assert rows[1] == {"x": "224", "y": "224", "width": "224", "height": "224", "row": "1", "col": "1",
                       "tissue_fraction": "1.0000", "attention": "0.75"}


@pytest.mark.faults
@pytest.mark.parametrize("workers", [1, 2])
def test_reader_surfaces_read_errors_as_slide_read_error(workers, monkeypatch):
    from mil_runtime.errors import SlideReadError
    from mil_runtime.slide import reader as reader_module

    path = shared_file("slides/CMU-1-Small-Region.svs")
    plan = plan_grid((2220, 2967), (1.0,), 0.499, tile_px=224, target_mpp=0.5)
    xy = plan.positions((2220, 2967))[:6]

    def broken(self, index):
        raise SlideReadError("tile 3 is damaged")

    monkeypatch.setattr(reader_module.TileReader, "read_tile", broken)
    with pytest.raises(SlideReadError, match="damaged"):
        list(TileReader(path, plan, xy, batch_size=2, workers=workers))
