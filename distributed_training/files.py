"""Atomic file writes shared by checkpoints, score books, token caches and peer files.

A process killed mid-write (pm2 restart, OOM, SIGKILL) must never leave a half-written file
where the last good one was: write a temporary file in the same directory, fsync it, and rename
it over the old one, which POSIX makes atomic.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional

_TEMP_NAME = re.compile(r"^\..+\.[^.]+\.tmp$")  # what `atomic_write` names its temporary files


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(handle)` on a temporary file beside `path`, then rename it over `path`.

    Readers see either the old or the new content, never a mix; on any error the old file stays.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as handle:  # opened by name, so `handle.name` is the temporary file's path
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda handle: handle.write(data))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (corpus and model files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def os_error_in(exc: BaseException) -> Optional[OSError]:
    """The OSError behind `exc`, if any: torch wraps a full disk in a RuntimeError of its own."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def write_failure(path: Path, exc: BaseException) -> str:
    """One line saying why `path` could not be written and how much room its file system has."""
    error = os_error_in(exc)
    reason = (error.strerror or str(error)) if error is not None else f"{type(exc).__name__}: {exc}"
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free / 1e6:.1f} MB free there"
    except OSError:
        free = "its directory is not readable"
    return f"cannot write {path}: {reason} ({free})"


def remove_stale_temps(directory: Path) -> list[Path]:
    """Remove the temporary files an interrupted `atomic_write` left in `directory`; the removed paths."""
    removed = []
    try:
        candidates = [p for p in Path(directory).iterdir() if p.is_file() and _TEMP_NAME.match(p.name)]
    except OSError:
        return removed
    for candidate in candidates:
        try:
            candidate.unlink()
            removed.append(candidate)
        except OSError:
            pass
    return removed
