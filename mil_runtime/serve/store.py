"""The state folder: results by run key, written all-or-nothing, and the job index.

    STATE/results/<run key>/<stem>.*     one output set per computation (mil_runtime.outputs.writer:
                                         staged, renamed, the record <stem>.json last)
    STATE/rois/<sha256>.geojson          the regions a job was restricted to (level-0 px)
    STATE/jobs.json                      the job handles, rewritten atomically on every state change

After a restart, handles of finished jobs are served again (their set must still read complete),
and handles that were queued or running are marked failed ("submit it again"); folders of results
that never completed are removed, so nothing half-written is ever served.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mil_runtime.atomic import atomic_write
from mil_runtime.outputs.record import OutputSet, read_output_set

INDEX_NAME = "jobs.json"
INDEX_VERSION = 1


class Store:
    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir)
        self.results = self.root / "results"
        self.rois = self.root / "rois"
        self.uploads = self.root / "uploads"
        for folder in (self.root, self.results, self.rois, self.uploads):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in self.uploads.iterdir():
            stale.unlink(missing_ok=True) if stale.is_file() else shutil.rmtree(stale, ignore_errors=True)

    def result_folder(self, run_key: str) -> Path:
        return self.results / run_key

    def complete(self, folder: Path, stem: str, run_key: str | None = None) -> OutputSet | None:
        found = read_output_set(folder, stem)
        if not found.complete or (run_key is not None and found.run_key != run_key):
            return None
        return found

    def discard(self, run_key: str) -> None:
        """Remove what a computation that did not finish left (the writer already removed its temporaries)."""
        shutil.rmtree(self.result_folder(run_key), ignore_errors=True)

    def clean_incomplete(self, keep: set[str]) -> list[str]:
        """At start-up: remove result folders whose set is not complete (a killed run); their keys."""
        removed = []
        for folder in sorted(self.results.iterdir()):
            if not folder.is_dir() or folder.name in keep:
                continue
            records = [p for p in folder.glob("*.json") if not p.name.startswith(".")]
            if not any(read_output_set(folder, p.name[:-5]).complete for p in records):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed

    def load_index(self) -> list[dict[str, Any]]:
        try:
            document = json.loads((self.root / INDEX_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        jobs = document.get("jobs") if isinstance(document, dict) else None
        return [j for j in jobs if isinstance(j, dict)] if isinstance(jobs, list) else []

    def save_index(self, jobs: list[dict[str, Any]]) -> None:
        with atomic_write(self.root / INDEX_NAME) as handle:
            json.dump({"version": INDEX_VERSION, "jobs": jobs}, handle)
