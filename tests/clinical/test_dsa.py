"""`<stem>.dsa.json` (mil_runtime.outputs.dsa) against large_image's own annotation schema and geometry.

The truth is large_image's code, not ours. The test dependency `girder-large-image-annotation` (the
PyPI package of large_image's annotation plugin) imports girder and MongoDB drivers, so it is installed
`--no-deps` and never imported: the tests parse its source with `ast` and execute only
- `extendSchema` and `class AnnotationSchema` of models/annotation.py (the JSON schema large_image's
  Annotation model validates uploads with, as jsonschema.Draft6Validator, as large_image does), and
- `Annotationelement._boundingBox` of models/annotationelement.py (where large_image says a griddata
  element's points lie).
Where the viewer puts value i of a griddata heatmap is stated by large_image's web client
(web_client/annotations/convertFeatures.js, convertGridToHeatmap): x = origin.x + dx * (i % gridWidth),
y = origin.y + dy * floor(i / gridWidth); `_cell_centres` below restates that rule.
"""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import json
import math
from pathlib import Path

import numpy as np
import pytest

from mil_runtime.errors import OutputError
from mil_runtime.outputs.dsa import dsa_annotation, tile_grid
from mil_runtime.outputs.writer import TileTable

SCHEMA_DIST = "girder-large-image-annotation"
INSTALL = f'pip install --no-deps -c constraints.txt {SCHEMA_DIST}'


def _plugin_source(relative: str) -> tuple[str, str]:
    """(text, file name) of a file of the installed girder_large_image_annotation package, not imported."""
    try:
        dist = importlib.metadata.distribution(SCHEMA_DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"the DSA tests need large_image's annotation schema from {SCHEMA_DIST}; run `{INSTALL}`")
    path = Path(dist.locate_file(f"girder_large_image_annotation/{relative}"))
    return path.read_text(encoding="utf-8"), str(path)


def _run_definitions(nodes: list[ast.stmt], filename: str, namespace: dict) -> dict:
    exec(compile(ast.Module(body=nodes, type_ignores=[]), filename, "exec"), namespace)  # noqa: S102
    return namespace


@pytest.fixture(scope="module")
def schema():
    """large_image's AnnotationSchema class, from its source, without importing girder."""
    text, filename = _plugin_source("models/annotation.py")
    wanted = {"extendSchema", "AnnotationSchema"}
    nodes = [n for n in ast.parse(text).body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in wanted]
    assert {n.name for n in nodes} == wanted, f"{filename} no longer defines {wanted}"
    return _run_definitions(nodes, filename, {"copy": copy})["AnnotationSchema"]


@pytest.fixture(scope="module")
def validator(schema):
    try:
        import jsonschema
    except ImportError:
        pytest.fail("the DSA tests validate with jsonschema (in milkit[dev]); "
                    "run `pip install -c constraints.txt jsonschema`")
    jsonschema.Draft6Validator.check_schema(schema.annotationSchema)
    return jsonschema.Draft6Validator(schema.annotationSchema)  # what large_image's Annotation model uses


@pytest.fixture(scope="module")
def bounding_box():
    """large_image's Annotationelement._boundingBox as a plain function of an element."""
    text, filename = _plugin_source("models/annotationelement.py")
    classes = [n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == "Annotationelement"]
    methods = [n for n in classes[0].body if isinstance(n, ast.FunctionDef) and n.name == "_boundingBox"]
    assert methods, f"{filename} no longer defines Annotationelement._boundingBox"
    box = _run_definitions(methods, filename, {"math": math})["_boundingBox"]
    return lambda element: box(None, element)


def _cell_centres(element: dict) -> np.ndarray:
    """(len(values), 2) where large_image's web client draws each value (convertGridToHeatmap)."""
    i = np.arange(len(element["values"]))
    x0, y0 = element["origin"][:2]
    return np.stack([x0 + element["dx"] * (i % element["gridWidth"]),
                     y0 + element["dy"] * (i // element["gridWidth"])], axis=1)


def _tiles(corner=(300, 200), size=100, stride=100, shape=(6, 9), keep=0.55, seed=0, classes=()) -> TileTable:
    """Tiles on a lattice with gaps (the grid's missing cells are background), attention summing to 1."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    chosen = rng.random(rows.size) < keep
    chosen[[0, -1]] = True  # the bounding box is the full lattice
    grid_yx = np.stack([rows.ravel(), cols.ravel()], axis=1)[chosen]
    xy = np.asarray(corner) + grid_yx[:, ::-1] * stride
    n = len(xy)
    by_class = {name: rng.dirichlet(np.ones(n)).astype(np.float32) for name in classes} or None
    attention = rng.dirichlet(np.ones(n)).astype(np.float32)
    return TileTable(xy.astype(np.int64), size, grid_yx, rng.uniform(0.3, 1, n), attention, by_class)


def _result(tiles: TileTable, stride: int | None = 100, **extra) -> dict:
    """A result document of the shape mil_runtime.outputs.result writes, for these tiles."""
    return {
        "milkit_version": "0.1.0",
        "input": {"path": "/slides/case 7.svs", "type": "slide"},
        "model": {"name": "ABMIL", "file": "m.onnx", "sha256": "ab" * 32, "milkit_version": "0.1.0",
                  "n_classes": 2, "class_names": ["clean", "lesion"]},
        "encoder": {"name": "tiny_cnn", "sha256": "cd" * 32},
        "prediction": {"class_name": "lesion", "class_index": 1, "probability": 0.875},
        "probabilities": {"clean": 0.125, "lesion": 0.875},
        "tiling": {"tile_level0": tiles.size_level0, **({"stride_level0": stride} if stride else {})},
        "tiles": [{"x": int(x), "y": int(y), "attention": float(a)}
                  for (x, y), a in zip(tiles.xy_level0, tiles.attention)],
        **extra,
    }


def _check_tile_values(document: dict, tiles_field: list[dict], size: int, key: str = "attention") -> None:
    """Each tile's value, at the cell large_image draws at the tile's centre, is the JSON's number exactly;
    every other cell is 0."""
    (element,) = document["elements"]
    values = np.asarray(element["values"])
    centres = _cell_centres(element)
    index = {(float(x), float(y)): i for i, (x, y) in enumerate(centres.tolist())}
    seen = set()
    for tile in tiles_field:
        cell = index[(tile["x"] + size / 2, tile["y"] + size / 2)]
        expected = tile[key] if key == "attention" else tile["attention_by_class"][key]
        assert values[cell] == expected, (tile, values[cell])
        seen.add(cell)
    assert len(seen) == len(tiles_field)
    others = np.setdiff1d(np.arange(len(values)), list(seen))
    assert (values[others] == 0).all()


def test_large_image_schema_bites(validator):
    """The extracted validator is large_image's: it takes a plain griddata heatmap and refuses broken ones."""
    good = {"name": "x", "elements": [{"type": "griddata", "interpretation": "heatmap", "gridWidth": 2,
                                       "origin": [0, 0, 0], "dx": 1, "dy": 1, "values": [0, 1, 2, 3]}]}
    validator.validate(good)
    element = good["elements"][0]
    broken = [
        {**good, "elements": [{**element, "values": [0, None, 2, 3]}]},  # what NaN would become
        {**good, "elements": [{**element, "interpretation": "blur"}]},
        {**good, "elements": [{k: v for k, v in element.items() if k != "gridWidth"}]},
        {**good, "elements": [{**element, "gridWidth": 0}]},
        {**good, "elements": [{**element, "origin": [0, 0]}]},
        {**good, "elements": [{**element, "colour": "#fff"}]},  # griddata allows no unknown keys
        {**good, "elements": [{**element, "colorRange": ["purple"]}]},
        {**good, "name": ""},
        {**good, "provenance": {}},  # nor does the document
    ]
    for document in broken:
        assert not validator.is_valid(document), document


@pytest.mark.parametrize("classes, attention_class", [((), None), (("clean", "lesion/2"), "lesion/2")])
def test_document_is_a_valid_large_image_annotation(validator, bounding_box, classes, attention_class):
    tiles = _tiles(classes=classes)
    document = dsa_annotation(tiles, _result(tiles), attention_class=attention_class)
    text = json.dumps(document, allow_nan=False)  # the writer's json.dump would refuse NaN the same way
    validator.validate(json.loads(text))
    (element,) = document["elements"]
    assert element["type"] == "griddata" and element["interpretation"] == "heatmap"
    assert len(element["values"]) % element["gridWidth"] == 0
    # large_image's own bounding box of the element: the first and last tile centres of the lattice
    box = bounding_box(element)
    assert (box["lowx"], box["lowy"]) == (300 + 50, 200 + 50)
    assert (box["highx"], box["highy"]) == (300 + 8 * 100 + 50, 200 + 5 * 100 + 50)
    assert box["details"] == 6 * 9
    assert element["label"]["value"] == ("attention" if attention_class is None else f"attention_{attention_class}")


def test_every_tile_value_is_its_attention():
    tiles = _tiles(seed=3)
    result = _result(tiles)
    document = dsa_annotation(tiles, result)
    _check_tile_values(document, result["tiles"], tiles.size_level0)
    assert document["attributes"]["grid"]["n_tiles"] == len(tiles.attention)


def test_per_class_map_values():
    tiles = _tiles(seed=4, classes=("clean", "lesion"))
    result = _result(tiles)
    for i, tile in enumerate(result["tiles"]):
        tile["attention_by_class"] = {k: float(v[i]) for k, v in tiles.attention_by_class.items()}
    for name in ("clean", "lesion"):
        _check_tile_values(dsa_annotation(tiles, result, attention_class=name), result["tiles"], 100, key=name)
    with pytest.raises(OutputError, match="no attention map for class 'tumour'"):
        dsa_annotation(tiles, result, attention_class="tumour")


def test_overlapping_tiles_and_an_unrecorded_stride(validator):
    """Stride 50 px under 100 px tiles: the grid is the stride lattice, from the record or from the tiles."""
    tiles = _tiles(corner=(0, 0), size=100, stride=50, shape=(5, 7), seed=5)
    for recorded in (50, None):
        result = _result(tiles, stride=recorded)
        document = dsa_annotation(tiles, result)
        validator.validate(document)
        (element,) = document["elements"]
        assert (element["dx"], element["dy"], element["gridWidth"]) == (50, 50, 7)
        assert element["origin"] == [50, 50, 0]
        _check_tile_values(document, result["tiles"], 100)


def test_non_finite_attention_never_reaches_the_document(validator):
    tiles = _tiles(seed=6)
    tiles.attention[[1, 4]] = [np.nan, np.inf]
    result = _result(tiles)
    result["probabilities"] = {"clean": float("nan"), "lesion": 0.5}
    document = dsa_annotation(tiles, result)
    text = json.dumps(document, allow_nan=False)
    validator.validate(json.loads(text))
    assert document["attributes"]["grid"]["non_finite_tiles"] == 2
    assert document["attributes"]["probabilities"]["clean"] is None
    drawn = [{**t, "attention": t["attention"] if math.isfinite(t["attention"]) else 0.0} for t in result["tiles"]]
    _check_tile_values(document, drawn, 100)  # the two bad tiles are drawn as background, the rest exactly
    assert np.isfinite(document["elements"][0]["values"]).all()


def test_provenance_in_attributes():
    tiles = _tiles(seed=7)
    document = dsa_annotation(tiles, _result(tiles, output_set={"run_key": "e" * 64}))
    provenance = document["attributes"]["provenance"]
    assert provenance["model"] == {"name": "ABMIL", "sha256": "ab" * 32, "milkit_version": "0.1.0"}
    assert provenance["encoder"] == {"name": "tiny_cnn", "sha256": "cd" * 32}
    assert provenance["milkit_version"] == "0.1.0"
    assert provenance["slide"] == {"path": "/slides/case 7.svs", "name": "case 7.svs"}
    assert provenance["run"] == {"key": "e" * 64}
    assert dsa_annotation(tiles, _result(tiles), run_key="f" * 64)["attributes"]["provenance"]["run"]["key"] == "f" * 64
    assert "ABMIL" in document["name"] and "lesion" in document["description"]
    assert document["attributes"]["prediction"]["class_name"] == "lesion"


def test_survival_and_regression_results_describe_their_outputs(validator):
    """A task model's record has no class: the description gives its risk or values instead."""
    tiles = _tiles(seed=8)
    for prediction, shown in (({"risk": 1.25, "hazards": [0.1, 0.2]}, "risk 1.250"),
                              ({"values": {"age": 61.5}}, "age 61.5")):
        result = {k: v for k, v in _result(tiles).items() if k != "probabilities"}
        document = dsa_annotation(tiles, {**result, "prediction": prediction})
        validator.validate(json.loads(json.dumps(document, allow_nan=False)))
        assert shown in document["description"] and document["attributes"]["prediction"] == prediction


def test_tiles_that_share_a_cell_or_none_at_all_are_refused():
    with pytest.raises(OutputError, match="share one cell"):
        tile_grid(np.array([[0, 0], [0, 0]]), 100, 100)
    with pytest.raises(OutputError, match="no tiles"):
        tile_grid(np.zeros((0, 2)), 100, 100)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo bundle (ABMIL + tiny_cnn, ONNX) on a small synthetic slide, outputs written by run_slide."""
    from mil_runtime.demo import write_synthetic_slide
    from mil_runtime.demo.__main__ import DEFAULT_MODEL
    from mil_runtime.encoder import find_encoder, load_encoder
    from mil_runtime.model import load_model
    from mil_runtime.pipeline import run_slide

    folder = tmp_path_factory.mktemp("dsa_demo")
    truth = write_synthetic_slide(folder / "lesions.svs", height=1536, width=2048, mpp=1.0, lesions="random 2",
                                  tissue=0.6, seed=7101, levels=2)
    model = load_model(DEFAULT_MODEL, device="cpu")
    encoder = load_encoder(find_encoder(DEFAULT_MODEL, model.metadata), device="cpu")
    out = folder / "out"
    result = run_slide(truth.path, model, encoder, out_dir=out, workers=1)
    return truth, model, encoder, result, out


def test_pipeline_run_as_dsa_annotation(demo_run, validator):
    """A real run's tiles (run_slide) drawn on the grid: each value is the attention its record says."""
    truth, _, _, result, out = demo_run
    record = json.loads((out / "lesions.json").read_text())
    table = TileTable(result.xy_level0, result.plan.tile_level0, result.grid_yx, result.tissue_fraction,
                      result.attention, result.attention_by_class)
    document = json.loads(json.dumps(dsa_annotation(table, record), allow_nan=False))
    validator.validate(document)
    _check_tile_values(document, record["tiles"], record["tiling"]["tile_level0"])
    assert document["elements"][0]["dx"] == record["tiling"]["stride_level0"]
    assert document["attributes"]["provenance"]["run"]["key"] == record["output_set"]["run_key"]
    assert document["attributes"]["provenance"]["model"]["sha256"] == record["model"]["sha256"]


@pytest.mark.parametrize("verify", [[], ["--verify"]], ids=["plain", "verify"])
def test_mil_infer_writes_the_dsa_annotation_into_the_set(demo_run, validator, tmp_path, verify):
    """`mil-infer --outputs json,geojson,dsa`: `<stem>.dsa.json` is a hashed member of the set, valid for
    large_image, and each tile's value is the record's attention; nothing unchosen is written. With and
    without --verify (which changes the run key), the annotation carries the record's run key."""
    import hashlib
    import subprocess
    import sys

    from mil_runtime.demo.__main__ import DEFAULT_MODEL
    from mil_runtime.outputs.record import read_output_set

    truth = demo_run[0]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mil_runtime.cli", str(truth.path), "--model", str(DEFAULT_MODEL),
               "--out", str(out), "--outputs", "json,geojson,dsa", "--workers", "1", "-q", "--json", *verify]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    stem = truth.path.stem
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{stem}{s}" for s in (".json", ".tiles.geojson", ".dsa.json"))
    found = read_output_set(out, stem)
    assert found.complete, found.reason
    dsa_path = out / f"{stem}.dsa.json"
    assert found.record["output_set"]["files"][dsa_path.name] == hashlib.sha256(dsa_path.read_bytes()).hexdigest()

    document = json.loads(dsa_path.read_text())  # json.loads accepts NaN; the schema then refuses it
    validator.validate(document)
    _check_tile_values(document, found.record["tiles"], found.record["tiling"]["tile_level0"])
    provenance = document["attributes"]["provenance"]
    assert provenance["model"]["sha256"] == found.record["model"]["sha256"]
    assert provenance["slide"]["path"] == found.record["input"]["path"]
    assert provenance["run"]["key"] == found.run_key is not None  # the record's run key, not a second one
