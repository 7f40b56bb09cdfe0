"""Fixtures of the clinical-format tests: one DICOM WSI series per session, made from a synthetic slide.

The series is written by tests/clinical/dicom_helpers.py with pydicom alone (not by the code under
test, not by highdicom) from the demo's synthetic slide: 2048 x 2048 px at 0.5 um/px, 3 levels,
two planted lesions, 256 px JPEG frames, plus a LABEL image as scanners write one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dicom_helpers import SLIDE_MPP, SLIDE_PX, DicomWsi, require_dicom_extra, tiff_levels, write_dicom_wsi  # noqa: E402


@pytest.fixture(scope="session")
def dicom_wsi(tmp_path_factory) -> DicomWsi:
    """A DICOM WSI series folder `series/` (level0.dcm .. level2.dcm, label.dcm) and its synthetic TIFF."""
    require_dicom_extra()
    from mil_runtime.demo import write_synthetic_slide

    root = tmp_path_factory.mktemp("dicom_wsi")
    truth = write_synthetic_slide(root / "synthetic.tif", height=SLIDE_PX, width=SLIDE_PX, mpp=SLIDE_MPP,
                                  lesions="random 2", tissue=0.6, seed=11, levels=3)
    wsi = write_dicom_wsi(tiff_levels(truth.path), root / "series", SLIDE_MPP, label=True)
    wsi.tiff = truth.path
    wsi.truth = truth
    return wsi
