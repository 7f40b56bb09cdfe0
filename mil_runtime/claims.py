"""`<stem>.lock`: one writer per output stem (DESIGN section 7).

A writer claims a stem by creating `<stem>.lock` with O_CREAT|O_EXCL; the file holds host, pid,
start time and a heartbeat time, which a thread refreshes every HEARTBEAT_S. A claim is stale when
its pid is gone on the same host, or its heartbeat is older than STALE_AFTER_S on any host (or the
file is unreadable and older than that). A stale claim is taken over; a live one makes the second
writer fail with OutputBusyError (exit 12): it does not wait.

Under its own claim (fresh, or taken over from a stale one) a writer removes the stem's temporary
files (`.<stem>....tmp`, mil_runtime.atomic's naming) that a killed earlier run left behind; temp
files of a live writer are never touched. `clean_stale_temps(folder)` does the same for every stem
of a folder whose claim is free or stale (mil-infer runs it once per --out).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mil_runtime.errors import OutputBusyError, OutputError

HEARTBEAT_S = float(os.environ.get("MILKIT_LOCK_HEARTBEAT_S", "30"))
STALE_AFTER_S = float(os.environ.get("MILKIT_LOCK_STALE_S", "300"))
LOCK_SUFFIX = ".lock"

_held: dict[Path, int] = {}  # lock path -> nesting depth, claims this process holds
_held_lock = threading.Lock()


def lock_path(folder: str | os.PathLike, stem: str) -> Path:
    return Path(folder) / f"{stem}{LOCK_SUFFIX}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_claim(path: Path) -> dict[str, Any] | None:
    """The claim's fields, or None when the file is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_stale(path: Path, claim: dict[str, Any] | None, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if claim is None or not isinstance(claim, dict):  # half-written or foreign: judged by the file's age
        try:
            return now - path.stat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:
            return True
    try:
        if claim.get("host") == socket.gethostname() and not _pid_alive(int(claim["pid"])):
            return True
        return now - float(claim["heartbeat"]) > STALE_AFTER_S
    except (KeyError, TypeError, ValueError):
        return True


def _claim_text(token: str, started: float) -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started,
                       "heartbeat": time.time(), "token": token})


def _create(path: Path, token: str, started: float) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        raise OutputError(f"cannot write to {path.parent}: {exc.strerror or exc}; choose another --out") from None
    try:
        os.write(fd, _claim_text(token, started).encode("utf-8"))
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise OutputError(f"cannot write to {path.parent}: {exc.strerror or exc}; "
                          "free some space or choose another --out") from None
    os.close(fd)
    return True


def _take_over(path: Path, seen: dict[str, Any] | None) -> None:
    """Move a stale claim aside; put it back if what was moved is not the claim judged stale (a race)."""
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if read_claim(aside) != seen and seen is not None:
        try:
            os.link(aside, path)  # never clobbers a claim made meanwhile
        except OSError:
            pass
    aside.unlink(missing_ok=True)


def _busy(path: Path, claim: dict[str, Any] | None, stem: str) -> OutputBusyError:
    who = (f"pid {claim.get('pid')} on {claim.get('host')} since "
           f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(claim.get('started', 0))))}"
           if isinstance(claim, dict) else "another process")
    return OutputBusyError(
        f"outputs {stem}.* in {path.parent} are being written by {who} ({path.name}); wait for it to finish, "
        f"or use another --out (a claim whose process is gone or silent for {STALE_AFTER_S:g} s is taken over)"
    )


# The files written under a stem's claim: its set (mil_runtime.outputs.writer.SUFFIXES, plus per-class
# heatmaps) and the cohort's failure record, longest first so that `x.dsa.json` is stem x's, not
# `x.dsa`'s (whose free claim would otherwise let a clean-up remove a live writer's temporary).
SET_SUFFIXES = tuple(sorted((".json", ".heatmap.png", ".tissue.png", ".tiles.geojson", ".tiles.csv", ".features.h5",
                             ".annotations.dcm", ".attention.dcm", ".dsa.json", ".failed.json"), key=len, reverse=True))
_TEMP = re.compile(r"^\.(?P<final>.+)\.[A-Za-z0-9_]+\.tmp$")
_CLASS_HEATMAP = re.compile(r"^(?P<stem>.+)\.heatmap\.[^.]+(?:\.[^.]+)*\.png$")


def temp_stem(name: str) -> str | None:
    """The stem whose output a temporary file named `name` was going to be, or None when not ours."""
    match = _TEMP.match(name)
    if not match:
        return None
    final = match.group("final")
    if final.endswith(LOCK_SUFFIX) and len(final) > len(LOCK_SUFFIX):  # a heartbeat or take-over leftover
        return final[: -len(LOCK_SUFFIX)]
    for suffix in SET_SUFFIXES:
        if final.endswith(suffix) and len(final) > len(suffix):
            return final[: -len(suffix)]
    class_map = _CLASS_HEATMAP.match(final)
    return class_map.group("stem") if class_map else None


def remove_stem_temps(folder: str | os.PathLike, stem: str) -> list[Path]:
    """Remove the stem's temporary files (call only under an own claim). Returns those removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if temp_stem(name) == stem:
            try:
                (Path(folder) / name).unlink()
                removed.append(Path(folder) / name)
            except OSError:
                pass
    return removed


def _acquire(path: Path, stem: str, token: str, started: float) -> None:
    for _ in range(5):
        if _create(path, token, started):
            return
        claim = read_claim(path)
        if not is_stale(path, claim):
            if claim is None:  # being written right now (created, not yet filled): look again
                time.sleep(0.05)
                claim = read_claim(path)
                if claim is None or not is_stale(path, claim):
                    raise _busy(path, claim, stem)
            else:
                raise _busy(path, claim, stem)
        _take_over(path, claim)
    raise _busy(path, read_claim(path), stem)


@contextmanager
def claim_stem(folder: str | os.PathLike, stem: str) -> Iterator[Path]:
    """Hold `<stem>.lock` in `folder` for the block; nested claims of the same stem in one process share it."""
    path = lock_path(folder, stem).absolute()
    with _held_lock:
        if path in _held:
            _held[path] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield path
        finally:
            with _held_lock:
                _held[path] -= 1
        return
    token, started = uuid.uuid4().hex, time.time()
    _acquire(path, stem, token, started)
    with _held_lock:
        _held[path] = 1
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            temp = path.with_name(f".{path.name}.{token[:8]}.tmp")
            try:
                temp.write_text(_claim_text(token, started), encoding="utf-8")
                if (read_claim(path) or {}).get("token") == token:
                    os.replace(temp, path)
                else:
                    temp.unlink(missing_ok=True)
            except OSError:
                temp.unlink(missing_ok=True)

    thread = threading.Thread(target=beat, name=f"milkit-claim-{stem}", daemon=True)
    thread.start()
    try:
        remove_stem_temps(folder, stem)  # a killed earlier writer's leftovers (its claim was stale or gone)
        yield path
    finally:
        stop.set()
        thread.join()  # a heartbeat in flight must not re-create the lock after it is removed
        with _held_lock:
            _held.pop(path, None)
        if (read_claim(path) or {}).get("token") == token:
            path.unlink(missing_ok=True)


def clean_stale_temps(folder: str | os.PathLike) -> None:
    """Remove temporaries in `folder` of every stem whose claim is free or stale (never a live writer's)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    stems = {stem for stem in map(temp_stem, names) if stem is not None}
    for stem in sorted(stems):
        try:
            with claim_stem(folder, stem):
                pass  # the claim removed the temporaries
        except OutputError:
            continue


__all__ = ["claim_stem", "clean_stale_temps", "is_stale", "lock_path", "read_claim", "remove_stem_temps"]
