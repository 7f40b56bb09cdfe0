"""The record of one output set and the one function that says whether a set is complete.

`<stem>.json` is the set's record (DESIGN section 7). It is renamed into place after every other file
of the set, and its "output_set" field names them with their sha256 and carries the run key:

    "output_set": {"run_key": "<64 hex>", "files": {"<stem>.heatmap.png": "<sha256>", ...},
                   "stat": {"<stem>.heatmap.png": {"size": 12345, "mtime_ns": 1764600000123456789}, ...}}

A set without its record, with a record that does not parse or has no "output_set", or whose files
are missing or do not match the record's hashes, is incomplete. Readers (the service, the cohort
runner, tests) call `read_output_set` and nothing else.

"stat" is each file's size and mtime (ns) when it was hashed; a rename keeps both. A file whose size
and mtime are still those is taken to still hold what was hashed, without reading it (trust_stat, the
default): the rule the run key already applies to inputs, which are identified by size and mtime unless
--verify. So resuming a cohort of 30,000 slides reads no feature file again. Any other file is hashed
(a copy, a touch, an edit), and trust_stat=False (mil-infer --verify) hashes every file.
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
    ordered = sorted(paths.items())
    return {"run_key": run_key, "files": {name: file_sha256(path) for name, path in ordered},
            "stat": {name: _stat_of(path) for name, path in ordered}}


def _stat_of(path: Path) -> dict[str, int]:
    info = os.stat(path)
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}


def _unchanged(path: Path, recorded: Any) -> bool:
    """True when `path` still has the size and mtime recorded when it was hashed."""
    if not isinstance(recorded, dict):
        return False
    try:
        return _stat_of(path) == {"size": recorded.get("size"), "mtime_ns": recorded.get("mtime_ns")}
    except OSError:
        return False


def read_output_set(folder: str | os.PathLike, stem: str, *, verify_hashes: bool = True,
                    trust_stat: bool = True) -> OutputSet:
    """complete / incomplete for the outputs of `stem` in `folder`.

    verify_hashes=False only checks that the record's files exist. Otherwise each file's sha256 is
    checked, except, with trust_stat, for files whose size and mtime are those the record holds for it.
    """
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
    stats = manifest.get("stat") if trust_stat and isinstance(manifest.get("stat"), dict) else {}
    for name, digest in manifest["files"].items():
        path = folder / name
        if Path(name).name != name:
            return incomplete(f"record names {name!r} outside the folder", record)
        if not path.is_file():
            return incomplete(f"{name} is missing", record)
        if verify_hashes and not _unchanged(path, stats.get(name)) and file_sha256(path) != digest:
            return incomplete(f"{name} does not match the record's sha256", record)
        files[name] = path
    return OutputSet(folder, stem, True, "", record, files)


__all__ = ["OutputSet", "RECORD_FIELD", "read_output_set", "record_path", "set_manifest"]
