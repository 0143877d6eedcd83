"""Durable spool storage: safe file names, atomic fsynced writes, free-space watermark.

The C-STORE response may only say Success once the file is on disk (ARCHITECTURE.md, "ack only
what is on disk"), so every file arrives as temp file -> fsync -> rename -> fsync directory. Names
are built from validated UIDs only, so a hostile SOP Instance UID cannot escape the spool root.

Received datasets are streamed by pynetdicom into ``<spool>/.incoming`` as they arrive (see
screener.node.receive); :func:`move_into_spool` then makes such a file durable under its UID
name. :func:`sweep_incoming` removes what an aborted association left behind.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from pathlib import Path

from screener.durable import fsync_directory, make_directories, write_atomically

# PS3.5 9.1: digits and dots, no empty component, no leading zero unless the component is "0".
_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_UID_MAX_LENGTH = 64
_COPY_CHUNK = 1 << 20
# Where pynetdicom writes datasets while they arrive: inside the spool, so the finished file is
# renamed into place (same file system) instead of copied. The dot keeps it out of UID names.
INCOMING = ".incoming"


class InvalidUID(ValueError):
    """A UID that is not a valid DICOM UID, so it may not become part of a file name."""

    def __init__(self, attribute: str, value: object) -> None:
        self.attribute = attribute
        self.value = value
        super().__init__(f"{attribute} is not a valid DICOM UID: {value!r}")


class SpoolFull(OSError):
    """Free space on the spool volume is below the configured watermark."""

    def __init__(self, root: Path, free_bytes: int, min_free_bytes: int) -> None:
        self.root = root
        self.free_bytes = free_bytes
        self.min_free_bytes = min_free_bytes
        super().__init__(f"spool {root} has {free_bytes} bytes free, below the watermark of {min_free_bytes}")


def validate_uid(attribute: str, value: object) -> str:
    """Return ``value`` if it is a valid UID, else raise InvalidUID naming ``attribute``."""
    # fullmatch, not match with "$": "$" also matches before a trailing newline.
    if not isinstance(value, str) or len(value) > _UID_MAX_LENGTH or not _UID_PATTERN.fullmatch(value):
        raise InvalidUID(attribute, value)
    return value


def spool_path(root: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """``root/<study>/<series>/<sop>.dcm``, from validated UIDs only."""
    parts = (
        validate_uid("StudyInstanceUID", study_uid),
        validate_uid("SeriesInstanceUID", series_uid),
        validate_uid("SOPInstanceUID", sop_uid) + ".dcm",
    )
    path = Path(root).joinpath(*parts)
    # Belt and braces: validation already excludes separators and "..", but a future change to
    # the name scheme must not be able to silently write outside the spool.
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise InvalidUID("SOPInstanceUID", sop_uid)
    return path


def free_bytes(root: Path) -> int:
    """Bytes available on the volume holding ``root``."""
    return shutil.disk_usage(root).free


def check_watermark(root: Path, min_free_bytes: int) -> None:
    """Raise SpoolFull when less than ``min_free_bytes`` are free (the SCP then answers 0xA700)."""
    free = free_bytes(root)
    if free < min_free_bytes:
        raise SpoolFull(Path(root), free, min_free_bytes)


def move_into_spool(source: Path, path: Path) -> int:
    """Make the complete file ``source`` durable as ``path``; returns its size in bytes.

    fsync the file, rename it over ``path``, fsync the folder. ``source`` on another file system
    (a rename cannot cross one) is copied through :func:`write_atomically` instead and removed.
    Either way ``path`` appears complete or not at all, and a file already there is replaced.
    """
    source, path = Path(source), Path(path)
    fd = os.open(source, os.O_RDONLY)
    try:
        os.fsync(fd)  # flushes the file's data whichever descriptor wrote it
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    make_directories(path.parent)
    try:
        os.replace(source, path)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        with open(source, "rb") as fh:
            size = write_atomically(path, lambda out: shutil.copyfileobj(fh, out, _COPY_CHUNK))
        source.unlink(missing_ok=True)
        return size
    fsync_directory(path.parent)
    return size


def sweep_incoming(root: Path, older_than_s: float) -> int:
    """Delete files in ``root/.incoming`` not modified for ``older_than_s`` seconds; returns how many.

    An association that aborts mid-dataset leaves its partial file there (pynetdicom removes
    only the files whose C-STORE completed). Nothing in it was acknowledged, so deleting is safe
    once no transfer can still be writing it.
    """
    incoming = Path(root) / INCOMING
    cutoff = time.time() - older_than_s
    removed = 0
    for entry in incoming.glob("*") if incoming.is_dir() else ():
        try:
            if entry.is_file() and entry.stat().st_mtime < cutoff:
                entry.unlink()
                removed += 1
        except FileNotFoundError:  # finished and moved (or swept) meanwhile
            continue
    return removed
