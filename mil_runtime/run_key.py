"""The run key of one output set (DESIGN section 7): one function, used by everything that asks
"would this run give the same result as that recorded one?" (the record, the result cache, resume).

The key is the sha256 of a canonical JSON document of
- the input's identity: its size and mtime (ns), or its sha256 when `verify` is true;
- the model's and the encoder's sha256;
- every setting that changes results: tile px, mpp used, overlap, tissue settings, pyramid level,
  precision, graph rule, the regions tiling was restricted to (--roi, by sha256 and frame), and what
  the set holds (the outputs chosen, the GeoJSON frame), so a set made with other outputs is redone.
Paths and timings are not part of it: the same slide moved elsewhere with the same mtime is the same run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RUN_KEY_VERSION = 2  # bump when the document below changes meaning (2: roi, outputs, GeoJSON frame)


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


def result_settings(result: Mapping[str, Any], metadata: Any = None) -> dict[str, Any]:
    """The result-changing settings of a result document (mil_runtime.outputs.result) and the model's metadata."""
    tiling = result.get("tiling") or {}
    tiling_meta = getattr(metadata, "tiling", None)
    return {
        "tile_px": tiling.get("tile_px"),
        "mpp": (result.get("mpp") or {}).get("value"),
        "overlap": getattr(tiling_meta, "overlap", None),
        "stride_level0": tiling.get("stride_level0"),
        "tissue": {"threshold": (result.get("tissue") or {}).get("threshold"),
                   "mask_mpp": (result.get("tissue") or {}).get("mask_mpp")},
        "level": tiling.get("level_used", tiling.get("level")),
        "precision": getattr(metadata, "precision", None) or "fp32",
        "graph": getattr(metadata, "graph", None),
        "roi": {key: roi.get(key) for key in ("sha256", "frame", "offset")} if isinstance(roi := result.get("roi"), dict) else None,
        "outputs": result.get("output_options") or None,
    }


__all__ = ["compute_run_key", "file_sha256", "input_identity", "result_run_key", "result_settings"]


def result_run_key(result: Mapping[str, Any], metadata: Any = None, verify: bool = False) -> str | None:
    """compute_run_key for a result document (mil_runtime.outputs.result); None when its input is gone."""
    path = (result.get("input") or {}).get("path")
    if not path or not Path(path).exists():
        return None
    return compute_run_key(path, model_sha256=(result.get("model") or {}).get("sha256"),
                           encoder_sha256=(result.get("encoder") or {}).get("sha256"),
                           settings=result_settings(result, metadata), verify=verify)
