"""Atomic file writes shared by checkpoints, score books, token caches and peer files.

A process killed mid-write (pm2 restart, OOM, SIGKILL) must never leave a half-written file
where the last good one was: write a temporary file in the same directory, fsync it, and rename
it over the old one, which POSIX makes atomic.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


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
