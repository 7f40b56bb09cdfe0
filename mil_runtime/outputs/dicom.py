"""DICOM outputs of a DICOM slide: the tiles as bulk annotations and the attention as a parametric map.

`write_dicom_outputs(source, tiles, result, annotations_path, parametric_map_path)` writes two objects
in the source slide's study, each in a new series, both built with highdicom (pip install
"milkit[dicom]"):

- `<stem>.annotations.dcm`, Microscopy Bulk Simple Annotations: one annotation group, "milkit tiles",
  one POLYGON per tile, its four corners (top-left, top-right, bottom-right, bottom-left; not closed,
  as the standard wants) in 2D image coordinates of the source's total pixel matrix (level 0; DICOM's
  (0, 0) is the top-left corner of the top-left pixel, so the corners are exactly the tile's level-0
  pixel edges x, x + size, y, y + size). POLYGON, not RECTANGLE: wsidicom 0.36 reads only POINT,
  POLYLINE and POLYGON groups (opening a series folder that holds a RECTANGLE group raises
  NotImplementedError there). Measurements `attention`, `attention_<class>` (models with one map per
  class) and `tissue_fraction`, one value a tile in the tiles' order (float32, as the JSON).
- `<stem>.attention.dcm`, Parametric Map of attention on the tile grid: one pixel a grid cell (stride x
  stride level-0 px; without overlap a cell is exactly a tile), pixel spacing = the source's level-0
  spacing x stride, placed in the source's frame of reference (slide coordinates) so that the cell of
  the tile at level-0 (x, y) covers that tile's top-left stride x stride square. One channel,
  `attention` (the model's map, the predicted class's for per-class models: their `attention_<class>`
  maps are in the annotations' measurements), float32, identity real world value mapping; cells
  without a tile are 0. The total pixel matrix is tiled in frames of at most 256 x 256.

Both reference the source: its study, patient, slide (container, specimen) and its level-0 instance
(the geometry they are drawn on); the parametric map also lists the series' other instances as
further sources and, being in slide coordinates, shares the source's frame of reference (the 2D
annotations lie in the referenced image's pixel matrix and carry none: the IOD wants one for 3D only).
Both carry the model's identity (result["model"]): a Contributing Equipment item (processing
equipment: model name, software versions = the model file's sha256 and the milkit version that exported
it, a description with all of it and the run key when the result has one), and the runtime's milkit
version as Software Versions. The annotation group's Algorithm Identification says the same:
algorithm name = model name, version = the model file's sha256, parameters = model / runtime milkit
versions, model file name (and run key).

Everything is built in memory first, then the two files are written; any failure raises (OutputError)
and the caller (the writer's staging) leaves nothing behind.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from mil_runtime._version import __version__
from mil_runtime.errors import MilkitError, OutputError

EXTRA_HINT = 'pip install "milkit[dicom]"'
PRIVATE_SCHEME = "99MILKIT"  # local coding scheme ("99" prefix: DICOM PS3.16 private schemes)
GROUP_LABEL = "milkit tiles"
MAP_TILE = 256  # frame size of the parametric map's total pixel matrix
LO = 64  # DICOM LO / code meaning length limit


def _highdicom():
    try:
        import highdicom
        import pydicom  # noqa: F401
    except ImportError:
        raise MilkitError(f"DICOM outputs need highdicom and pydicom: {EXTRA_HINT}") from None
    return highdicom


def _lo(text: str) -> str:
    return str(text)[:LO]


def grid_geometry(tiles: Any, stride: int | None = None) -> tuple[int, tuple[int, int]]:
    """(stride, (offset x, offset y)) in level-0 px such that xy = offset + (col, row) * stride, for all tiles.

    `stride`: the run's (result["tiling"]["stride_level0"]) when known; otherwise it comes from the
    tiles themselves (corner = grid cell x stride), and a single tile, or tiles all in one cell row and
    column, use the tile size. Tiles off that grid are refused (OutputError).
    """
    xy = np.asarray(tiles.xy_level0, dtype=np.int64).reshape(-1, 2)  # (N, 2) x, y
    colrow = np.asarray(tiles.grid_yx, dtype=np.int64).reshape(-1, 2)[:, ::-1]  # (N, 2) col, row
    if stride is None:
        for axis in (0, 1):
            steps = colrow[:, axis] - colrow[0, axis]
            moved = np.nonzero(steps)[0]
            if len(moved):
                i = moved[0]
                stride = int(round(float(xy[i, axis] - xy[0, axis]) / float(steps[i])))
                break
    stride = int(stride) if stride and int(stride) > 0 else int(tiles.size_level0)
    offset = xy[0] - colrow[0] * stride  # (2,)
    if not np.array_equal(offset[None, :] + colrow * stride, xy):
        raise OutputError("the tiles do not lie on one grid (corner = offset + cell x stride); "
                          "cannot build the attention parametric map")
    return stride, (int(offset[0]), int(offset[1]))


def _codes():
    from pydicom.sr.coding import Code

    return {
        "category": Code("85756007", "SCT", "Tissue"),
        "type": Code("TILE", PRIVATE_SCHEME, "MIL tile"),
        "unit": Code("1", "UCUM", "no units"),
        "family": Code("123109", "DCM", "Artificial Intelligence"),
        "attention": Code("ATTENTION", PRIVATE_SCHEME, "attention"),
        "tissue_fraction": Code("TISSUEFRACTION", PRIVATE_SCHEME, "tissue_fraction"),
    }


def measurement_codes(class_names: list[str]):
    """{measurement name: its code}: attention, attention_<class> (in class order), tissue_fraction."""
    from pydicom.sr.coding import Code

    codes = _codes()
    named = {"attention": codes["attention"]}
    for index, name in enumerate(class_names):
        named[f"attention_{name}"] = Code(f"ATTENTION{index}", PRIVATE_SCHEME, _lo(f"attention_{name}"))
    named["tissue_fraction"] = codes["tissue_fraction"]
    return named


def _algorithm(hd, result: dict):
    model = result.get("model") or {}
    output_set = result.get("output_set") or {}
    parameters = {
        "model_milkit_version": str(model.get("milkit_version") or ""),
        "model_file": Path(str(model.get("file") or "")).name,
        "runtime_milkit_version": __version__,
    }
    if output_set.get("run_key"):
        parameters["run_key"] = str(output_set["run_key"])
    return hd.AlgorithmIdentificationSequence(
        name=_lo(model.get("name") or "milkit model"), family=_codes()["family"],
        version=_lo(model.get("sha256") or "unknown"), source="milkit", parameters=parameters,
    )


def model_description(result: dict) -> str:
    """One line naming the model: name, file, sha256, the milkit version that exported it, the run key."""
    model = result.get("model") or {}
    run_key = (result.get("output_set") or {}).get("run_key")
    return (f"MIL model {model.get('name') or 'unknown'} (file {Path(str(model.get('file') or '')).name or 'unknown'}, "
            f"sha256 {model.get('sha256') or 'unknown'}, exported with milkit {model.get('milkit_version') or 'unknown'})"
            + (f"; run key {run_key}" if run_key else ""))


def _common(source: Any, result: dict) -> dict:
    """Equipment of both objects: mil-infer made them, with the model as the processing equipment."""
    from pydicom.sr.codedict import codes

    hd = _highdicom()
    model = result.get("model") or {}
    equipment = hd.ContributingEquipment(
        manufacturer="milkit", purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=_lo(model.get("name") or "milkit model"),
        software_versions=[_lo(model.get("sha256") or "unknown"), _lo(f"milkit {model.get('milkit_version') or 'unknown'}")],
        contribution_description=model_description(result)[:1024],
    )
    return {
        "manufacturer": "milkit",
        "manufacturer_model_name": "mil-infer",
        "software_versions": __version__,
        "device_serial_number": _lo((model.get("sha256") or "unknown")[:16]),
        "contributing_equipment": [equipment],
    }


def _tile_values(tiles: Any) -> dict[str, np.ndarray]:
    """Per-tile values in measurement order: attention, attention_<class>..., tissue_fraction: (N,) float32."""
    values = {"attention": np.asarray(tiles.attention, dtype=np.float32)}
    for name, weights in (tiles.attention_by_class or {}).items():
        values[f"attention_{name}"] = np.asarray(weights, dtype=np.float32)
    values["tissue_fraction"] = np.asarray(tiles.tissue_fraction, dtype=np.float32)
    for name, column in values.items():
        if column.shape != (len(tiles.xy_level0),):
            raise OutputError(f"{name} has {column.shape} values for {len(tiles.xy_level0)} tiles")
        if not np.isfinite(column).all():
            raise OutputError(f"{name} holds NaN or Inf values; cannot write the DICOM annotations")
    return values


def build_annotations(source: Any, tiles: Any, result: dict):
    """The Microscopy Bulk Simple Annotations object (highdicom), not yet written."""
    hd = _highdicom()
    from pydicom.uid import generate_uid

    xy = np.asarray(tiles.xy_level0, dtype=np.float64).reshape(-1, 2)  # (N, 2) level-0 x, y
    size = float(tiles.size_level0)
    corners = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64) * size  # (4, 2) col, row
    rectangles = (xy[:, None, :] + corners[None, :, :]).astype(np.float32)  # (N, 4, 2) the polygons
    if rectangles.size and float(np.abs(rectangles).max()) >= 2**24:
        rectangles = rectangles.astype(np.float64)  # float32 is exact only below 2^24 px
    values = _tile_values(tiles)
    names = measurement_codes(list(tiles.attention_by_class or {}))
    codes = _codes()
    model_name = (result.get("model") or {}).get("name") or "milkit model"
    group = hd.ann.AnnotationGroup(
        number=1, uid=generate_uid(), label=GROUP_LABEL,
        annotated_property_category=codes["category"], annotated_property_type=codes["type"],
        graphic_type=hd.ann.GraphicTypeValues.POLYGON, graphic_data=list(rectangles),
        algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(hd, result),
        measurements=[hd.ann.Measurements(name=names[key], values=values[key], unit=codes["unit"]) for key in values],
        description=_lo(f"tiles of {model_name}, level-0 px of the source's total pixel matrix"),
    )
    return hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[source.dataset], annotation_coordinate_type="2D", annotation_groups=[group],
        series_instance_uid=generate_uid(), series_number=9101, sop_instance_uid=generate_uid(),
        instance_number=1, content_label="MILKIT_TILES",
        content_description=_lo(f"milkit MIL tiles and attention: {model_name}"),
        **_common(source, result),
    )


def attention_grid(tiles: Any, source: Any, stride: int | None = None) -> tuple[np.ndarray, int, tuple[int, int]]:
    """(map (rows, cols) float32, stride, offset): each tile's attention in its grid cell, 0 elsewhere.

    The map covers the source's whole total pixel matrix (the last row / column of cells may reach
    past its edge). Tiles that share a cell, or non-finite attention, are refused (OutputError).
    """
    stride, offset = grid_geometry(tiles, stride)
    colrow = (np.asarray(tiles.xy_level0, dtype=np.int64).reshape(-1, 2) - np.asarray(offset)) // stride
    if (colrow < 0).any():
        raise OutputError("tiles with negative grid cells; cannot build the attention parametric map")
    if len(np.unique(colrow, axis=0)) != len(colrow):
        raise OutputError("two tiles share one grid cell; cannot build the attention parametric map")
    attention = np.asarray(tiles.attention, dtype=np.float32)  # (N,)
    if not np.isfinite(attention).all():
        raise OutputError("attention holds NaN or Inf values; cannot write the attention parametric map")
    width, height = int(source.total_pixel_matrix_columns), int(source.total_pixel_matrix_rows)
    cols = max(int(colrow[:, 0].max()) + 1, math.ceil((width - offset[0]) / stride))
    rows = max(int(colrow[:, 1].max()) + 1, math.ceil((height - offset[1]) / stride))
    grid = np.zeros((rows, cols), dtype=np.float32)  # (rows, cols)
    grid[colrow[:, 1], colrow[:, 0]] = attention
    return grid, stride, offset


def build_parametric_map(source: Any, tiles: Any, result: dict):
    """The attention Parametric Map (highdicom), not yet written."""
    hd = _highdicom()
    from pydicom.uid import generate_uid

    recorded = (result.get("tiling") or {}).get("stride_level0")
    grid, stride, offset = attention_grid(tiles, source, int(recorded) if recorded else None)
    ds = source.dataset
    row_spacing, col_spacing = source.pixel_spacing
    # centre of the map's pixel (0, 0) in the source's image coordinates ((0, 0) = top-left corner of
    # the top-left level-0 pixel): the plane position is the centre of the first pixel, as DICOM's
    centre = np.array([[offset[0] + stride / 2.0, offset[1] + stride / 2.0]])  # (1, 2) col, row
    to_slide = hd.spatial.ImageToReferenceTransformer.for_image(ds, for_total_pixel_matrix=True)
    position = [float(v) for v in to_slide(centre)[0]]
    thickness = None
    try:
        thickness = float(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness)
    except (AttributeError, IndexError, TypeError, ValueError):
        pass
    measures = hd.PixelMeasuresSequence(pixel_spacing=(row_spacing * stride, col_spacing * stride),
                                        slice_thickness=thickness if thickness else 1.0)
    orientation = hd.PlaneOrientationSequence(coordinate_system="SLIDE", image_orientation=source.image_orientation)
    plane = hd.PlanePositionSequence(coordinate_system="SLIDE", image_position=position, pixel_matrix_position=(1, 1))
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="attention", lut_explanation="MIL attention weight of the tile in this cell (0: no tile)",
        unit=_codes()["unit"], value_range=(float(grid.min()), float(grid.max())), slope=1.0, intercept=0.0,
    )
    high = float(grid.max())
    window = hd.VOILUTTransformation(window_center=high / 2.0, window_width=max(high, 1e-12))  # 0 .. the maximum
    model_name = (result.get("model") or {}).get("name") or "milkit model"
    tile_size = (min(MAP_TILE, grid.shape[0]), min(MAP_TILE, grid.shape[1]))
    return hd.pm.ParametricMap(
        source_images=[ds], further_source_images=list(source.other_datasets) or None,
        pixel_array=grid, series_instance_uid=generate_uid(), series_number=9102,
        sop_instance_uid=generate_uid(), instance_number=1,
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        content_label="MILKIT_ATTENTION", content_description=_lo(f"milkit MIL attention: {model_name}"),
        pixel_measures=measures, plane_orientation=orientation, plane_positions=[plane],
        tile_pixel_array=True, tile_size=tile_size, voi_lut_transformations=[window],
        **_common(source, result),
    )


def write_dicom_outputs(source: Any, tiles: Any, result: dict, annotations_path: Path,
                        parametric_map_path: Path) -> None:
    """Write `<stem>.annotations.dcm` and `<stem>.attention.dcm` (see the module docstring) to the two paths.

    `source`: mil_runtime.slide.dicom.DicomSource of the slide; `tiles`: the writer's TileTable;
    `result`: the JSON result (its "model" names the algorithm). Both objects are built before either
    file is written; a failure raises OutputError (a missing highdicom: MilkitError naming the extra).
    """
    _highdicom()
    if len(tiles.xy_level0) == 0:
        raise OutputError("no tiles: nothing to write in the DICOM outputs")
    try:
        annotations = build_annotations(source, tiles, result)
        parametric_map = build_parametric_map(source, tiles, result)
    except MilkitError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        text = " ".join(str(exc).split())[:300]
        raise OutputError(f"cannot build the DICOM outputs of {source.path}: {text}") from None
    annotations.save_as(annotations_path, enforce_file_format=True)
    parametric_map.save_as(parametric_map_path, enforce_file_format=True)


__all__ = ["attention_grid", "build_annotations", "build_parametric_map", "grid_geometry", "measurement_codes",
           "write_dicom_outputs"]
