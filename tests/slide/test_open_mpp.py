"""Opening slides (errors mapped to the milkit family) and resolving microns per pixel."""

from __future__ import annotations

import numpy as np
import pytest
from slide_helpers import shared_file

from mil_runtime.errors import InputNotFoundError, InvalidInputError, MppUnknownError, SlideReadError
from mil_runtime.slide.mpp import resolve_mpp
from mil_runtime.slide.open import open_slide, rgba_to_rgb


@pytest.mark.faults
@pytest.mark.parametrize(
    "name, words",
    [
        ("unreadable.svs", "Bogus marker length"),  # opens fine, the first pixel read fails: caught by the probe
        ("unopenable.tiff", "Unsupported TIFF compression"),
        ("not-a-slide.svs", "not a slide format"),
    ],
)
def test_bad_slides_raise_slide_read_error(name, words):
    path = shared_file(f"bad-slides/{name}")
    with pytest.raises(SlideReadError) as info:
        open_slide(path)
    message = str(info.value)
    assert words in message and str(path) in message
    assert "\n" not in message


@pytest.mark.faults
def test_missing_slide_is_input_not_found(tmp_path):
    with pytest.raises(InputNotFoundError, match="slide not found"):
        open_slide(tmp_path / "nope.svs")


@pytest.mark.faults
def test_a_folder_without_dicom_is_not_a_slide(tmp_path):
    (tmp_path / "notes.txt").write_text("not a slide")
    with pytest.raises(SlideReadError, match="holds no DICOM files"):  # folders are DICOM series, or refused
        open_slide(tmp_path)


def test_rgba_composited_onto_white_by_hand():
    rgba = np.array([[[200, 100, 0, 255], [200, 100, 0, 0], [0, 0, 0, 128], [10, 20, 30, 51]]], dtype=np.uint8)
    # alpha 128: 255 * (127 / 255) = 127; alpha 51 (0.2): 0.2 * c + 0.8 * 255 = 206, 208, 210
    expected = np.array([[[200, 100, 0], [255, 255, 255], [127, 127, 127], [206, 208, 210]]], dtype=np.uint8)
    np.testing.assert_array_equal(rgba_to_rgb(rgba), expected)


def test_mpp_from_openslide_properties():
    with open_slide(shared_file("slides/CMU-1-Small-Region.svs")) as slide:
        assert resolve_mpp(slide.properties) == (pytest.approx(0.499), "openslide")
        assert resolve_mpp(slide.properties, override=0.25) == (0.25, "override")


@pytest.mark.faults
def test_implausible_mpp_stops_and_names_the_option():
    with open_slide(shared_file("slides/boxes-4-levels.tiff")) as slide:
        with pytest.raises(MppUnknownError) as info:
            resolve_mpp(slide.properties, source_name="boxes-4-levels.tiff")
        assert "--mpp" in str(info.value) and "352.8" in str(info.value)
        assert resolve_mpp(slide.properties, override=0.5) == (0.5, "override")


@pytest.mark.parametrize(
    "props, expected",
    [
        # 43826 px/cm -> 10000 / 43826 um/px (the NDPI's own tags)
        ({"tiff.XResolution": "43826", "tiff.YResolution": "43826", "tiff.ResolutionUnit": "centimeter"},
         10_000 / 43826),
        ({"tiff.XResolution": "101600", "tiff.YResolution": "101600", "tiff.ResolutionUnit": "inch"}, 0.25),
    ],
)
def test_mpp_from_tiff_resolution_tags(props, expected):
    assert resolve_mpp(props) == (pytest.approx(expected), "tiff-resolution")


@pytest.mark.faults
@pytest.mark.parametrize(
    "props",
    [
        {},
        {"tiff.XResolution": "72", "tiff.YResolution": "72", "tiff.ResolutionUnit": "inch"},  # 352.8 um/px
        {"tiff.XResolution": "20000", "tiff.ResolutionUnit": "none"},  # no physical unit
        {"openslide.mpp-x": "0", "openslide.mpp-y": "0"},
    ],
)
def test_no_trustworthy_mpp_raises(props):
    with pytest.raises(MppUnknownError, match="--mpp"):
        resolve_mpp(props)


def test_openslide_mpp_beats_tiff_tags_and_bad_override_is_refused():
    props = {"openslide.mpp-x": "0.5", "openslide.mpp-y": "0.5", "tiff.XResolution": "101600",
             "tiff.ResolutionUnit": "inch"}
    assert resolve_mpp(props) == (0.5, "openslide")
    with pytest.raises(InvalidInputError):
        resolve_mpp(props, override=-1.0)
