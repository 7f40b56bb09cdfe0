"""The run key of one output set (DESIGN section 7): one function, used by everything that asks
"would this run give the same result as that recorded one?" (the record, the result cache, resume).

The key is the sha256 of a canonical JSON document of
- the input's identity: its size and mtime (ns), or its sha256 when `verify` is true;
- the model's and the encoder's sha256;
- every setting that changes results, as the caller chose it (`run_settings`): --mpp, the tissue
  threshold, the regions tiling was restricted to (--roi, by sha256 and frame), and what the set
  holds (the outputs chosen, the GeoJSON frame), so a set made with other outputs is redone. Tile px,
  target mpp, overlap, precision and graph rule are the model's, so its sha256 covers them; the mpp a
  slide records, the level read and its bounds follow from the slide's identity. The key is thus
  known before the input is opened (a cohort's resume opens no slide).
Paths and timings are not part of it: the same slide moved elsewhere with the same mtime is the same run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RUN_KEY_VERSION = 3  # bump when the document below changes meaning (3: the settings as asked for, run_settings)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def input_identity(path: str | os.PathLike, verify: bool = False) -> dict[str, Any]:
    """{"size", "mtime_ns"} of the input, or {"sha256"} under --verify.

    A folder input (a DICOM series) is identified by each of its files, by name: {"files": {name: identity}}.
    """
    path = Path(path)
    if path.is_dir():
        return {"files": {child.name: input_identity(child, verify)
                          for child in sorted(path.iterdir()) if child.is_file()}}
    if verify:
        return {"sha256": file_sha256(path)}
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def compute_run_key(input_path: str | os.PathLike, *, model_sha256: str | None, encoder_sha256: str | None,
                    settings: Mapping[str, Any], verify: bool = False) -> str:
    """The run key (64 hex digits). `settings`: tile_px, mpp, overlap, tissue, level, precision, graph."""
    document = {
        "version": RUN_KEY_VERSION,
        "input": input_identity(input_path, verify),
        "model_sha256": model_sha256,
        "encoder_sha256": encoder_sha256,
        "settings": {str(k): settings[k] for k in sorted(settings)},
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_settings(*, mpp_override: float | None = None, tissue_threshold: float | None = None,
                 roi_sha256: str | None = None, roi_frame: str | None = None,
                 outputs: list[str] | tuple[str, ...] | None = None, geojson_frame: str | None = None) -> dict[str, Any]:
    """The result-changing settings of a run, as asked for: known before the input is opened.

    What the slide itself decides (the mpp it records, the pyramid level read, its bounds offset) is
    fixed by the input's identity, and the model's tiling, precision and graph rule by its sha256, so
    the key needs only what the caller chose: --mpp, --tissue-threshold, --roi (by sha256 and frame),
    the outputs and the GeoJSON frame. A cohort can thus tell a finished slide without opening it.
    """
    return {
        "mpp_override": mpp_override,
        "tissue_threshold": tissue_threshold,
        "roi": {"sha256": roi_sha256, "frame": roi_frame} if roi_sha256 is not None else None,
        "outputs": {"outputs": list(outputs), "geojson_frame": geojson_frame} if outputs is not None else None,
    }


def result_settings(result: Mapping[str, Any]) -> dict[str, Any]:
    """run_settings of the run that made a result document (mil_runtime.outputs.result)."""
    mpp = result.get("mpp") or {}
    roi = result.get("roi") if isinstance(result.get("roi"), dict) else {}
    options = result.get("output_options") or {}
    return run_settings(
        mpp_override=mpp.get("value") if mpp.get("source") == "override" else None,
        tissue_threshold=(result.get("tissue") or {}).get("threshold"),
        roi_sha256=roi.get("sha256"), roi_frame=roi.get("frame"),
        outputs=options.get("outputs"), geojson_frame=options.get("geojson_frame"),
    )


__all__ = ["compute_run_key", "file_sha256", "input_identity", "result_run_key", "result_settings", "run_settings"]


def result_run_key(result: Mapping[str, Any], verify: bool = False) -> str | None:
    """compute_run_key for a result document (mil_runtime.outputs.result); None when its input is gone."""
    path = (result.get("input") or {}).get("path")
    if not path or not Path(path).exists():
        return None
    return compute_run_key(path, model_sha256=(result.get("model") or {}).get("sha256"),
                           encoder_sha256=(result.get("encoder") or {}).get("sha256"),
                           settings=result_settings(result), verify=verify)
