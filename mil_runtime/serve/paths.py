"""Slide paths confined to the slides ROOT.

A client names a slide by its path relative to ROOT (`GET /v1/slides`). `resolve_slide` refuses
anything that could name a file outside ROOT: NUL bytes, over-long names, absolute paths, drive
letters and backslashes, `..` components, and paths (symlinks included) that resolve outside ROOT.
Refusals are ApiError 400 (malformed) or 404 (no such slide under ROOT), never a file from outside.
"""

from __future__ import annotations

import os
from pathlib import Path

from mil_runtime.serve.errors import ApiError

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")
MAX_PATH_CHARS = 1024
MAX_PART_CHARS = 255


def check_relative(rel: str) -> list[str]:
    """The components of a client-given relative path; ApiError 400 for one that is malformed."""
    if not isinstance(rel, str) or not rel:
        raise ApiError(400, "a slide path is required")
    if "\x00" in rel:
        raise ApiError(400, "a slide path may not contain NUL bytes")
    if len(rel) > MAX_PATH_CHARS:
        raise ApiError(400, f"a slide path may be at most {MAX_PATH_CHARS} characters")
    if rel.startswith(("/", "\\")) or "\\" in rel or (len(rel) > 1 and rel[1] == ":"):
        raise ApiError(400, "a slide path is relative to the slides folder (no absolute paths or backslashes)")
    parts = rel.split("/")
    if any(p == ".." for p in parts):
        raise ApiError(400, "a slide path may not contain '..'")
    parts = [p for p in parts if p not in ("", ".")]
    if not parts:
        raise ApiError(400, "a slide path is required")
    if any(len(p.encode("utf-8", "surrogateescape")) > MAX_PART_CHARS for p in parts):
        raise ApiError(400, f"a slide path's names may be at most {MAX_PART_CHARS} bytes")
    return parts


def inside(root: Path, path: Path) -> bool:
    """Whether `path` (resolved, symlinks followed) lies inside the resolved `root`."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(root)
    except (OSError, ValueError):
        return False


def resolve_slide(root: Path | None, rel: str) -> Path:
    """The file under ROOT that `rel` names (symlinks that stay inside ROOT allowed); ApiError 400/404."""
    if root is None:
        raise ApiError(404, "this server has no slides folder (start it with --slides ROOT)")
    parts = check_relative(rel)
    candidate = root.joinpath(*parts)
    if not inside(root, candidate):
        raise ApiError(404, f"no slide {rel!r} under the slides folder")
    real = Path(os.path.realpath(candidate))
    if not (real.is_file() or (real.is_dir() and candidate.suffix == "" and any(real.glob("*.dcm")))):
        raise ApiError(404, f"no slide {rel!r} under the slides folder")
    if real.is_file() and candidate.suffix.lower() not in SLIDE_SUFFIXES:
        raise ApiError(404, f"{rel!r} is not a slide file ({', '.join(SLIDE_SUFFIXES)})")
    return candidate


def list_slides(root: Path | None) -> list[str]:
    """Relative paths (with '/') of the slides under ROOT, sorted: slide files, and each folder holding
    .dcm files as one slide (a DICOM WSI series, as mil-infer takes it); symlinks leaving ROOT are skipped."""
    if root is None:
        return []
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and inside(root, Path(folder) / d))
        if Path(folder) != root and any(n.lower().endswith(".dcm") and not n.startswith(".") for n in files):
            found.append(Path(folder).relative_to(root).as_posix())
        for name in files:
            path = Path(folder) / name
            if name.startswith(".") or path.suffix.lower() not in SLIDE_SUFFIXES or path.suffix.lower() == ".dcm":
                continue
            if inside(root, path):
                found.append(path.relative_to(root).as_posix())
    return sorted(found)
