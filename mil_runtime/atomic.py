"""Atomic output writing: every file milkit writes appears complete or not at all.

A writer gets a temporary file in the destination's own folder (same filesystem, so the final
`os.replace` is atomic) and the temporary is renamed only when the writer finished without an
exception; otherwise it is removed. Use:

    with atomic_write("out/slide.json") as f:          # text or binary file object
        json.dump(result, f)

    with atomic_path("out/slide.h5") as tmp:           # for libraries that want a path (h5py, Pillow)
        h5py.File(tmp, "w").close()

    with atomic_output_dir("out") as staged:           # several files, all or none
        write_json(staged.path("slide.json"))
        write_png(staged.path("slide_heatmap.png"))

Temporary names are ".<final name>.<random>.tmp", so a crash (kill -9) leaves only hidden files, which
the next run of that output stem removes under its claim (mil_runtime.claims).

`StagedOutputs.commit(last=...)` renames the record of an output set last (DESIGN section 7: a set is
complete only when its record exists and every file matches the record's sha256). Fault injection for
tests: MILKIT_FAULT_KILL_AFTER_RENAME=k SIGKILLs the process after the k-th rename of a commit (0: all
files staged, none renamed); MILKIT_FAULT_RENAME_DELAY_S=s sleeps before each rename.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from mil_runtime.errors import OutputError

# mkstemp creates files owner-only (0600); outputs get the permissions a plain open() would give.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` (with parents) if needed and check a file can be created in it.

    Raises OutputError("cannot write to PATH: REASON; choose another --out").
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        # os.access is not enough (root ignores modes, network filesystems lie): really create a file.
        fd, probe = tempfile.mkstemp(prefix=".milkit-probe-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(f"cannot write to {path}: {reason}; choose another --out") from None
    return path


def _temp_path(path: Path) -> Path:
    """A new, empty temporary file next to `path`."""
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(f"cannot write to {path.parent}: {reason}; choose another --out") from None
    os.close(fd)
    os.chmod(temp, _FILE_MODE)
    return Path(temp)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def fault_point(renamed: int) -> None:
    """Test hook of a commit: called before the first rename (0) and after each (k); see the module doc."""
    kill_at = os.environ.get("MILKIT_FAULT_KILL_AFTER_RENAME")
    if kill_at is not None and kill_at.strip() == str(renamed):
        os.kill(os.getpid(), signal.SIGKILL)


def _rename_delay() -> None:
    delay = os.environ.get("MILKIT_FAULT_RENAME_DELAY_S")
    if delay:
        time.sleep(float(delay))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(temp: Path, path: Path) -> None:
    try:
        os.replace(temp, path)
    except OSError as exc:
        _remove_quietly(temp)
        reason = exc.strerror or type(exc).__name__
        raise OutputError(f"cannot write {path}: {reason}; choose another --out") from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it to `path` on success, remove it on failure."""
    path = Path(path)
    temp = _temp_path(path)
    try:
        yield temp
    except BaseException:
        _remove_quietly(temp)
        raise
    _commit(temp, path)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to `path` for writing ("w" text or "wb" binary); atomic on success."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as temp:
        with open(temp, mode, encoding=encoding if mode == "w" else None) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


class StagedOutputs:
    """Temporary files for one output folder, renamed together by `commit` or removed by `discard`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._staged: dict[Path, Path] = {}  # final path -> temporary path

    def path(self, name: str) -> Path:
        """A temporary path that becomes `folder / name` on commit."""
        final = self.folder / name
        if final not in self._staged:
            self._staged[final] = _temp_path(final)
        return self._staged[final]

    def commit(self, last: str | None = None) -> None:
        """Rename every staged file into place; `last` (a name given to `path`, the set's record) goes last.

        Each temporary is fsynced first, so after a power cut a renamed file is a whole file. A kill
        between two renames leaves a set without its (new) record, which readers see as incomplete.
        """
        order = sorted(self._staged, key=lambda final: final.name == last)
        try:
            for temp in self._staged.values():
                _fsync_file(temp)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise OutputError(f"cannot write to {self.folder}: {reason}; choose another --out") from None
        fault_point(0)
        for count, final in enumerate(order, start=1):
            _rename_delay()
            _commit(self._staged.pop(final), final)
            fault_point(count)
        _fsync_dir(self.folder)

    def discard(self) -> None:
        for temp in self._staged.values():
            _remove_quietly(temp)
        self._staged.clear()


@contextmanager
def atomic_output_dir(folder: str | os.PathLike, last: str | None = None) -> Iterator[StagedOutputs]:
    """Stage several output files in `folder` (created if needed); all appear on success, none on failure.

    `last`: the name renamed after all others (an output set's record).
    """
    staged = StagedOutputs(ensure_writable_dir(folder))
    try:
        yield staged
    except BaseException:
        staged.discard()
        raise
    try:
        staged.commit(last=last)
    except BaseException:
        staged.discard()
        raise
