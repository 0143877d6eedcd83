"""Files that appear complete and survive a power cut, or do not appear at all.

One helper for everything the node writes and then points a database row at: the spool (a
C-STORE is acknowledged only once its file is here) and the outbox (a delivery row is
committed only once its object is here). Temp file in the same folder -> write -> flush ->
fsync -> rename -> fsync the folder: without the two fsyncs a crash can leave a committed row
pointing at an empty or missing file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["fsync_directory", "make_directories", "write_atomically"]


def fsync_directory(directory: Path) -> None:
    # A rename or a new entry is only durable once the directory itself is synced.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_directories(directory: Path) -> None:
    """Create missing directories and fsync each parent so the new entries survive a crash."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)  # exist_ok: another thread may create the same study folder
        fsync_directory(created.parent)


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> int:
    """Write ``path`` via ``write(fh)`` so it either appears complete and synced, or not at all.

    Returns the file size in bytes. If ``write`` (or anything else) raises, the temp file is
    removed and whatever was at ``path`` before is untouched.
    """
    path = Path(path)
    make_directories(path.parent)
    # Same directory as the target: os.replace is only atomic within one file system.
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
            size = os.fstat(fh.fileno()).st_size
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return size
