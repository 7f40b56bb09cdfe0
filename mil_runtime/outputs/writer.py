"""Writing one slide's outputs as a set: all files appear together, or none do.

Every file is staged as a hidden temporary in the output folder and renamed only after all of them
were written (mil_runtime.atomic), so an error half-way (disk full, a bad value) leaves no partial
or orphan files behind. The writer holds the stem's claim (`<stem>.lock`, mil_runtime.claims) while it
writes, and `<stem>.json`, the set's record, is renamed last and names every other file with its
sha256 (mil_runtime.outputs.record): a kill between two renames leaves a set that
`read_output_set` calls incomplete, never one that looks complete.

Models with one attention map per class (`Prediction.attention_by_class`) add a heatmap per class,
`<stem>.heatmap.<class>.png` (the class name made safe for file names, `class_file_labels`), and
`attention_<class>` columns / measurements (the class name as it is) to the CSV and the GeoJSON;
`<stem>.heatmap.png` and `attention` stay the model's `attention`, the predicted class's map.

Which files a set holds is chosen by name (`mil-infer --outputs`, OUTPUT_NAMES): the record
(`json`) is always written; every other chosen file is a member of the set, hashed in the record.
`dicom` (a Bulk Simple Annotations object and a Parametric Map, mil_runtime.outputs.dicom) needs a
DICOM input; `dsa` is a Digital Slide Archive heatmap annotation (mil_runtime.outputs.dsa).
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mil_runtime.atomic import atomic_output_dir
from mil_runtime.claims import claim_stem
from mil_runtime.errors import InvalidInputError, OutputError
from mil_runtime.features_io import write_feature_file
from mil_runtime.outputs.geojson import tile_measurements, tiles_feature_collection
from mil_runtime.outputs.heatmap import attention_heatmap
from mil_runtime.outputs.jsonable import to_jsonable  # noqa: F401  (also imported from here)
from mil_runtime.outputs.record import RECORD_FIELD, set_manifest
from mil_runtime.outputs.tables import write_tiles_csv
from mil_runtime.run_key import result_run_key

SUFFIXES = {
    "result": ".json",
    "heatmap": ".heatmap.png",
    "tissue_mask": ".tissue.png",
    "geojson": ".tiles.geojson",
    "tiles_csv": ".tiles.csv",
    "features": ".features.h5",
    "dicom_annotations": ".annotations.dcm",
    "dicom_attention": ".attention.dcm",
    "dsa": ".dsa.json",
}

# --outputs names -> the kinds of output_paths they write (per-class heatmaps go with "heatmap")
OUTPUT_KINDS = {
    "json": ("result",),
    "heatmap": ("heatmap",),
    "tissue": ("tissue_mask",),
    "geojson": ("geojson",),
    "csv": ("tiles_csv",),
    "features": ("features",),
    "dicom": ("dicom_annotations", "dicom_attention"),
    "dsa": ("dsa",),
}
OUTPUT_NAMES = tuple(OUTPUT_KINDS)
DEFAULT_OUTPUTS = ("json", "heatmap", "tissue", "geojson", "csv", "features")  # + dicom for DICOM inputs


def parse_outputs(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """`--outputs json,heatmap,...` as names in OUTPUT_NAMES order, "json" always included; None = default."""
    if text is None:
        return DEFAULT_OUTPUTS
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in OUTPUT_KINDS]
    if unknown:
        raise InvalidInputError(
            f"--outputs: unknown output {', '.join(map(repr, unknown))}; choose from {','.join(OUTPUT_NAMES)}"
        )
    return tuple(n for n in OUTPUT_NAMES if n in names or n == "json")


def chosen_kinds(outputs: Sequence[str], paths: Mapping[str, Path]) -> list[str]:
    """The kinds of `paths` that the output names write, in `paths` order."""
    wanted = {kind for name in outputs for kind in OUTPUT_KINDS[name]}
    return [k for k in paths if k in wanted or (k.startswith(CLASS_HEATMAP_KIND) and "heatmap" in outputs)]


CLASS_HEATMAP_KIND = "heatmap."  # + class name: the kind of a per-class heatmap in output_paths
MAX_LABEL_CHARS = 64  # a class's part of a file name; long names are cut (file names stop at 255 bytes)


def class_file_labels(class_names: Sequence[str]) -> dict[str, str]:
    """{class name: its label in file names}: characters other than A-Z a-z 0-9 . _ - become "_".

    Labels are unique even on case-insensitive filesystems: one that would clash with an earlier
    class's ("a/b" after "a_b", "Tumor" after "tumor") gets "_<class index>" appended.
    """
    labels: dict[str, str] = {}
    taken: set[str] = set()
    for index, name in enumerate(class_names):
        label = re.sub(r"[^A-Za-z0-9._-]", "_", str(name))[:MAX_LABEL_CHARS] or f"class_{index}"
        while label.casefold() in taken:
            label = f"{label}_{index}"
        taken.add(label.casefold())
        labels[name] = label
    return labels


def output_paths(out_dir: str | os.PathLike, stem: str, class_names: Sequence[str] = ()) -> dict[str, Path]:
    """Where each output of slide `stem` goes in `out_dir`.

    `class_names`: the classes of a model with per-class attention; each adds the kind
    "heatmap.<class name>" at `<stem>.heatmap.<label>.png` (label from `class_file_labels`).
    """
    paths = {kind: Path(out_dir) / f"{stem}{suffix}" for kind, suffix in SUFFIXES.items()}  # every kind: callers choose
    for name, label in class_file_labels(class_names).items():
        paths[CLASS_HEATMAP_KIND + name] = Path(out_dir) / f"{stem}.heatmap.{label}.png"
    return paths


@dataclass
class TileTable:
    """What the tile outputs need: geometry, grid position, tissue fraction, attention (all (N,) aligned)."""

    xy_level0: np.ndarray  # (N, 2) int64 (x, y) top-left, level-0 px
    size_level0: int
    grid_yx: np.ndarray  # (N, 2) int64 (row, col)
    tissue_fraction: np.ndarray  # (N,)
    attention: np.ndarray  # (N,)
    attention_by_class: Mapping[str, np.ndarray] | None = None  # {class name: (N,)}, multi-branch models
    instance_probabilities: Mapping[str, np.ndarray] | None = None  # {class name: (N,)}, instance classifiers

    @property
    def class_names(self) -> list[str]:
        """Classes with their own attention map ([] for single-map models)."""
        return list(self.attention_by_class or {})

    def measurements(self) -> dict[str, np.ndarray]:
        """Per-tile numbers of the GeoJSON: attention (with rank and percentile), tissue fraction,
        attention_<class> per class map, prob_<class> per instance-classifier class."""
        values = {"tissue_fraction": self.tissue_fraction}
        for name, weights in (self.attention_by_class or {}).items():
            values[f"attention_{name}"] = weights
        for name, probabilities in (self.instance_probabilities or {}).items():
            values[f"prob_{name}"] = probabilities
        return tile_measurements(self.attention, values)


def _save_png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path, format="PNG")


def write_slide_outputs(
    out_dir: str | os.PathLike,
    stem: str,
    result: dict,
    tiles: TileTable,
    thumbnail: np.ndarray,
    mask: np.ndarray,
    scale: tuple[float, float],
    features: dict | None = None,
    verify: bool = False,
    *,
    outputs: Sequence[str] = DEFAULT_OUTPUTS,
    geojson_offset: tuple[int, int] = (0, 0),
    dicom_source: Any = None,
    before_record: Callable[[dict], None] | None = None,
) -> dict[str, Path]:
    """Write the chosen outputs (names of OUTPUT_KINDS; the JSON record always) as one set.

    With `tiles.attention_by_class`, one more heatmap per class (see the module docstring).
    `features` holds the keyword arguments of features_io.write_feature_file except the path; None
    keeps an existing feature file (reused features) as a member of the set.
    `geojson_offset`: level-0 px subtracted in the GeoJSON (the slide's bounds, QuPath's frame).
    `dicom_source`: the DICOM input's identity (mil_runtime.slide.dicom.read_dicom_source), needed by "dicom".
    `before_record(result)` runs once every other file is staged (so it can time them), then the
    record is written. `verify`: the run key identifies the input by its sha256 (mil-infer --verify).
    Returns {kind: final path} of the files written.
    """
    outputs = parse_outputs(outputs)
    if "dicom" in outputs and dicom_source is None:
        raise InvalidInputError(f"{stem}: --outputs dicom needs a DICOM input (a DICOM WSI series or instance)")
    paths = output_paths(out_dir, stem, tiles.class_names)
    kinds = [k for k in chosen_kinds(outputs, paths) if k != "features" or features is not None]
    with claim_stem(out_dir, stem), _output_errors(out_dir), \
            atomic_output_dir(out_dir, last=paths["result"].name) as staged:
        temp = {kind: staged.path(paths[kind].name) for kind in kinds}
        _stage_images(temp, tiles, thumbnail, mask, scale)
        if "geojson" in temp:
            identity = f"{(result.get('model') or {}).get('sha256')}:{stem}"
            collection = tiles_feature_collection(tiles.xy_level0, tiles.size_level0, tiles.measurements(),
                                                  offset=geojson_offset, identity=identity,
                                                  prediction=_prediction_summary(result))
            _dump_json(temp["geojson"], collection)
        if "tiles_csv" in temp:
            with open(temp["tiles_csv"], "w", encoding="utf-8", newline="") as handle:
                write_tiles_csv(handle, tiles.xy_level0, tiles.size_level0, tiles.grid_yx, tiles.tissue_fraction,
                                tiles.attention, tiles.attention_by_class, tiles.instance_probabilities)
        if "features" in temp:
            write_feature_file(temp["features"], **features)
        document = to_jsonable(result)  # once: the tiles list is long
        run_key = result_run_key(document, verify=verify)  # known before the record: DSA, DICOM carry it
        provenance = {**document, RECORD_FIELD: {"run_key": run_key}}
        if "dsa" in temp:
            from mil_runtime.outputs.dsa import dsa_annotation

            _dump_json(temp["dsa"], dsa_annotation(tiles, provenance))
        if "dicom_annotations" in temp:
            from mil_runtime.outputs.dicom import write_dicom_outputs

            write_dicom_outputs(dicom_source, tiles, provenance, temp["dicom_annotations"], temp["dicom_attention"])
        if before_record is not None:
            before_record(result)
        members = {paths[kind].name: temp[kind] for kind in kinds if kind != "result"}
        if "features" in outputs and features is None and paths["features"].is_file():  # reused features
            members[paths["features"].name] = paths["features"]
            kinds.append("features")
        write_record(temp["result"], result, members, run_key, verify=verify)
    return {kind: paths[kind] for kind in kinds}


def _stage_images(temp: Mapping[str, Path], tiles: TileTable, thumbnail: np.ndarray, mask: np.ndarray,
                  scale: tuple[float, float]) -> None:
    """The heatmap(s) and the tissue mask, those of them that were chosen."""
    maps = {"heatmap": tiles.attention, **{CLASS_HEATMAP_KIND + name: weights
                                          for name, weights in (tiles.attention_by_class or {}).items()}}
    for kind, attention in maps.items():
        if kind in temp:
            pixels = attention_heatmap(thumbnail, scale, tiles.xy_level0, tiles.size_level0, attention)
            _save_png(temp[kind], pixels)
    if "tissue_mask" in temp:
        _save_png(temp["tissue_mask"], np.where(mask, 255, 0).astype(np.uint8))


def _prediction_summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """What the GeoJSON's prediction annotation shows, from the result document."""
    model = result.get("model") or {}
    prediction = result.get("prediction") or {}
    task_values = {"risk": prediction["risk"]} if "risk" in prediction else {
        f"value_{name}": value for name, value in (prediction.get("values") or {}).items()}
    return {
        # regression / survival models have no class: the annotation is named by their outputs
        "class_name": prediction.get("class_name") if not task_values else
        ", ".join(f"{name}={float(value):.4g}" for name, value in task_values.items()),
        "probabilities": result.get("probabilities") or {},
        "measurements": task_values,
        "metadata": {"model": model.get("name"), "model_sha256": model.get("sha256"),
                     "milkit_version": result.get("milkit_version")},
    }


def _dump_json(path: Path, document: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, allow_nan=False)


def write_record(path: Path, result: dict, members: Mapping[str, Path], run_key: str | None = None,
                 verify: bool = False) -> None:
    """Write the set's record to `path`: `result` plus "output_set" (run key, members' sha256).

    `result` gets the "output_set" field too, so what mil-infer prints is what the record says.
    """
    document = dict(to_jsonable(result))
    key = run_key if run_key is not None else result_run_key(document, verify=verify)
    document[RECORD_FIELD] = result[RECORD_FIELD] = set_manifest(dict(members), key)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, allow_nan=False)
        handle.write("\n")


def write_result_set(out_dir: str | os.PathLike, stem: str, result: dict, run_key: str | None = None,
                     verify: bool = False) -> Path:
    """A set of one file, `<stem>.json` (the result of a feature-file input), under the stem's claim."""
    path = output_paths(out_dir, stem)["result"]
    with claim_stem(out_dir, stem), _output_errors(out_dir), atomic_output_dir(out_dir, last=path.name) as staged:
        write_record(staged.path(path.name), result, {}, run_key, verify=verify)
    return path


class OutputWriteError(OutputError, OSError):
    """An OSError while writing outputs, as the OutputError (exit 7) the CLI reports; still an OSError."""


class _output_errors:
    """OSError while staging outputs (disk full, quota, read-only) -> OutputError (exit 7), one line."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = out_dir

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or not isinstance(exc, OSError) or isinstance(exc, OutputError):
            return False
        reason = exc.strerror or str(exc) or type(exc).__name__
        hint = "free some space" if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) else "check it"
        error = OutputWriteError(f"cannot write the outputs in {self.out_dir}: {reason}; {hint} or choose another --out")
        error.errno = exc.errno
        raise error from None
