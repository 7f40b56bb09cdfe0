"""The record of one output set and the one function that says whether a set is complete.

`<stem>.json` is the set's record (DESIGN section 7). It is renamed into place after every other file
of the set, and its "output_set" field names them with their sha256 and carries the run key:

    "output_set": {"run_key": "<64 hex>", "files": {"<stem>.heatmap.png": "<sha256>", ...}}

A set without its record, with a record that does not parse or has no "output_set", or whose files
are missing or do not match the record's hashes, is incomplete. Readers (the service, the cohort
runner, tests) call `read_output_set` and nothing else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mil_runtime.run_key import file_sha256

RECORD_FIELD = "output_set"


@dataclass
class OutputSet:
    """What `read_output_set` found: `complete`, and when not, `reason` (one line)."""

    folder: Path
    stem: str
    complete: bool
    reason: str = ""
    record: dict[str, Any] | None = None
    files: dict[str, Path] = field(default_factory=dict)  # name -> path, the record's own file included

    @property
    def run_key(self) -> str | None:
        return ((self.record or {}).get(RECORD_FIELD) or {}).get("run_key")

    def __bool__(self) -> bool:
        return self.complete


def record_path(folder: str | os.PathLike, stem: str) -> Path:
    return Path(folder) / f"{stem}.json"


def set_manifest(paths: dict[str, Path], run_key: str | None) -> dict[str, Any]:
    """The record's "output_set" field for files {final name: path holding its content now}."""
    return {"run_key": run_key, "files": {name: file_sha256(path) for name, path in sorted(paths.items())}}


def read_output_set(folder: str | os.PathLike, stem: str, *, verify_hashes: bool = True) -> OutputSet:
    """complete / incomplete for the outputs of `stem` in `folder` (hashes checked unless verify_hashes=False)."""
    folder = Path(folder)
    record_file = record_path(folder, stem)

    def incomplete(reason: str, record: dict | None = None) -> OutputSet:
        return OutputSet(folder, stem, False, reason, record)

    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return incomplete(f"no record {record_file.name}")
    except (OSError, ValueError) as exc:
        return incomplete(f"record {record_file.name} unreadable: {exc}")
    manifest = record.get(RECORD_FIELD) if isinstance(record, dict) else None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return incomplete(f"record {record_file.name} names no output set", record if isinstance(record, dict) else None)
    files = {record_file.name: record_file}
    for name, digest in manifest["files"].items():
        path = folder / name
        if Path(name).name != name:
            return incomplete(f"record names {name!r} outside the folder", record)
        if not path.is_file():
            return incomplete(f"{name} is missing", record)
        if verify_hashes and file_sha256(path) != digest:
            return incomplete(f"{name} does not match the record's sha256", record)
        files[name] = path
    return OutputSet(folder, stem, True, "", record, files)


__all__ = ["OutputSet", "RECORD_FIELD", "read_output_set", "record_path", "set_manifest"]
