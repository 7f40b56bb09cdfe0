"""Which inputs a cohort run holds, where each one's output set goes, and which share a process takes.

`plan_items` maps inputs to `CohortItem`s (input, the folder its set goes to, its stem). With `mirror`
(the default when the inputs come from more than one folder) OUT mirrors the inputs' folders under
their common root, so slides with the same stem in different folders never collide and no folder of
OUT holds more files than its input folder. `shard` takes a deterministic share (inputs ranked by a hash
of their absolute path and dealt round-robin, so every process of a SLURM array agrees without talking
to the others and the shares differ by at most one input);
`shard_from_env` reads `--shard K/N` or SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mil_runtime.errors import InvalidInputError


@dataclass(frozen=True)
class CohortItem:
    """One input of the cohort: the input, the folder its output set goes to, and the set's stem."""

    input: Path  # slide file, DICOM series folder or .h5 feature file
    out_dir: Path  # where its set goes (mirrored sub-folder of OUT, or OUT)
    stem: str


def input_stem(path: Path) -> str:
    """The stem of an input's output set (mil-infer's rule: the file or folder name without its suffix)."""
    return Path(path).stem


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def plan_items(inputs: Sequence[Path], out: Path, *, mirror: bool | None = None) -> list[CohortItem]:
    """One item per distinct input (an input given twice counts once), in the order given.

    mirror None = auto: mirrored when the inputs lie in more than one folder. Mirrored, an input
    `root/a/b/s.svs` (root: the inputs' common folder) writes to `OUT/a/b/`; otherwise to OUT.
    """
    out = Path(out)
    unique: dict[Path, Path] = {}
    for path in inputs:
        unique.setdefault(_absolute(Path(path)), Path(path))
    parents = {absolute.parent for absolute in unique}
    if mirror is None:
        mirror = len(parents) > 1
    root = Path(os.path.commonpath([str(p) for p in parents])) if (mirror and parents) else None
    items = []
    for absolute, given in unique.items():
        out_dir = out / absolute.parent.relative_to(root) if root is not None else out
        items.append(CohortItem(input=given, out_dir=Path(os.path.normpath(out_dir)), stem=input_stem(given)))
    refuse_reserved_names(items, out)
    return items


def refuse_reserved_names(items: Sequence[CohortItem], out: Path) -> None:
    """InvalidInputError when an input's set would be named like OUT/cohort.json, the cohort's own record.

    (Two inputs with one stem in one folder are not refused here: the second fails on its own, exit 7,
    because the set there records another input; see test_cohort_plan.)
    """
    from mil_runtime.cohort.records import MANIFEST_NAME, MANIFEST_STEM

    for item in items:
        if item.stem == MANIFEST_STEM and os.path.normpath(item.out_dir) == os.path.normpath(out):
            raise InvalidInputError(f"{item.input}: its outputs would be {Path(out) / MANIFEST_STEM}.*, and "
                                    f"{MANIFEST_NAME} there is the cohort's own record; rename the input")


def path_hash(item: CohortItem) -> str:
    """sha256 of the item's absolute input path (what shards are dealt by)."""
    return hashlib.sha256(str(_absolute(item.input)).encode("utf-8")).hexdigest()


def shard(items: Sequence[CohortItem], k: int, n: int) -> list[CohortItem]:
    """Share k (0-based, 0 <= k < n) of n; order kept.

    The items are ranked by the hash of their input path and dealt round-robin, so the shares differ in
    size by at most one, and every process given the same inputs (in any order) takes the same share.
    """
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"shard {k}/{n}: K must be 0..N-1 and N >= 1")
    ranked = sorted(range(len(items)), key=lambda index: (path_hash(items[index]), index))
    mine = {index for rank, index in enumerate(ranked) if rank % n == k}
    return [item for index, item in enumerate(items) if index in mine]


def parse_shard(value: str) -> tuple[int, int]:
    """"K/N" (0-based K) as (k, n); ValueError with what is wrong."""
    try:
        k_text, n_text = str(value).split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise ValueError(f"--shard {value!r}: expected K/N, e.g. 0/4 (K counts from 0)") from None
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"--shard {value!r}: K must be 0..N-1 (K counts from 0) and N >= 1")
    return k, n


def shard_from_env(value: str | None, environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(k, n) from `--shard K/N`, else from a SLURM array (SLURM_ARRAY_TASK_ID minus SLURM_ARRAY_TASK_MIN,
    of SLURM_ARRAY_TASK_COUNT), else None (the whole cohort)."""
    if value is not None:
        return parse_shard(value)
    environ = os.environ if environ is None else environ
    task, count = environ.get("SLURM_ARRAY_TASK_ID"), environ.get("SLURM_ARRAY_TASK_COUNT")
    if task is None or count is None:
        return None
    try:
        k = int(task) - int(environ.get("SLURM_ARRAY_TASK_MIN", "0") or 0)
        n = int(count)
    except ValueError:
        raise ValueError(f"SLURM_ARRAY_TASK_ID={task!r} / SLURM_ARRAY_TASK_COUNT={count!r} are not whole numbers") from None
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"SLURM array task {task} (min {environ.get('SLURM_ARRAY_TASK_MIN', '0')}) of {count}: "
                         "not a share 0..N-1; use --shard K/N")
    return k, n


__all__ = ["CohortItem", "input_stem", "parse_shard", "path_hash", "plan_items", "refuse_reserved_names", "shard",
           "shard_from_env"]
