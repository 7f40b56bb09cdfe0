"""Helpers of the clinical-format tests: a DICOM whole-slide image made from the demo's synthetic slide.

`write_dicom_wsi` turns the levels of a synthetic pyramidal TIFF (mil_runtime.demo) into one VL Whole
Slide Microscopy Image instance per level, TILED_FULL, JPEG baseline frames, written with pydicom
alone, so the runtime's DICOM input and outputs are checked against a file that neither they nor
highdicom produced. A uniquely named module (not `conftest`), importable from any test.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
ORIGIN_MM = (20.0, 40.0)  # total pixel matrix origin in the slide coordinate system
SLIDE_PX = 2048  # the session's test slide (conftest): level-0 side and resolution
SLIDE_MPP = 0.5
INSTALL = 'pip install -c constraints.txt "milkit[dicom]"'


def require_dicom_extra() -> None:
    """Fail (not skip) naming the install command when the dicom extra is missing: CI installs it."""
    import importlib.util

    import pytest

    missing = [name for name in ("pydicom", "highdicom", "wsidicom") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(f"the DICOM tests need {', '.join(missing)}: {INSTALL}")


@dataclass
class DicomWsi:
    """What was written: the series folder, one file per level (level 0 first) and the identities."""

    folder: Path
    files: list[Path]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list[str]
    mpp: float
    size: tuple[int, int]  # (width, height) of level 0
    container_id: str = "SLIDE-1"
    level_sizes: list[tuple[int, int]] = field(default_factory=list)
    has_label: bool = False
    tiff: Path | None = None  # the synthetic TIFF the levels came from (conftest)
    truth: Any = None  # its mil_runtime.demo.SyntheticSlide (conftest)

    @property
    def level_uids(self) -> list[str]:
        """SOP instance UIDs of the pyramid levels (level 0 first), without the label's."""
        return self.sop_instance_uids[:len(self.level_sizes)]


def _frames(level: np.ndarray, tile: int, quality: int) -> list[bytes]:
    """JPEG baseline (4:2:2, YBR_FULL_422) frames of a level, row-major, edge tiles padded white."""
    from PIL import Image

    h, w = level.shape[:2]
    frames = []
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            block = np.full((tile, tile, 3), 255, dtype=np.uint8)
            part = level[y:y + tile, x:x + tile]
            block[:part.shape[0], :part.shape[1]] = part
            buffer = io.BytesIO()
            Image.fromarray(block).save(buffer, format="JPEG", quality=quality, subsampling=1)
            frames.append(buffer.getvalue())
    return frames


def _code(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def write_dicom_wsi(levels: list[np.ndarray], folder: Path, mpp: float, *, tile: int = 256, quality: int = 90,
                    seed: int = 0, label: bool = False) -> DicomWsi:
    """Write `levels` (level 0 first, (H, W, 3) uint8 each) as a DICOM WSI series in `folder`.

    `label`: add `label.dcm`, a LABEL image of the series (one 256 x 128 frame), as scanners do;
    its UID is last in `sop_instance_uids`, its file last in `files`.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prefix = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root
    entropy = [str(rng.integers(1 << 62))]
    study, series, frame_of_reference = (generate_uid(prefix, entropy + [k]) for k in ("study", "series", "for"))
    height0, width0 = levels[0].shape[:2]
    files, uids, sizes = [], [], []
    images = list(enumerate(levels))
    if label:
        stripes = np.full((128, 256, 3), 250, dtype=np.uint8)
        stripes[16:112:8, 16:240] = 20  # something like a printed barcode
        images.append((-1, stripes))
    for index, level in images:
        h, w = level.shape[:2]
        scale = width0 / w
        spacing_mm = mpp * scale / 1000.0
        uid = generate_uid(prefix, entropy + [f"level{index}" if index >= 0 else "label"])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = WSI_SOP_CLASS
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = JPEG_BASELINE
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = WSI_SOP_CLASS, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.Modality = "SM"
        ds.ImageType = (["ORIGINAL", "PRIMARY", "LABEL", "NONE"] if index < 0 else
                        ["ORIGINAL", "PRIMARY", "VOLUME", "NONE" if index == 0 else "RESAMPLED"])
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Synthetic^Slide", "MILKIT-TEST", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20261201", "120000", "1", "ACC1"
        ds.ReferringPhysicianName = ""
        ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20261201", "120000", "20261201120000"
        ds.SeriesNumber, ds.InstanceNumber = 1, index + 1 if index >= 0 else len(levels) + 1
        ds.Manufacturer, ds.ManufacturerModelName = "milkit tests", "synthetic"
        ds.DeviceSerialNumber, ds.SoftwareVersions = "0", "1"
        ds.PositionReferenceIndicator = "SLIDE_CORNER"
        ds.ContainerIdentifier = "SLIDE-1"
        ds.IssuerOfTheContainerIdentifierSequence = []
        ds.ContainerTypeCodeSequence = [_code("433466003", "SCT", "Microscope slide")]
        specimen = Dataset()
        specimen.SpecimenIdentifier = "SPECIMEN-1"
        specimen.SpecimenUID = generate_uid(prefix, entropy + ["specimen"])
        specimen.IssuerOfTheSpecimenIdentifierSequence = []
        specimen.SpecimenPreparationSequence = []
        ds.SpecimenDescriptionSequence = [specimen]
        ds.VolumetricProperties = "VOLUME"
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.Rows = ds.Columns = tile
        frames = _frames(level, tile, quality)
        ds.NumberOfFrames = len(frames)
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
        ds.TotalPixelMatrixFocalPlanes = 1
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = ORIGIN_MM
        ds.TotalPixelMatrixOriginSequence = [origin]
        ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight, ds.ImagedVolumeDepth = w * spacing_mm, h * spacing_mm, 0.001
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.FocusMethod, ds.ExtendedDepthOfField = "AUTO", "NO"
        ds.BurnedInAnnotation, ds.SpecimenLabelInImage = "NO", "NO"
        ds.LossyImageCompression, ds.LossyImageCompressionRatio, ds.LossyImageCompressionMethod = "01", 10, "ISO_10918_1"
        measures = Dataset()
        measures.PixelSpacing = [spacing_mm, spacing_mm]
        measures.SliceThickness = 0.001
        frame_type = Dataset()
        frame_type.FrameType = list(ds.ImageType)
        path_id = Dataset()
        path_id.OpticalPathIdentifier = "1"
        shared = Dataset()
        shared.PixelMeasuresSequence = [measures]
        shared.WholeSlideMicroscopyImageFrameTypeSequence = [frame_type]
        shared.OpticalPathIdentificationSequence = [path_id]
        ds.SharedFunctionalGroupsSequence = [shared]
        optical = Dataset()
        optical.OpticalPathIdentifier = "1"
        optical.IlluminationTypeCodeSequence = [_code("111744", "DCM", "Brightfield illumination")]
        optical.IlluminationColorCodeSequence = [_code("414298005", "SCT", "Full Spectrum")]
        ds.OpticalPathSequence = [optical]
        ds.NumberOfOpticalPaths = 1
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        path = folder / (f"level{index}.dcm" if index >= 0 else "label.dcm")
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        uids.append(uid)
        if index >= 0:
            sizes.append((w, h))
    return DicomWsi(folder, files, study, series, frame_of_reference, uids, mpp, (width0, height0),
                    level_sizes=sizes, has_label=label)


def tiff_levels(path: Path) -> list[np.ndarray]:
    """The decoded levels of a synthetic slide's TIFF (level 0 first)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return [page.asarray() for page in tif.pages]
