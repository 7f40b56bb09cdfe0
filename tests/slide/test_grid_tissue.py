"""The micron-defined tile grid, pyramid level choice, tissue detection and per-tile tissue fraction."""

from __future__ import annotations

import numpy as np
import pytest
from slide_helpers import shared_file

from mil_runtime.errors import NoTissueError
from mil_runtime.slide.grid import pick_level, plan_grid
from mil_runtime.slide.mpp import resolve_mpp
from mil_runtime.slide.open import open_slide
from mil_runtime.slide.tissue import detect_tissue, saturation_mask, segment_tissue, tile_fractions


def test_fluorescence_grid_reads_level_one_for_a_half_micron_model():
    with open_slide(shared_file("slides/fluorescence-7-levels.ndpi")) as slide:
        mpp, _ = resolve_mpp(slide.properties)
        plan = plan_grid(slide.dimensions, slide.level_downsamples, mpp, tile_px=224, target_mpp=0.5)
        width, height = slide.dimensions
    assert mpp == pytest.approx(0.228, abs=1e-3)
    tile = round(224 * 0.5 / mpp)
    assert tile == 491
    assert (plan.tile_level0, plan.stride_level0) == (tile, tile)
    assert (plan.level, plan.downsample) == (1, 2.0)
    assert plan.read_px == round(tile / 2.0)
    xy = plan.positions((width, height))
    assert len(xy) == (width // tile) * (height // tile)
    assert np.all(np.diff(np.unique(xy[:, 0])) == tile) and np.all(np.diff(np.unique(xy[:, 1])) == tile)
    assert xy[:, 0].max() + tile <= width and xy[:, 1].max() + tile <= height
    grid = plan.grid_coords(xy)
    np.testing.assert_array_equal(grid, np.stack([xy[:, 1] // tile, xy[:, 0] // tile], axis=1))


def test_level_choice_never_upsamples_and_tolerates_rounding():
    downsamples = (1.0, 4.0, 16.016, 64.0)
    assert pick_level(downsamples, 3.9) == 0
    assert pick_level(downsamples, 3.99) == 1  # 4.0 is within 2%: a rounding of the same scale
    assert pick_level(downsamples, 4.0) == 1
    assert pick_level(downsamples, 16.0) == 2  # 16.016 is within the 2% tolerance
    assert pick_level(downsamples, 100.0) == 3
    assert pick_level(downsamples, 0.5) == 0  # model finer than the scan: level 0


def test_overlap_halves_the_stride():
    plan = plan_grid((1000, 1000), (1.0,), 0.5, tile_px=100, target_mpp=1.0, overlap=0.5)
    assert (plan.tile_level0, plan.stride_level0) == (200, 100)
    assert len(plan.positions((1000, 1000))) == 9 * 9


@pytest.mark.faults
def test_slide_smaller_than_a_tile_is_a_clear_error():
    with open_slide(shared_file("slides/tiny-16px.svs")) as slide:
        mpp, _ = resolve_mpp(slide.properties)
        with pytest.raises(NoTissueError, match="smaller than one tile"):
            plan_grid(slide.dimensions, slide.level_downsamples, mpp, tile_px=224, target_mpp=0.5)


def test_tile_fraction_by_hand():
    mask = np.zeros((4, 6), dtype=bool)
    mask[0:2, 0:3] = True  # top-left 2x3 block
    # scale 10 level-0 px per mask px; tiles of 20 level-0 px = 2x2 mask px
    xy = np.array([[0, 0], [20, 0], [40, 20], [10, 10], [15, 5]])
    fractions = tile_fractions(mask, (10.0, 10.0), xy, 20)
    # [10, 10]: mask rows 1-2, cols 1-2 -> 2 of 4; [15, 5]: cols 1-3 (partial pixels count), rows 0-2 -> 4 of 9
    np.testing.assert_allclose(fractions, [1.0, 0.5, 0.0, 0.5, 4 / 9])


@pytest.mark.faults
def test_blank_and_noisy_white_images_have_no_tissue():
    white = np.full((64, 64, 3), 255, dtype=np.uint8)
    assert not saturation_mask(white)[0].any()
    assert not segment_tissue(white, mpp=4.0)[0].any()
    rng = np.random.default_rng(0)
    noisy = np.clip(235 + rng.normal(0, 3, (64, 64, 3)), 0, 255).astype(np.uint8)  # glass + sensor noise
    assert not segment_tissue(noisy, mpp=4.0)[0].any()
    pink = noisy.copy()
    pink[16:48, 16:48] = (200, 120, 170)  # a 128 x 128 um stained square
    mask = segment_tissue(pink, mpp=4.0)[0]
    assert mask[16:48, 16:48].all() and mask.sum() == 32 * 32


def _mean_brightness(slide, xy, size):
    return np.array([slide.read_rgb((int(x), int(y)), 0, (size, size)).mean() for x, y in xy])


def test_cmu_kept_tiles_are_tissue_not_background():
    with open_slide(shared_file("slides/CMU-1-Small-Region.svs")) as slide:
        mpp, _ = resolve_mpp(slide.properties)
        plan = plan_grid(slide.dimensions, slide.level_downsamples, mpp, tile_px=224, target_mpp=0.5)
        tissue = detect_tissue(slide, mpp)
        xy = plan.positions(slide.dimensions)
        fractions = tissue.tile_fractions(xy, plan.tile_level0)
        keep = fractions >= 0.25
        kept = _mean_brightness(slide, xy[keep], plan.tile_level0)
        dropped = _mean_brightness(slide, xy[~keep], plan.tile_level0)
    assert 0.2 < keep.mean() < 0.7  # a strip of tissue on white glass
    assert 0.15 < tissue.fraction < 0.6
    assert tissue.mask.shape == tissue.thumbnail.shape[:2]
    assert kept.mean() < 200 < dropped.mean()  # stained tissue is darker than the glass
    assert np.median(dropped) > 225


def test_fluorescence_tissue_detection_keeps_stained_regions_not_black():
    with open_slide(shared_file("slides/fluorescence-7-levels.ndpi")) as slide:
        mpp, _ = resolve_mpp(slide.properties)
        tissue = detect_tissue(slide, mpp)
    assert 0.05 < tissue.fraction < 0.9
    blue = tissue.thumbnail[..., 2].astype(float)
    assert blue[tissue.mask].mean() > 2 * blue[~tissue.mask].mean()  # DAPI signal is where the mask is
