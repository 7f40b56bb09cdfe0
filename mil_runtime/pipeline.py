"""One slide through a MIL model: open, mpp, tissue, tiles, encoder, aggregation, outputs.

    result = run_slide("slide.svs", load_model("abmil.onnx"), load_encoder("resnet50.onnx"), out_dir="out")
    result.predicted_name, result.class_probabilities, result.attention, result.outputs

Everything the model needs to know about tiles (size, microns per pixel, overlap) comes from its
metadata. When `<out_dir>/<stem>.features.h5` was made by the same encoder file (name and sha256) on
the same grid, it is reused and the slide is not encoded again: a second model on a slide is cheap.
A damaged one (unreadable, truncated, NaN/Inf values, bytes that no longer match the sha256 in the
set's record <stem>.json) is not an error: the slide is encoded again,
the file replaced, and the result's `warnings` (and stderr) say so.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mil_runtime.atomic import ensure_writable_dir
from mil_runtime.domain import check_domain
from mil_runtime.encoder import check_encoder_matches, weights_sha256
from mil_runtime.errors import ContractMismatchError, InvalidInputError, MilkitError, NoTissueError
from mil_runtime.features_io import read_feature_file
from mil_runtime.outputs.record import RECORD_FIELD
from mil_runtime.outputs.result import encoder_identity, result_document, rounded_timings
from mil_runtime.outputs.writer import (DEFAULT_OUTPUTS, TileTable, chosen_kinds, output_paths, parse_outputs,
                                        write_slide_outputs)
from mil_runtime.run_key import file_sha256
from mil_runtime.slide.grid import GridPlan, plan_grid
from mil_runtime.slide.mpp import OPENSLIDE, OVERRIDE, TIFF_RESOLUTION, resolve_mpp
from mil_runtime.slide.open import Slide, open_slide
from mil_runtime.slide.regions import FRAMES, Regions, bounds_offset, find_roi_file, read_regions
from mil_runtime.slide.reader import TileReader
from mil_runtime.slide.tissue import TISSUE_THRESHOLD, TissueMask, detect_tissue, tile_fractions

ProgressHook = Callable[[str, int, int], None]  # on_progress(stage, done, total)

MPP_DISAGREEMENT = 0.10  # warn when --mpp differs from the slide's own value by more than 10%


@dataclass
class SlideResult:
    """What `run_slide` found: the prediction, the tiles behind it, and how it was obtained."""

    slide_path: Path
    prediction: Any  # mil_runtime.model.Prediction
    class_names: list[str]
    mpp: float
    mpp_source: str
    plan: GridPlan
    tissue: TissueMask
    xy_level0: np.ndarray  # (N, 2) int64 (x, y) level-0 top-left corners of the kept tiles
    grid_yx: np.ndarray  # (N, 2) int64 (row, col) grid units
    tissue_fraction: np.ndarray  # (N,)
    features: np.ndarray  # (N, D) float32
    features_reused: bool
    timings: dict[str, float]
    warnings: list[str]
    runner: Any  # the MILRunner that predicted
    encoder: dict[str, Any]  # identity of the encoder that made the features (outputs.result)
    tissue_threshold: float
    outputs: dict[str, Path] = field(default_factory=dict)
    domain: dict[str, Any] | None = None  # out-of-domain score (mil_runtime.domain); None: model has no stats
    regions: Regions | None = None  # --roi: the polygons tiling was restricted to
    output_options: dict[str, Any] = field(default_factory=dict)  # outputs chosen, GeoJSON frame and offset

    @property
    def n_tiles(self) -> int:
        return int(len(self.xy_level0))

    @property
    def attention(self) -> np.ndarray:
        return np.asarray(self.prediction.attention, dtype=np.float32)  # (N,)

    @property
    def attention_by_class(self) -> dict[str, np.ndarray] | None:
        """{class name: (N,)} for models with one attention map per class, else None."""
        return self.prediction.attention_by_class

    @property
    def instance_probabilities(self) -> dict[str, np.ndarray] | None:
        """{class name: (N,)} for models with an instance classifier, else None."""
        return getattr(self.prediction, "instance_probabilities", None)

    @property
    def predicted_name(self) -> str:
        return self.prediction.predicted_name

    @property
    def class_probabilities(self) -> np.ndarray:
        return np.asarray(self.prediction.class_probabilities, dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        """The JSON result (schema in mil_runtime.outputs.result), with the slide-only fields."""
        return result_document(
            input_path=self.slide_path, input_type="slide", runner=self.runner, prediction=self.prediction,
            encoder=self.encoder, xy_level0=self.xy_level0,
            mpp={"value": self.mpp, "source": self.mpp_source},
            tiling={**self.plan.as_dict(), "level_used": self.plan.level},
            timings=self.timings, warnings=self.warnings,
            extra={
                "tissue": {"threshold": self.tissue_threshold, "mask_mpp": self.tissue.mpp,
                           "slide_fraction": self.tissue.fraction},
                "features_reused": self.features_reused,
                "roi": self.regions.as_record() if self.regions is not None else None,
                "output_options": self.output_options,
                "outputs": {k: str(v) for k, v in self.outputs.items()},
                **({"domain": self.domain} if self.domain is not None else {}),
            },
        )


def _mpp_warnings(slide: Slide, mpp: float, source: str, target_mpp: float) -> list[str]:
    warnings = []
    if source == TIFF_RESOLUTION:
        warnings.append(f"mpp {mpp:.4g} taken from the TIFF resolution tags (no scanner metadata); "
                        "check it or pass --mpp")
    if source == OVERRIDE:
        try:
            own, _ = resolve_mpp(slide.properties)
        except MilkitError:
            own = None
        if own is not None and abs(own - mpp) > MPP_DISAGREEMENT * own:
            warnings.append(f"--mpp {mpp:.4g} differs from the slide's own {own:.4g} um/px")
    if target_mpp < mpp / 1.02:
        warnings.append(f"the model expects {target_mpp:.4g} um/px but the slide is scanned at {mpp:.4g}: "
                        "tiles are upsampled, expect worse results")
    return warnings


def select_tiles(plan: GridPlan, dimensions: tuple[int, int], tissue: TissueMask,
                 threshold: float, source: str, regions: Regions | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Kept tiles' (x, y) level-0 corners (N, 2) and their tissue fractions (N,); NoTissueError if none.

    With `regions`, a tile's fraction counts only the tissue inside the regions (holes excluded).
    """
    positions = plan.positions(dimensions)  # (all tiles, 2)
    mask = tissue.mask if regions is None else tissue.mask & regions.mask(tissue.mask.shape, tissue.scale)
    fractions = tile_fractions(mask, tissue.scale, positions, plan.tile_level0)  # (all tiles,)
    keep = fractions >= threshold
    if not keep.any():
        where = "the slide" if regions is None else f"the slide, {mask.mean():.1%} inside --roi {regions.path}"
        raise NoTissueError(
            f"{source}: no tile has at least {threshold:.0%} tissue (tissue covers {tissue.fraction:.1%} of "
            f"{where}, {len(positions)} candidate tiles); check the slide and its regions, or lower --tissue-threshold"
        )
    return positions[keep], fractions[keep]


def _reusable_features(path: Path, encoder: Any, plan: GridPlan, xy: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """(features, None) of an existing feature file that matches this encoder and grid exactly; (None, None)
    when there is none or it belongs to another encoder or grid; (None, warning) when it is damaged
    (unreadable, truncated, non-finite values): the slide is then encoded again and the file replaced."""
    if not path.is_file():
        return None, None
    try:
        stored = read_feature_file(path)
    except (MilkitError, OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:  # h5py on a damaged file
        return None, f"cached features {path} are damaged ({' '.join(str(exc).split())[:200]}); re-encoding the slide"
    same = (
        stored.encoder == encoder.name
        and stored.encoder_sha256 == encoder.sha256
        and stored.tile_px_level0 == plan.tile_level0
        and stored.feature_dim == int(encoder.output_dim)
        and stored.coords_px is not None
        and np.array_equal(stored.coords_px, xy)
    )
    if not same:
        return None, None
    if not np.isfinite(stored.features).all():  # one reduction; a good cache never holds NaN/Inf
        return None, f"cached features {path} are damaged (NaN or Inf values); re-encoding the slide"
    recorded = _recorded_sha256(path)
    if recorded is not None and file_sha256(path) != recorded:  # finite but changed bytes: bit rot, a bad copy
        return None, (f"cached features {path} are damaged (their sha256 differs from the one "
                      f"{path.name.removesuffix('.features.h5')}.json recorded); re-encoding the slide")
    return stored.features, None


def _recorded_sha256(path: Path) -> str | None:
    """The sha256 the set's record (<stem>.json, mil_runtime.outputs.record) gives the feature file at `path`;
    None when there is no readable record or it does not list the file (older sets): nothing to compare."""
    record = path.with_name(path.name.removesuffix(".features.h5") + ".json")
    try:
        files = json.loads(record.read_text())[RECORD_FIELD]["files"]
        digest = files[path.name]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return digest if isinstance(digest, str) else None


def encode_tiles(slide_path: Path, plan: GridPlan, xy: np.ndarray, encoder: Any, *, batch_size: int,
                 workers: int, progress: bool, on_progress: ProgressHook | None = None) -> np.ndarray:
    """Read the tiles in threads and encode them in batches: (N, D) float32.

    `on_progress("encoding", done, total)` is called after each batch; an exception raised from it
    stops the encoding and propagates (the caller writes nothing).
    """
    features = np.empty((len(xy), int(encoder.output_dim)), dtype=np.float32)  # (N, D)
    reader = TileReader(slide_path, plan, xy, batch_size=batch_size, workers=workers)
    bar = tqdm(total=len(xy), unit="tile", desc="encoding", file=sys.stderr,
               disable=not (progress and sys.stderr.isatty()))
    with bar:
        for start, tiles in reader:  # tiles: (B, tile_px, tile_px, 3) uint8
            batch = np.asarray(encoder.encode(tiles))  # (B, D)
            if batch.shape != (len(tiles), features.shape[1]):
                raise ContractMismatchError(
                    f"encoder {encoder.name} returned {batch.shape} for {len(tiles)} tiles, expected "
                    f"({len(tiles)}, {features.shape[1]}); re-export the encoder"
                )
            features[start:start + len(tiles)] = batch
            bar.update(len(tiles))
            if on_progress is not None:
                on_progress("encoding", start + len(tiles), len(xy))
    return features


def default_outputs(slide_path: str | os.PathLike) -> tuple[str, ...]:
    """The outputs a slide gets when none are chosen: DEFAULT_OUTPUTS, plus "dicom" for a DICOM input
    when the milkit[dicom] extra is installed (without it the default leaves DICOM out)."""
    from mil_runtime.slide.dicom import is_dicom_input

    if is_dicom_input(Path(slide_path)) and _dicom_extra_installed():
        return parse_outputs([*DEFAULT_OUTPUTS, "dicom"])
    return parse_outputs(None)


def _choose_outputs(slide_path: Path, outputs: Any, writing: bool) -> tuple[tuple[str, ...], Any]:
    """The output names of this slide, and the DICOM source's identity when "dicom" is among them.

    The default is DEFAULT_OUTPUTS, plus "dicom" for a DICOM input (when the milkit[dicom] extra is
    installed; without it the default leaves DICOM out and a chosen "dicom" fails with how to install it).
    """
    from mil_runtime.slide.dicom import is_dicom_input

    chosen = default_outputs(slide_path) if outputs is None else parse_outputs(outputs)
    if "dicom" not in chosen or not writing:
        return chosen, None
    if not is_dicom_input(slide_path):
        raise InvalidInputError(
            f"{slide_path}: --outputs dicom needs a DICOM input (a DICOM WSI series folder or instance); "
            "leave dicom out of --outputs for other slides"
        )
    from mil_runtime.slide.dicom import read_dicom_source

    return chosen, read_dicom_source(slide_path)


def _dicom_extra_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("highdicom") is not None


def run_slide(
    slide_path: str | os.PathLike,
    model: Any,
    encoder: Any,
    *,
    out_dir: str | os.PathLike | None = None,
    mpp: float | None = None,
    batch_size: int = 64,
    workers: int = 4,
    tissue_threshold: float = TISSUE_THRESHOLD,
    progress: bool = False,
    reuse_features: bool = True,
    verify: bool = False,
    outputs: str | list[str] | tuple[str, ...] | None = None,
    roi: str | os.PathLike | None = None,
    geojson_frame: str = "bounds",
    on_progress: ProgressHook | None = None,
) -> SlideResult:
    """Predict one slide with `model` (MILRunner) on features from `encoder` (encoder runner).

    With `out_dir`, writes the chosen `outputs` there as one set, all or none (mil_runtime.outputs.writer):
    by default <stem>.json, .heatmap.png, .tissue.png, .tiles.geojson, .tiles.csv and .features.h5, plus
    the DICOM objects for DICOM inputs; models with per-class attention add .heatmap.<class>.png per
    class. `roi`: a GeoJSON file of regions (or a folder of <stem>.geojson) that tiling is restricted
    to. `geojson_frame`: "bounds" (QuPath's frame, the default) or "level0", for the GeoJSON out and the
    regions in. Raises the mil_runtime.errors family (SlideReadError, MppUnknownError, NoTissueError,
    ContractMismatchError, OutputError, ...).
    """
    timings: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    if not 0.0 <= tissue_threshold <= 1.0:
        raise InvalidInputError(f"--tissue-threshold must be between 0 and 1, got {tissue_threshold}")
    meta = model.metadata
    if meta.tiling is None:
        raise ContractMismatchError(
            f"model {meta.model_name} records no tiling (tile size, mpp), so it cannot read slides; "
            "give it a feature file instead, or re-export it with its tiling"
        )
    check_encoder_matches(meta, encoder)
    fixed_px = getattr(encoder, "tile_px", None)  # encoders exported for one input size say so
    if fixed_px is not None and fixed_px != meta.tiling.tile_px:
        raise ContractMismatchError(
            f"the model reads {meta.tiling.tile_px} px tiles but encoder {encoder.name} takes {fixed_px} px; "
            "re-export the encoder without a fixed tile size, or use the encoder the model was trained on"
        )
    slide_path = Path(slide_path)
    if geojson_frame not in FRAMES:
        raise InvalidInputError(f"--geojson-frame must be one of {', '.join(FRAMES)}, got {geojson_frame!r}")
    chosen, dicom_source = _choose_outputs(slide_path, outputs, out_dir is not None)
    roi_file = find_roi_file(roi, slide_path) if roi is not None else None
    if out_dir is not None:
        ensure_writable_dir(out_dir)  # fail before the slow part, not after it
    report = on_progress if on_progress is not None else (lambda stage, done, total: None)
    report("tissue", 0, 0)
    with open_slide(slide_path) as slide:
        offset = bounds_offset(slide.properties)
        regions = read_regions(roi_file, geojson_frame, offset) if roi_file is not None else None
        mpp_value, mpp_source = resolve_mpp(slide.properties, mpp, source_name=str(slide_path))
        plan = plan_grid(slide.dimensions, slide.level_downsamples, mpp_value, meta.tiling.tile_px,
                         meta.tiling.mpp, meta.tiling.overlap, source=str(slide_path))
        warnings = _mpp_warnings(slide, mpp_value, mpp_source, meta.tiling.mpp)
        lap("open")
        tissue = detect_tissue(slide, mpp_value)
        xy, fractions = select_tiles(plan, slide.dimensions, tissue, tissue_threshold, str(slide_path), regions)
        warnings.extend(regions.warnings if regions is not None else [])
        grid_yx = plan.grid_coords(xy)
        lap("tissue")

    paths = output_paths(out_dir, slide_path.stem) if out_dir is not None else {}
    features = None
    if paths and reuse_features and "features" in chosen:
        features, damaged = _reusable_features(paths["features"], encoder, plan, xy)
        warnings.extend([damaged] if damaged else [])
    reused = features is not None
    report("encoding", len(xy) if reused else 0, len(xy))
    if features is None:
        features = encode_tiles(slide_path, plan, xy, encoder, batch_size=batch_size, workers=workers,
                                progress=progress, on_progress=on_progress)
    lap("read_encode")
    report("aggregating", len(xy), len(xy))

    prediction = model.predict(features, coords=grid_yx, source=str(slide_path))
    domain = check_domain(features, meta, warnings)  # warns when the features lie far from training's
    lap("aggregate")

    result = SlideResult(
        slide_path=slide_path, prediction=prediction, class_names=list(prediction.class_names),
        mpp=mpp_value, mpp_source=mpp_source, plan=plan, tissue=tissue, xy_level0=xy, grid_yx=grid_yx,
        tissue_fraction=fractions, features=features, features_reused=reused, timings=timings,
        warnings=warnings, runner=model, tissue_threshold=tissue_threshold, domain=domain, regions=regions,
        output_options={"outputs": list(chosen), "geojson_frame": geojson_frame,
                        "geojson_offset": list(offset if geojson_frame == "bounds" else (0, 0))},
        encoder=encoder_identity(model, encoder.name, encoder.sha256, file=getattr(encoder, "path", None),
                                 output_dim=int(encoder.output_dim)),
    )
    if out_dir is not None:
        report("writing", len(xy), len(xy))
        feature_args = None if reused else {
            "features": features, "coords_px": xy, "tile_px_level0": plan.tile_level0,
            "stride_level0": plan.stride_level0, "mpp": mpp_value,
            "patch_size": plan.read_px, "patch_level": plan.level, "encoder": encoder.name,
            "encoder_sha256": encoder.sha256,
            "encoder_weights_sha256": weights_sha256(encoder),
        }
        all_paths = output_paths(out_dir, slide_path.stem, list(result.attention_by_class or {}))
        result.outputs = {kind: all_paths[kind] for kind in chosen_kinds(chosen, all_paths)
                          if kind != "features" or feature_args is not None or all_paths[kind].is_file()}
        table = TileTable(xy, plan.tile_level0, grid_yx, fractions, result.attention, result.attention_by_class,
                          result.instance_probabilities)

        def finished(document: dict) -> None:  # called once every other file is staged, so "write" covers them
            timings["write"] = time.perf_counter() - clock
            timings["total"] = time.perf_counter() - started
            document["timings_s"] = rounded_timings(timings)

        result.outputs = write_slide_outputs(
            out_dir, slide_path.stem, result.to_dict(), table, tissue.thumbnail, tissue.mask, tissue.scale,
            features=feature_args, verify=verify, outputs=chosen, geojson_offset=tuple(result.output_options["geojson_offset"]),
            dicom_source=dicom_source, before_record=finished)
        return result
    timings["total"] = time.perf_counter() - started
    return result


__all__ = ["OPENSLIDE", "OVERRIDE", "SlideResult", "TIFF_RESOLUTION", "encode_tiles", "run_slide", "select_tiles"]
