"""DICOM WSI inputs (mil_runtime.slide.dicom, open.py): OpenSlide opens the series from its folder or any
instance; the identity outputs refer to is the series' own; what is not a readable slide stops with
one line and exit code 8.

Truth: the series written by dicom_helpers (pydicom alone, UIDs known), wsidicom's decoding of the
same frames, and the synthetic TIFF the levels came from.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mil_runtime.errors import SlideReadError
from mil_runtime.slide.dicom import is_dicom_input, read_dicom_source, resolve_dicom_input
from mil_runtime.slide.mpp import OPENSLIDE, resolve_mpp
from mil_runtime.slide.open import open_slide

from dicom_helpers import SLIDE_MPP, SLIDE_PX, ORIGIN_MM, WSI_SOP_CLASS, tiff_levels, write_dicom_wsi

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "models" / "demo" / "abmil_demo.onnx"


def mil_infer(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mil_runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def _copy_series(wsi, folder: Path) -> Path:
    shutil.copytree(wsi.folder, folder)
    return folder


def _truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(keep)


def _pixel_data_offset(path: Path) -> int:
    import pydicom

    with open(path, "rb") as handle:
        pydicom.dcmread(handle, stop_before_pixels=True)
        return handle.tell()


def _secondary_capture(path: Path) -> Path:
    """A small, valid DICOM image that is not a slide (Secondary Capture), written with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "OT", "X"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(64)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# -- reading ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("given", ["folder", "level0.dcm", "level2.dcm", "label.dcm"])
def test_openslide_reads_the_series_from_its_folder_or_any_instance(dicom_wsi, given):
    from wsidicom import WsiDicom

    path = dicom_wsi.folder if given == "folder" else dicom_wsi.folder / given
    with open_slide(path) as slide:
        assert slide.dimensions == (SLIDE_PX, SLIDE_PX)
        assert list(slide.level_dimensions) == dicom_wsi.level_sizes
        assert resolve_mpp(slide.properties) == (pytest.approx(SLIDE_MPP), OPENSLIDE)
        regions = [((700, 900), 0, (300, 260)), ((1200, 400), 1, (200, 180))]
        ours = [slide.read_rgb(*region).astype(np.int16) for region in regions]
    with WsiDicom.open(dicom_wsi.folder) as wsi:  # an independent decoder of the same frames
        for (location, level, size), pixels in zip(regions, ours):
            at_level = (location[0] // 2 ** level, location[1] // 2 ** level)  # wsidicom: the level's own px
            theirs = np.asarray(wsi.read_region(at_level, level, size).convert("RGB")).astype(np.int16)
            assert theirs.shape == pixels.shape
            assert np.abs(theirs - pixels).mean() < 1.5  # two JPEG decoders, same frames
    levels = tiff_levels(dicom_wsi.tiff)  # and the pixels are the synthetic slide's (one more JPEG pass)
    for (location, level, size), pixels in zip(regions, ours):
        scale = 2 ** level
        x, y = location[0] // scale, location[1] // scale
        source = levels[level][y:y + size[1], x:x + size[0]].astype(np.int16)
        assert np.abs(source - pixels).mean() < 4.0


def test_is_dicom_input_tells_dicom_from_other_inputs_without_pydicom(dicom_wsi, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("hello")
    unnamed = tmp_path / "unnamed"
    shutil.copy(dicom_wsi.files[1], unnamed)  # DICM preamble, no .dcm suffix
    cases = {dicom_wsi.folder: True, dicom_wsi.files[2]: True, unnamed: True, dicom_wsi.tiff: False,
             tmp_path / "empty": False, tmp_path / "texts": False, tmp_path / "texts" / "a.txt": False}
    code = (
        "import sys\nfrom mil_runtime.slide.dicom import is_dicom_input\n"
        f"cases = {dict((str(k), v) for k, v in cases.items())!r}\n"
        "got = {path: is_dicom_input(path) for path in cases}\n"
        "assert got == cases, got\n"
        "assert 'pydicom' not in sys.modules, 'is_dicom_input imported pydicom'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_source_identity_is_the_series_own(dicom_wsi):
    assert resolve_dicom_input(dicom_wsi.folder) == dicom_wsi.files[0]
    assert resolve_dicom_input(dicom_wsi.files[2]) == dicom_wsi.files[0]  # the series' level 0, not the file given
    assert resolve_dicom_input(dicom_wsi.folder / "label.dcm") == dicom_wsi.files[0]
    source = read_dicom_source(dicom_wsi.files[1])
    assert source.file == dicom_wsi.files[0]
    assert source.study_instance_uid == dicom_wsi.study_uid
    assert source.series_instance_uid == dicom_wsi.series_uid
    assert source.frame_of_reference_uid == dicom_wsi.frame_of_reference_uid
    assert source.sop_class_uid == WSI_SOP_CLASS
    assert source.sop_instance_uid == dicom_wsi.sop_instance_uids[0]
    assert sorted(uid for _, uid in source.instances) == sorted(dicom_wsi.sop_instance_uids)
    assert (source.total_pixel_matrix_columns, source.total_pixel_matrix_rows) == (SLIDE_PX, SLIDE_PX)
    assert source.pixel_spacing == pytest.approx((SLIDE_MPP / 1000, SLIDE_MPP / 1000))
    assert source.origin == pytest.approx(ORIGIN_MM)
    assert source.image_orientation == (0.0, -1.0, 0.0, -1.0, 0.0, 0.0)
    assert source.container_identifier == dicom_wsi.container_id
    assert source.specimen_identifiers == ("SPECIMEN-1",)
    assert "PixelData" not in source.dataset  # headers only: a source never holds a slide's frames
    assert [d.SOPInstanceUID for d in source.other_datasets] == dicom_wsi.level_uids[1:]  # levels, not the label
    assert source.instances[-1][1] == dicom_wsi.sop_instance_uids[-1]  # the label is listed, last


def test_a_folder_with_two_slides_asks_for_one_file(dicom_wsi, tmp_path):
    folder = _copy_series(dicom_wsi, tmp_path / "two")
    other = write_dicom_wsi(tiff_levels(dicom_wsi.tiff)[2:], tmp_path / "other", SLIDE_MPP, seed=5)
    shutil.copy(other.files[0], folder / "other.dcm")
    with pytest.raises(SlideReadError, match="2 slide series") as caught:
        open_slide(folder)
    assert "\n" not in str(caught.value)
    assert resolve_dicom_input(folder / "level1.dcm") == folder / "level0.dcm"  # one file picks its series
    assert resolve_dicom_input(folder / "other.dcm") == folder / "other.dcm"


# -- refusals ----------------------------------------------------------------------------------
@pytest.mark.faults
def test_a_dicom_object_that_is_not_a_slide_is_refused(tmp_path):
    capture = _secondary_capture(tmp_path / "sc" / "image.dcm")
    with pytest.raises(SlideReadError, match="not a VL Whole Slide Microscopy Image") as caught:
        open_slide(capture)
    assert str(capture) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(SlideReadError, match="holds no VL Whole Slide Microscopy Image") as caught:
        open_slide(capture.parent)
    assert "image.dcm" in str(caught.value)


@pytest.mark.faults
def test_an_empty_folder_is_refused(tmp_path):
    with pytest.raises(SlideReadError, match="holds no DICOM files"):
        open_slide(tmp_path)


@pytest.mark.faults
@pytest.mark.parametrize("cut", ["preamble", "header", "before_frames", "mid_frames", "last_byte"])
@pytest.mark.parametrize("level", [0, 2])
def test_a_truncated_instance_stops_the_slide_before_any_read(dicom_wsi, tmp_path, cut, level):
    folder = _copy_series(dicom_wsi, tmp_path / "series")
    victim = folder / f"level{level}.dcm"
    size, pixels_at = victim.stat().st_size, _pixel_data_offset(victim)
    keep = {"preamble": 100, "header": pixels_at // 2, "before_frames": pixels_at + 12,
            "mid_frames": (pixels_at + size) // 2, "last_byte": size - 1}[cut]
    _truncate(victim, keep)
    for given in (folder, folder / "level1.dcm"):  # the folder, or a healthy file of the same series
        with pytest.raises(SlideReadError) as caught:
            open_slide(given)
        message = str(caught.value)
        assert victim.name in message and "\n" not in message
        assert "truncated" in message or "damaged" in message


@pytest.mark.faults
def test_mil_infer_refuses_bad_dicom_inputs_in_one_line(dicom_wsi, tmp_path):
    capture = _secondary_capture(tmp_path / "sc" / "image.dcm")
    folder = _copy_series(dicom_wsi, tmp_path / "series")
    _truncate(folder / "level0.dcm", folder.joinpath("level0.dcm").stat().st_size // 2)
    for bad, words in ((capture, "not a VL Whole Slide Microscopy Image"), (folder, "truncated")):
        run = mil_infer(bad, "--model", DEMO_MODEL, "--out", tmp_path / "out", "--quiet")
        assert run.returncode == SlideReadError.exit_code, run.stderr
        assert run.stderr.count("\n") == 1 and words in run.stderr
        assert "level0.dcm" in run.stderr or str(bad) in run.stderr
    out = tmp_path / "out"
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix in (".json", ".dcm", ".png")]


@pytest.mark.faults
def test_without_the_dicom_extra_a_dicom_slide_names_the_extra(dicom_wsi):
    """pydicom / highdicom hidden from the import system: reading and writing DICOM say how to install them."""
    code = (
        "import sys, importlib.abc\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pydicom', 'highdicom'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from mil_runtime.errors import MilkitError\n"
        "from mil_runtime.slide.open import open_slide\n"
        "from mil_runtime.outputs.dicom import write_dicom_outputs\n"
        "for call in (lambda: open_slide(sys.argv[1]), lambda: write_dicom_outputs(None, None, {}, 'a', 'b')):\n"
        "    try:\n"
        "        call()\n"
        "    except MilkitError as exc:\n"
        "        assert 'pip install \"milkit[dicom]\"' in str(exc) and '\\n' not in str(exc), exc\n"
        "    else:\n"
        "        raise AssertionError('no error without the dicom extra')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(dicom_wsi.folder)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
