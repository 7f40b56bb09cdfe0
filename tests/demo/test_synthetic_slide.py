"""The synthetic slide generator: files OpenSlide reads as designed, and ground truth that matches pixels."""

from __future__ import annotations

import math

import numpy as np
import openslide
import pytest
import tifffile

from mil_runtime.demo import write_blank_slide, write_synthetic_slide

LESION = (700, 1300, 300)  # (cy, cx, r): a disc well inside a 2048 x 2048 slide


@pytest.fixture(scope="module")
def svs(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "lesion.svs"
    return write_synthetic_slide(path, height=2048, width=2048, mpp=0.5, lesions=[LESION], tissue=0.6, seed=3)


def _rgb(slide: openslide.OpenSlide, y: int, x: int, size: int) -> np.ndarray:
    return np.asarray(slide.read_region((x, y), 0, (size, size)).convert("RGB"), dtype=np.float32)


def test_aperio_svs_opens_with_mpp_and_pyramid(svs):
    with openslide.OpenSlide(svs.path) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        assert slide.level_count == 3
        assert slide.level_dimensions == ((2048, 2048), (1024, 1024), (512, 512))
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
    assert svs.shape == (2048, 2048)
    assert svs.level_downsamples == (1, 2, 4)


@pytest.mark.parametrize("suffix", [".svs", ".tif"])
def test_every_level_is_jpeg_tiled(tmp_path, suffix):
    info = write_synthetic_slide(tmp_path / f"s{suffix}", height=1000, width=1300, mpp=0.25, seed=1, tile=128)
    with tifffile.TiffFile(info.path) as tif:
        assert len(tif.pages) == 3
        for page in tif.pages:
            assert page.is_tiled
            assert (page.tilelength, page.tilewidth) == (128, 128)
            assert page.compression == tifffile.COMPRESSION.JPEG


def test_generic_tiff_reports_mpp_from_resolution_tags(tmp_path):
    info = write_synthetic_slide(tmp_path / "g.tiff", height=1024, width=1536, mpp=0.25, seed=2, levels=4)
    with openslide.OpenSlide(info.path) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25, rel=1e-4)
        assert slide.level_count == 4
        assert slide.level_dimensions[0] == (1536, 1024)  # OpenSlide gives (width, height)
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0, 8.0))


def test_lesion_is_darker_bluer_and_denser_than_normal_tissue(svs):
    cy, cx, r = LESION
    with openslide.OpenSlide(svs.path) as slide:
        lesion = _rgb(slide, cy - 100, cx - 100, 200)
        # a normal tissue square: most tissue-covered 200 px square with no lesion in it
        candidates = [
            (y, x)
            for y in range(0, 2048 - 200, 100)
            for x in range(0, 2048 - 200, 100)
            if svs.lesion_fraction(y, x, 200) == 0 and svs.tissue_fraction(y, x, 200) == 1.0
        ]
        assert candidates, "the generator should leave lesion-free tissue"
        normal = _rgb(slide, *candidates[len(candidates) // 2], 200)
        assert svs.tissue_fraction(0, 0, 64) == 0.0  # the top-left corner is glass for this seed
        background = _rgb(slide, 0, 0, 64)

    def nuclear(px):  # purple/blue nuclei: dark in red, much lower red than blue
        return (px[..., 0] < 150) & (px[..., 2] > px[..., 0])

    assert lesion.mean() < normal.mean() - 15  # darker
    assert (lesion[..., 2] - lesion[..., 0]).mean() > (normal[..., 2] - normal[..., 0]).mean() + 15  # bluer
    assert nuclear(lesion).mean() > 2 * nuclear(normal).mean()  # denser nuclei
    assert 0.02 < nuclear(normal).mean() < 0.3  # normal tissue has nuclei, but mostly stroma
    assert background.mean() > 225 and nuclear(background).mean() == 0


def test_lesion_fraction_hand_cases(svs):
    cy, cx, r = LESION
    assert svs.lesion_fraction(cy - 50, cx - 50, 100) == 1.0  # well inside
    assert svs.lesion_fraction(0, 0, 100) == 0.0  # far away
    # the square circumscribing the disc holds pi/4 of it
    assert svs.lesion_fraction(cy - r, cx - r, 2 * r, samples=64) == pytest.approx(math.pi / 4, abs=0.01)
    # a square whose left edge runs through the centre, spanning the disc vertically: half the disc
    half = svs.lesion_fraction(cy - r, cx, 2 * r, samples=64)
    assert half == pytest.approx(math.pi / 8, abs=0.01)
    coords = np.array([[cy - 50, cx - 50], [0, 0]])
    np.testing.assert_array_equal(svs.lesion_fractions(coords, 100), [1.0, 0.0])


def test_same_seed_same_slide_other_seed_other_slide(tmp_path):
    a = write_synthetic_slide(tmp_path / "a.svs", height=768, width=768, lesions="random 2", seed=5)
    b = write_synthetic_slide(tmp_path / "b.svs", height=768, width=768, lesions="random 2", seed=5)
    c = write_synthetic_slide(tmp_path / "c.svs", height=768, width=768, lesions="random 2", seed=6)
    assert a.lesions == b.lesions and a.lesions != c.lesions
    pages = [tifffile.imread(s.path) for s in (a, b, c)]
    np.testing.assert_array_equal(pages[0], pages[1])
    assert np.abs(pages[0].astype(int) - pages[2].astype(int)).mean() > 1


def test_random_lesions_sit_on_tissue(tmp_path):
    info = write_synthetic_slide(tmp_path / "r.svs", height=2048, width=2048, lesions=3, tissue=0.5, seed=9)
    assert len(info.lesions) == 3
    for cy, cx, r in info.lesions:
        assert r <= 2048 // 4 and r <= cy <= 2048 - r and r <= cx <= 2048 - r
        assert info.tissue_fraction(cy - 16, cx - 16, 32) == 1.0
    with pytest.raises(ValueError, match="random N"):
        write_synthetic_slide(tmp_path / "bad.svs", height=256, width=256, lesions="some")


def test_clean_slide_has_no_lesions_and_blank_slide_has_no_tissue(tmp_path):
    clean = write_synthetic_slide(tmp_path / "clean.svs", height=1024, width=1024, seed=1)
    assert not clean.is_lesion_slide and clean.lesion_fraction(0, 0, 1024) == 0.0
    assert clean.tissue_fraction(0, 0, 1024) == pytest.approx(0.6, abs=0.02)
    blank = write_blank_slide(tmp_path / "blank.svs", height=1024, width=1024)
    assert blank.tissue_mask is None and blank.tissue_fraction(0, 0, 1024) == 0.0
    with openslide.OpenSlide(blank.path) as slide:
        pixels = np.asarray(slide.read_region((0, 0), 0, (1024, 1024)).convert("RGB"), dtype=np.float32)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    saturation = pixels.max(axis=-1) - pixels.min(axis=-1)
    assert pixels.mean() > 225 and np.percentile(saturation, 99) < 40
