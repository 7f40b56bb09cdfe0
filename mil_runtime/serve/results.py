"""`--results DIR`: the finished output sets of an earlier `mil-infer --out DIR` (a cohort folder or a
plain one) served as done jobs, without running anything. Every complete set under DIR (the one
reader, mil_runtime.outputs.record.read_output_set) becomes a job whose id is stable across restarts
(a hash of its place in DIR); incomplete sets are skipped."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from mil_runtime.outputs.record import read_output_set

log = logging.getLogger("mil_runtime.serve")
NOT_RECORDS = (".failed.json", ".dsa.json", ".tiles.geojson")


def find_sets(results_dir: Path) -> list[tuple[Path, str]]:
    found = []
    for record in sorted(results_dir.rglob("*.json")):
        name = record.name
        if name.startswith(".") or name == "cohort.json" or name.endswith(NOT_RECORDS):
            continue
        found.append((record.parent, name[:-5]))
    return found


def add_results(service, results_dir: Path) -> int:
    results_dir = results_dir.resolve()
    count = 0
    for folder, stem in find_sets(results_dir):
        found = read_output_set(folder, stem)
        if not found.complete:
            continue
        record = found.record or {}
        input_path = Path((record.get("input") or {}).get("path") or stem)
        sha = (record.get("model") or {}).get("sha256")
        model_id = next((e.id for e in service.models.values() if e.sha256 == sha),
                        (record.get("model") or {}).get("name") or "unknown")
        rel_set = (folder / stem).relative_to(results_dir).as_posix()
        job_id = "r" + hashlib.sha256(rel_set.encode()).hexdigest()[:15]
        slide_rel = input_path.name
        if service.slides_root is not None:
            try:
                slide_rel = input_path.resolve().relative_to(service.slides_root).as_posix()
            except (ValueError, OSError):
                pass
        service.jobs.add_finished(job_id, folder, stem, found.run_key or job_id, slide_rel,
                                  input_path if input_path.exists() else None, model_id)
        count += 1
    log.info("serving %d finished result(s) from %s", count, results_dir)
    return count
