"""DICOM outputs (mil_runtime.outputs.dicom) read back with highdicom and checked against the truth.

Truth: the tiles and values the test gives (or the JSON record mil-infer wrote), the UIDs the test
series was written with (dicom_helpers), the model file's own sha256, and highdicom's geometry
(ImageToImageTransformer from the source's total pixel matrix to the map's) for where each tile's
value lies in the parametric map.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mil_runtime.errors import OutputError
from mil_runtime.outputs.record import read_output_set
from mil_runtime.outputs.writer import TileTable
from mil_runtime.slide.dicom import read_dicom_source

from dicom_helpers import SLIDE_MPP, SLIDE_PX, WSI_SOP_CLASS

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "models" / "demo" / "abmil_demo.onnx"
ANN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.91.1"  # Microscopy Bulk Simple Annotations Storage
PM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
MODEL = {"name": "ToyMIL", "file": "/models/toy.onnx", "sha256": "ab" * 32, "milkit_version": "0.1.0"}


def mil_infer(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mil_runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def _tiles(size=224, stride=224, keep=0.5, seed=0, classes=("tumor", "normal/stroma")) -> TileTable:
    """Tiles on a stride grid over the 2048 px test slide, a random half of the cells, random values."""
    rng = np.random.default_rng(seed)
    n = (SLIDE_PX - size) // stride + 1
    cells = np.array([(r, c) for r in range(n) for c in range(n) if rng.random() < keep], dtype=np.int64)
    weights = rng.random(len(cells)).astype(np.float32) + np.float32(1e-3)
    by_class = {name: rng.random(len(cells)).astype(np.float32) for name in classes} or None
    return TileTable(xy_level0=cells[:, ::-1] * stride, size_level0=size, grid_yx=cells,
                     tissue_fraction=rng.uniform(0.5, 1, len(cells)).round(4), attention=weights / weights.sum(),
                     attention_by_class=by_class)


def _read(annotations_path: Path, map_path: Path):
    import highdicom as hd
    from highdicom.pm.sop import pmread

    return hd.ann.annread(annotations_path), pmread(map_path)


def _group(annotations):
    groups = annotations.get_annotation_groups()
    assert len(groups) == 1
    return groups[0]


def _measurements(group) -> dict[str, np.ndarray]:
    names, values, units = group.get_measurements()
    assert all(u.value == "1" and u.scheme_designator == "UCUM" for u in units)
    return {name.meaning: values[:, k] for k, name in enumerate(names)}


def _map_values_at_tiles(map_ds, source_ds, xy: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(value under each tile's top-left cell centre, the whole map) via highdicom's source -> map geometry."""
    import highdicom as hd

    grid = map_ds.get_total_pixel_matrix()  # (rows, cols)
    to_map = hd.spatial.ImageToImageTransformer.for_images(
        source_ds, map_ds, for_total_pixel_matrix_from=True, for_total_pixel_matrix_to=True)
    stride = float(map_ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0]) \
        / float(source_ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0])
    centres = np.asarray(xy, dtype=np.float64) + min(stride, size) / 2.0  # image coords, (0, 0) = corner
    at = to_map(centres)  # (N, 2) map image coords (col, row)
    cells = np.floor(at).astype(np.int64)
    assert np.allclose(at - cells, 0.5, atol=1e-6)  # each tile lands on a cell centre, not an edge
    return grid[cells[:, 1], cells[:, 0]], grid


def _check_references(obj, wsi, expect_all_levels: bool) -> None:
    """Study, slide, frame of reference and the referenced series / instances are the source's.

    The annotations (2D: level-0 pixel coordinates of the referenced image) reference that image
    itself; the map, placed in slide coordinates, shares the source's frame of reference.
    """
    assert obj.StudyInstanceUID == wsi.study_uid
    assert obj.ContainerIdentifier == wsi.container_id
    if obj.SOPClassUID == ANN_SOP_CLASS:
        assert obj.AnnotationCoordinateType == "2D"
        assert [i.ReferencedSOPInstanceUID for i in obj.ReferencedImageSequence] == [wsi.sop_instance_uids[0]]
    else:
        assert obj.FrameOfReferenceUID == wsi.frame_of_reference_uid
    assert obj.SeriesInstanceUID not in (wsi.series_uid,)
    assert obj.PatientID == "MILKIT-TEST"
    referenced = {}
    for series in obj.ReferencedSeriesSequence:
        for item in series.ReferencedInstanceSequence:
            referenced[item.ReferencedSOPInstanceUID] = (series.SeriesInstanceUID, item.ReferencedSOPClassUID)
    assert referenced[wsi.sop_instance_uids[0]] == (wsi.series_uid, WSI_SOP_CLASS)  # level 0: the geometry
    if expect_all_levels:
        assert set(referenced) == set(wsi.level_uids)  # the pyramid, not its label
    assert all(series == wsi.series_uid for series, _ in referenced.values())


def _check_model_identity(obj, model: dict) -> None:
    ours = [e for e in obj.ContributingEquipmentSequence if e.Manufacturer == "milkit"]
    assert len(ours) == 1  # highdicom adds the source's own equipment beside it
    equipment = ours[0]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Equipment"
    assert equipment.ManufacturerModelName == model["name"]
    assert list(equipment.SoftwareVersions)[0] == model["sha256"]
    assert model["sha256"] in equipment.ContributionDescription
    assert f"milkit {model['milkit_version']}" in list(equipment.SoftwareVersions)
    assert obj.Manufacturer == "milkit" and obj.ManufacturerModelName == "mil-infer"


def _check_annotations(annotations, xy, size, values: dict[str, np.ndarray], model: dict) -> None:
    assert annotations.SOPClassUID == ANN_SOP_CLASS
    group = _group(annotations)
    assert group.graphic_type.value == "POLYGON"
    rectangles = np.asarray(group.get_graphic_data("2D"))  # (N, 4, 2) (col, row), (0, 0) = corner of pixel (0, 0)
    x, y = np.asarray(xy, dtype=np.float64).T
    expected = np.stack([np.stack([x, y], 1), np.stack([x + size, y], 1), np.stack([x + size, y + size], 1),
                         np.stack([x, y + size], 1)], axis=1)  # (N, 4, 2)
    assert rectangles.shape == expected.shape
    assert np.array_equal(rectangles, expected)
    measured = _measurements(group)
    assert list(measured) == list(values)
    for name, column in values.items():
        assert np.array_equal(measured[name], np.asarray(column, dtype=np.float32)), name
    algorithm = group.algorithm_identification[0]
    assert algorithm.AlgorithmName == model["name"] and algorithm.AlgorithmVersion == model["sha256"]
    assert f"model_milkit_version={model['milkit_version']}" in algorithm.AlgorithmParameters
    _check_model_identity(annotations, model)


# -- the objects from given tiles ------------------------------------------------------------------
@pytest.mark.parametrize("classes", [(), ("tumor", "normal/stroma")])
def test_both_objects_hold_every_tile_and_reference_the_source(dicom_wsi, tmp_path, classes):
    from mil_runtime.outputs.dicom import write_dicom_outputs

    source = read_dicom_source(dicom_wsi.folder)
    tiles = _tiles(classes=classes)
    result = {"model": MODEL, "tiling": {"stride_level0": 224}}
    write_dicom_outputs(source, tiles, result, tmp_path / "s.annotations.dcm", tmp_path / "s.attention.dcm")
    annotations, pm = _read(tmp_path / "s.annotations.dcm", tmp_path / "s.attention.dcm")

    values = {"attention": tiles.attention, **{f"attention_{c}": tiles.attention_by_class[c] for c in classes},
              "tissue_fraction": tiles.tissue_fraction}
    _check_annotations(annotations, tiles.xy_level0, 224, values, MODEL)
    _check_references(annotations, dicom_wsi, expect_all_levels=False)

    assert pm.SOPClassUID == PM_SOP_CLASS
    import pydicom

    level0 = pydicom.dcmread(dicom_wsi.files[0], stop_before_pixels=True)  # the series as written, not our reader's
    at_tiles, grid = _map_values_at_tiles(pm, level0, tiles.xy_level0, 224)
    assert np.array_equal(at_tiles.astype(np.float32), tiles.attention)
    assert np.count_nonzero(grid) == len(tiles.attention)  # every other cell is 0
    assert grid.shape == (-(-SLIDE_PX // 224),) * 2  # the map covers the whole slide
    spacing = [float(v) for v in pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    assert spacing == pytest.approx([224 * SLIDE_MPP / 1000] * 2)
    groups = [pm.SharedFunctionalGroupsSequence[0], *pm.PerFrameFunctionalGroupsSequence]
    labels = {m.LUTLabel for g in groups for m in g.get("RealWorldValueMappingSequence", [])}
    assert labels == {"attention"}  # one channel: the model's attention
    _check_references(pm, dicom_wsi, expect_all_levels=True)
    _check_model_identity(pm, MODEL)


def test_overlapping_tiles_map_on_their_stride_grid(dicom_wsi, tmp_path):
    from mil_runtime.outputs.dicom import write_dicom_outputs

    source = read_dicom_source(dicom_wsi.folder)
    tiles = _tiles(size=256, stride=128, keep=0.3, seed=4, classes=())
    for result in ({"model": MODEL, "tiling": {"stride_level0": 128}}, {"model": MODEL}):  # recorded or derived
        write_dicom_outputs(source, tiles, result, tmp_path / "a.dcm", tmp_path / "m.dcm")
        annotations, pm = _read(tmp_path / "a.dcm", tmp_path / "m.dcm")
        _check_annotations(annotations, tiles.xy_level0, 256,
                           {"attention": tiles.attention, "tissue_fraction": tiles.tissue_fraction}, MODEL)
        at_tiles, grid = _map_values_at_tiles(pm, source.dataset, tiles.xy_level0, 256)
        assert np.array_equal(at_tiles.astype(np.float32), tiles.attention)
        assert grid.shape == (SLIDE_PX // 128,) * 2


@pytest.mark.faults
def test_bad_values_raise_and_write_nothing(dicom_wsi, tmp_path):
    from mil_runtime.outputs.dicom import write_dicom_outputs

    source = read_dicom_source(dicom_wsi.folder)
    tiles = _tiles(classes=())
    nan = TileTable(tiles.xy_level0, 224, tiles.grid_yx, tiles.tissue_fraction,
                    np.where(np.arange(len(tiles.attention)) == 3, np.nan, tiles.attention).astype(np.float32))
    twice = TileTable(np.concatenate([tiles.xy_level0, tiles.xy_level0[:1]]), 224,
                      np.concatenate([tiles.grid_yx, tiles.grid_yx[:1]]),
                      np.concatenate([tiles.tissue_fraction, tiles.tissue_fraction[:1]]),
                      np.concatenate([tiles.attention, tiles.attention[:1]]))
    for bad, words in ((nan, "NaN or Inf"), (twice, "share one grid cell")):
        with pytest.raises(OutputError, match=words):
            write_dicom_outputs(source, bad, {"model": MODEL}, tmp_path / "a.dcm", tmp_path / "m.dcm")
        assert not (tmp_path / "a.dcm").exists() and not (tmp_path / "m.dcm").exists()


# -- mil-infer end to end --------------------------------------------------------------------------
@pytest.mark.parametrize("given", ["folder", "level1.dcm"])
def test_mil_infer_writes_both_dicom_objects_into_the_set(dicom_wsi, tmp_path, given):
    """`mil-infer <series folder>` / `<one .dcm>`: the set holds both objects; every tile's attention
    in them is the JSON record's, every reference is the source series'.

    The folder run writes its outputs into (a copy of) the series folder itself, as a PACS export
    folder would get them, and runs again there: the objects beside the slide do not disturb it, and
    wsidicom opens the folder with them and reads the tiles back.
    """
    if given == "folder":
        path = out = Path(shutil.copytree(dicom_wsi.folder, tmp_path / "series"))
    else:
        path, out = dicom_wsi.folder / given, tmp_path / "out"
    args = [path, "--model", DEMO_MODEL, "--out", out, "--quiet", "--json"]
    run = mil_infer(*args) if given == "folder" else mil_infer(*args, "--outputs", "json,csv,dicom")
    assert run.returncode == 0, run.stderr
    stem = path.stem
    if given == "folder":
        first = json.loads((out / f"{stem}.json").read_text())
        again = mil_infer(*args)
        assert again.returncode == 0, again.stderr
        assert json.loads((out / f"{stem}.json").read_text())["tiles"] == first["tiles"]
    output_set = read_output_set(out, stem)
    assert output_set.complete, output_set.reason
    annotations_path, map_path = out / f"{stem}.annotations.dcm", out / f"{stem}.attention.dcm"
    assert {annotations_path.name, map_path.name} <= set(output_set.files)
    record = json.loads((out / f"{stem}.json").read_text())
    assert record["model"]["sha256"] == hashlib.sha256(DEMO_MODEL.read_bytes()).hexdigest()

    tiles = record["tiles"]
    xy = np.array([[t["x"], t["y"]] for t in tiles], dtype=np.int64)
    attention = np.array([t["attention"] for t in tiles], dtype=np.float32)
    size = int(record["tiling"]["tile_level0"])
    annotations, pm = _read(annotations_path, map_path)
    group = _group(annotations)
    measured = _measurements(group)
    assert set(measured) == {"attention", "tissue_fraction"}  # the demo ABMIL has one map
    rectangles = np.asarray(group.get_graphic_data("2D"))
    assert np.array_equal(rectangles[:, 0, :], xy) and np.array_equal(rectangles[:, 2, :], xy + size)
    assert np.array_equal(measured["attention"], attention)
    algorithm = group.algorithm_identification[0]
    assert algorithm.AlgorithmName == record["model"]["name"] and algorithm.AlgorithmVersion == record["model"]["sha256"]
    _check_model_identity(annotations, record["model"])
    _check_references(annotations, dicom_wsi, expect_all_levels=False)

    import pydicom

    level0 = pydicom.dcmread(dicom_wsi.files[0], stop_before_pixels=True)
    at_tiles, grid = _map_values_at_tiles(pm, level0, xy, size)
    assert np.array_equal(at_tiles.astype(np.float32), attention)
    assert np.count_nonzero(grid) == len(attention)
    _check_model_identity(pm, record["model"])
    _check_references(pm, dicom_wsi, expect_all_levels=True)

    if given == "folder":  # a second, independent DICOM reader: wsidicom, on the folder with our objects in it
        from wsidicom import WsiDicom

        with WsiDicom.open(out) as wsi:
            groups = [group for instance in wsi.annotations for group in instance.groups]
            assert [group.label for group in groups] == ["milkit tiles"]
            polygons = groups[0].annotations
            assert len(polygons) == len(tiles)
            for polygon, (x, y), weight in zip(polygons, xy.tolist(), attention.tolist()):
                corners = [(float(c), float(r)) for c, r in polygon.geometry.to_coords()]
                assert corners == [(x, y), (x + size, y), (x + size, y + size), (x, y + size)]
                values = {m.code.meaning: m.value for m in polygon.measurements}
                assert np.float32(values["attention"]) == np.float32(weight)


@pytest.mark.slow  # a service, a job process and a DICOM series: ~10 s
def test_a_service_job_on_a_dicom_series_serves_both_objects(dicom_wsi, tmp_path):
    """mil-serve on a slides folder holding a DICOM series: the job writes the same two objects as
    mil-infer (hashed members of its set), served at the job's dicom urls; read back with highdicom,
    every tile's attention is the job record's."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mil_runtime.serve import create_app

    root = tmp_path / "slides"
    shutil.copytree(dicom_wsi.folder, root / "case7")
    app = create_app([DEMO_MODEL], root, state_dir=tmp_path / "state")
    with TestClient(app) as client:
        (slide,) = client.get("/v1/slides").json()  # the series folder is one slide
        assert slide["path"] == "case7" and (slide["width"], slide["height"]) == (SLIDE_PX, SLIDE_PX)
        dzi = client.get(slide["dzi"])
        assert dzi.status_code == 200 and 'TileSize="254"' in dzi.text
        job = client.post("/v1/jobs", json={"slide": "case7", "model": "abmil_demo"}).json()
        deadline = time.monotonic() + 120
        while job["state"] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.1)
            job = client.get(f"/v1/jobs/{job['id']}").json()
        assert job["state"] == "done", job
        record = client.get(job["urls"]["result"]).json()
        for kind, suffix in (("dicom_annotations", ".annotations.dcm"), ("dicom_attention", ".attention.dcm")):
            r = client.get(job["urls"][kind])
            assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
            assert record["output_set"]["files"][f"case7{suffix}"] == hashlib.sha256(r.content).hexdigest()
            (tmp_path / f"case7{suffix}").write_bytes(r.content)
    tiles = record["tiles"]
    xy = np.array([[t["x"], t["y"]] for t in tiles], dtype=np.int64)
    attention = np.array([t["attention"] for t in tiles], dtype=np.float32)
    annotations, pm = _read(tmp_path / "case7.annotations.dcm", tmp_path / "case7.attention.dcm")
    measured = _measurements(_group(annotations))
    assert np.array_equal(measured["attention"], attention)
    _check_references(annotations, dicom_wsi, expect_all_levels=False)
    import pydicom

    level0 = pydicom.dcmread(dicom_wsi.files[0], stop_before_pixels=True)
    at_tiles, _ = _map_values_at_tiles(pm, level0, xy, int(record["tiling"]["tile_level0"]))
    assert np.array_equal(at_tiles.astype(np.float32), attention)
