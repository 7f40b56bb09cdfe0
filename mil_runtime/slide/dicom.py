"""DICOM whole-slide images as inputs: which file OpenSlide opens, and the identity outputs refer to.

A DICOM slide is a series of VL Whole Slide Microscopy Image instances (one per pyramid level, plus
label / overview / thumbnail images), usually one file each, in one folder. `mil-infer` takes either
the folder or any one of the series' .dcm files:

- `is_dicom_input(path)`: a folder holding DICOM files, or a file with the DICM preamble (or named
  .dcm). Cheap: reads at most 132 bytes of a few files and never imports pydicom.
- `resolve_dicom_input(path)`: the file OpenSlide opens, the series' largest VOLUME instance (level 0).
  OpenSlide 4 finds the series' other instances in the same folder itself.
- `read_dicom_source(path)`: a `DicomSource`, the identity of the slide the DICOM outputs
  (mil_runtime.outputs.dicom) reference: study / series / instance UIDs, frame of reference, the
  total pixel matrix's size, spacing, orientation and origin, container and specimen.

Everything that cannot be a slide stops with SlideReadError (exit 8), one line naming the file and
what to do: a folder without DICOM files, a DICOM object of another kind (a CT image, a parametric map),
a file pydicom cannot parse (truncated, not DICOM), a WSI instance whose frames are cut short, a
folder holding several slides' series.

pydicom comes with the `dicom` extra (pip install "milkit[dicom]"); it is imported only when an input
is DICOM.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mil_runtime.errors import InputNotFoundError, MilkitError, SlideReadError

WSI_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
PREAMBLE_BYTES = 128
MAGIC = b"DICM"
SNIFF_FILES = 64  # a folder is DICOM when one of its first 64 files (sorted) is
EXTRA_HINT = 'pip install "milkit[dicom]"'
_SERIES_TAGS = ["SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "ImageType",
                "TotalPixelMatrixColumns", "TotalPixelMatrixRows"]


def _has_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(PREAMBLE_BYTES + len(MAGIC))
    except OSError:
        return False
    return head[PREAMBLE_BYTES:] == MAGIC


def _looks_dicom(path: Path) -> bool:
    return path.suffix.lower() == ".dcm" or _has_preamble(path)


def _folder_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as exc:
        raise SlideReadError(f"{folder}: cannot list the folder ({exc.strerror or exc}); check its permissions") from None


def is_dicom_input(path: str | os.PathLike) -> bool:
    """True for a folder holding DICOM files, or a file with the DICM preamble (or a .dcm name)."""
    path = Path(path)
    if path.is_dir():
        try:
            files = _folder_files(path)
        except SlideReadError:
            return False
        return any(_looks_dicom(p) for p in files[:SNIFF_FILES])
    return path.is_file() and _looks_dicom(path)


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise MilkitError(f"DICOM slides need pydicom: {EXTRA_HINT}") from None
    return pydicom


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_header(path: Path, tags: list[str] | None = None):
    """The data set without pixel data; SlideReadError when pydicom cannot parse it."""
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
    except Exception as exc:  # InvalidDicomError, EOFError, struct/ValueError on a damaged file
        raise SlideReadError(
            f"{path} is not a readable DICOM file ({_first_line(exc)}); it is damaged, truncated or not DICOM: "
            "copy it again from the archive (or export the slide again)"
        ) from None


def _sop_class_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name if uid else ""
    return name if name and name != uid else f"SOP class {uid or '(none)'}"


def _image_flavor(ds) -> str:
    image_type = list(ds.get("ImageType", []) or [])
    return str(image_type[2]).upper() if len(image_type) > 2 else ""


def _pixels(ds) -> int:
    return int(ds.get("TotalPixelMatrixColumns", 0) or 0) * int(ds.get("TotalPixelMatrixRows", 0) or 0)


def _frames_problem(path: Path) -> str | None:
    """Why the pixel data of a WSI instance is cut short (a truncated copy), or None when it is whole.

    Seeks only: the header is parsed up to the pixel data, then the encapsulated items (one a frame,
    after the offset table) are counted by their lengths, or a native pixel data's length is checked
    against the file's size. Never reads the frames themselves.
    """
    import struct

    pydicom = _pydicom()
    size = path.stat().st_size
    with open(path, "rb") as handle:
        ds = pydicom.dcmread(handle, stop_before_pixels=True)
        start = handle.tell()
        little = ds.file_meta.TransferSyntaxUID.is_little_endian if "TransferSyntaxUID" in ds.file_meta else True
        explicit = ds.file_meta.TransferSyntaxUID.is_implicit_VR is False if "TransferSyntaxUID" in ds.file_meta else True
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        order = "<" if little else ">"
        head = handle.read(12 if explicit else 8)
        if len(head) < 8:
            return "the file ends before its pixel data"
        group, element = struct.unpack(order + "HH", head[:4])
        if (group, element) != (0x7FE0, 0x0010):
            return "no pixel data"
        length = struct.unpack(order + "I", head[8:12] if explicit else head[4:8])[0]
        if length != 0xFFFFFFFF:  # native pixel data of a known length
            expected = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * frames * (int(ds.BitsAllocated) // 8)
            available = size - handle.tell()
            if available < min(length, expected):
                return f"pixel data holds {available} of {expected} bytes"
            return None
        items = 0
        while True:
            item = handle.read(8)
            if len(item) < 8:
                return f"{max(items - 1, 0)} of {frames} frames present"
            tag_group, tag_element, item_length = struct.unpack(order + "HHI", item)
            if (tag_group, tag_element) == (0xFFFE, 0xE0DD):
                break
            if (tag_group, tag_element) != (0xFFFE, 0xE000):
                return "a damaged pixel data item"
            if handle.tell() + item_length > size:
                return f"frame {max(items, 1)} of {frames} is cut short"
            handle.seek(item_length, os.SEEK_CUR)
            items += 1
        if items - 1 < frames:
            return f"{max(items - 1, 0)} of {frames} frames present"
    return None


def _check_frames_complete(path: Path) -> None:
    """SlideReadError when a WSI instance's pixel data ends early or cannot be parsed."""
    try:
        problem = _frames_problem(path)
    except SlideReadError:
        raise
    except Exception as exc:  # a header that parsed once but not now, an odd transfer syntax
        problem = _first_line(exc)
    if problem:
        raise SlideReadError(
            f"{path} is a truncated or damaged DICOM slide instance ({problem}); copy it again from "
            "the archive (or export the slide again)"
        )


@dataclass(frozen=True)
class _Instance:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    flavor: str
    pixels: int


def _instance(path: Path, ds) -> _Instance:
    item = _Instance(path, str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", "")),
                     str(ds.get("SeriesInstanceUID", "")), _image_flavor(ds), _pixels(ds))
    if item.sop_class_uid == WSI_SOP_CLASS_UID and not (item.series_instance_uid and item.sop_instance_uid
                                                        and item.pixels > 0 and item.flavor):
        raise SlideReadError(
            f"{path} is a slide instance with an incomplete header (no series / instance UID, image type or "
            "total pixel matrix size); it is truncated or damaged: copy it again from the archive"
        )
    return item


def _series_instances(folder: Path, series_uid: str | None) -> tuple[list[_Instance], list[str]]:
    """WSI instances of the folder (of one series when `series_uid` is given) and what else it holds.

    A file that looks like DICOM (preamble or .dcm name) but does not parse stops the run: it may be
    one of the slide's own levels, cut short, and skipping it would read the slide at a lower level.
    """
    found, other = [], []
    for candidate in _folder_files(folder):
        if not _looks_dicom(candidate):
            continue
        item = _instance(candidate, _read_header(candidate, _SERIES_TAGS))
        if item.sop_class_uid != WSI_SOP_CLASS_UID:
            other.append(f"{candidate.name} ({_sop_class_name(item.sop_class_uid)})")
        elif series_uid is None or item.series_instance_uid == series_uid:
            found.append(item)
    return found, other


def _level0(instances: list[_Instance]) -> _Instance | None:
    volumes = [i for i in instances if i.flavor == "VOLUME" and i.pixels > 0]
    return max(volumes, key=lambda i: (i.pixels, str(i.path))) if volumes else None


def _resolve_folder(folder: Path) -> tuple[_Instance, list[_Instance]]:
    files = _folder_files(folder)
    if not any(_looks_dicom(p) for p in files):
        raise SlideReadError(
            f"{folder} holds no DICOM files ({len(files)} files, none with the DICM preamble); give a DICOM "
            "slide's series folder, one of its .dcm files, or a slide file (.svs, .tif, ...)"
        )
    instances, other = _series_instances(folder, None)
    if not instances:
        listed = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        raise SlideReadError(
            f"{folder} holds no VL Whole Slide Microscopy Image (found {listed}); give the folder of a DICOM "
            "slide's series"
        )
    series = sorted({i.series_instance_uid for i in instances})
    if len(series) > 1:
        raise SlideReadError(
            f"{folder} holds {len(series)} slide series ({', '.join(series[:3])}); give one .dcm file of "
            "the slide you mean, or put each series in its own folder"
        )
    level0 = _level0(instances)
    if level0 is None:
        raise SlideReadError(
            f"{folder} holds slide images but no VOLUME instance (only label / overview / thumbnail); "
            "export the slide's pyramid levels too"
        )
    return level0, instances


def _resolve_file(path: Path) -> tuple[_Instance, list[_Instance]]:
    ds = _read_header(path, _SERIES_TAGS)
    item = _instance(path, ds)
    if item.sop_class_uid != WSI_SOP_CLASS_UID:
        raise SlideReadError(
            f"{path} is a DICOM {_sop_class_name(item.sop_class_uid)} object, not a VL Whole Slide "
            "Microscopy Image; give a slide's series folder or one of its image .dcm files"
        )
    siblings, _ = _series_instances(path.parent, item.series_instance_uid)
    level0 = _level0(siblings)
    if level0 is None:
        raise SlideReadError(
            f"{path} is a slide's {item.flavor.lower() or 'non-volume'} image and its folder holds no pyramid "
            "level of the same series; give the folder of the slide's series"
        )
    return level0, siblings


@functools.lru_cache(maxsize=64)
def _resolve_cached(path: str, stamp: tuple) -> tuple[_Instance, tuple[_Instance, ...]]:
    p = Path(path)
    level0, series = _resolve_folder(p) if p.is_dir() else _resolve_file(p)
    for item in series:  # OpenSlide opens them all: a cut-short level must stop the run here, not mid-way
        _check_frames_complete(item.path)
    return level0, tuple(series)


def _stamp(path: Path) -> tuple:
    """What invalidates a cached resolution: name, size and mtime of every (non-hidden) file in the folder."""
    folder = path if path.is_dir() else path.parent
    stamps = []
    for file in _folder_files(folder):
        try:
            info = file.stat()
        except OSError:  # removed meanwhile
            continue
        stamps.append((file.name, info.st_size, info.st_mtime_ns))
    return tuple(stamps)


def resolve_dicom_input(path: str | os.PathLike) -> Path:
    """The WSI file OpenSlide opens for a DICOM series folder or any .dcm of the series (level 0)."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"slide not found: {path}")
    return _resolve_cached(str(path.resolve()), _stamp(path))[0].path


@dataclass
class DicomSource:
    """The source slide's identity and geometry, as the DICOM outputs need them for their references.

    `pixel_spacing` is (row spacing, column spacing) in mm of the total pixel matrix (level 0);
    `image_orientation` the six direction cosines of Image Orientation (Slide); `origin` the (x, y)
    in mm of the Total Pixel Matrix Origin in the slide coordinate system. `dataset` is level 0's
    data set without pixel data, `other_datasets` the pyramid's other levels' (VOLUME instances),
    as pydicom read them; `instances` lists every instance of the series in the folder (levels
    first, largest first, then label / overview / thumbnail images).
    """

    path: Path  # what the user gave (folder or file)
    file: Path  # level 0's instance
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    frame_of_reference_uid: str
    total_pixel_matrix_columns: int
    total_pixel_matrix_rows: int
    pixel_spacing: tuple[float, float]
    image_orientation: tuple[float, ...]
    origin: tuple[float, float]
    container_identifier: str | None
    specimen_identifiers: tuple[str, ...]
    instances: tuple[tuple[str, str], ...]  # (SOP class UID, SOP instance UID) of every series instance
    dataset: Any = field(repr=False, default=None)
    other_datasets: tuple[Any, ...] = field(repr=False, default=())


def _require(ds, keyword: str, path: Path):
    value = ds.get(keyword)
    if value is None or value == "":
        raise SlideReadError(f"{path} has no {keyword}; the slide's DICOM header is incomplete: export it again")
    return value


def read_dicom_source(path: str | os.PathLike) -> DicomSource:
    """The `DicomSource` of a DICOM slide (series folder or any of its .dcm files)."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"slide not found: {path}")
    level0_item, series_items = _resolve_cached(str(path.resolve()), _stamp(path))
    level0 = level0_item.path
    ds = _read_header(level0)
    try:
        measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        spacing = tuple(float(v) for v in measures.PixelSpacing)
    except (AttributeError, IndexError, TypeError, ValueError):
        raise SlideReadError(f"{level0} records no pixel spacing (Shared Functional Groups > Pixel Measures); "
                             "export the slide again with its resolution") from None
    try:
        origin_item = ds.TotalPixelMatrixOriginSequence[0]
        origin = (float(origin_item.XOffsetInSlideCoordinateSystem), float(origin_item.YOffsetInSlideCoordinateSystem))
    except (AttributeError, IndexError, TypeError, ValueError):
        origin = (0.0, 0.0)
    orientation = tuple(float(v) for v in (ds.get("ImageOrientationSlide") or (0, -1, 0, -1, 0, 0)))
    series = str(_require(ds, "SeriesInstanceUID", level0))
    rest = [item for item in sorted(series_items, key=lambda i: (-i.pixels, str(i.path))) if item.path != level0]
    levels = [_read_header(item.path) for item in rest if item.flavor == "VOLUME"]  # the pyramid's other levels
    extras = [(item.sop_class_uid, item.sop_instance_uid) for item in rest if item.flavor != "VOLUME"]
    specimens = tuple(str(s.get("SpecimenIdentifier", "")) for s in ds.get("SpecimenDescriptionSequence", []) or [])
    return DicomSource(
        path=path, file=level0,
        study_instance_uid=str(_require(ds, "StudyInstanceUID", level0)),
        series_instance_uid=series,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(_require(ds, "SOPInstanceUID", level0)),
        frame_of_reference_uid=str(_require(ds, "FrameOfReferenceUID", level0)),
        total_pixel_matrix_columns=int(_require(ds, "TotalPixelMatrixColumns", level0)),
        total_pixel_matrix_rows=int(_require(ds, "TotalPixelMatrixRows", level0)),
        pixel_spacing=(spacing[0], spacing[1]),
        image_orientation=orientation,
        origin=origin,
        container_identifier=str(ds.ContainerIdentifier) if ds.get("ContainerIdentifier") else None,
        specimen_identifiers=specimens,
        instances=tuple((str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in [ds, *levels]) + tuple(extras),
        dataset=ds, other_datasets=tuple(levels),
    )


__all__ = ["DicomSource", "WSI_SOP_CLASS_UID", "is_dicom_input", "read_dicom_source", "resolve_dicom_input"]
