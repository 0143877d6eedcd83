"""Durable spool storage: safe file names, atomic fsynced writes, free-space watermark.

The C-STORE response may only say Success once the file is on disk (ARCHITECTURE.md, "ack only
what is on disk"), so every write goes temp file -> fsync -> rename -> fsync directory. Names are
built from validated UIDs only, so a hostile SOP Instance UID cannot escape the spool root.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info

# PS3.5 9.1: digits and dots, no empty component, no leading zero unless the component is "0".
_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_UID_MAX_LENGTH = 64
_COPY_CHUNK = 1 << 20


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


def _fsync_directory(directory: Path) -> None:
    # A rename or a new entry is only durable once the directory itself is synced.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_directories(directory: Path) -> None:
    """Create missing directories and fsync each parent so the new entries survive a crash."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)  # exist_ok: another thread may create the same study folder
        _fsync_directory(created.parent)


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> int:
    """Write ``path`` via ``write(fh)`` so it either appears complete and synced, or not at all.

    Returns the file size in bytes. If ``write`` (or anything else) raises, the temp file is
    removed and whatever was at ``path`` before is untouched.
    """
    path = Path(path)
    _make_directories(path.parent)
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
    _fsync_directory(path.parent)
    return size


def write_dataset_stream(fh: BinaryIO, file_meta: Dataset, raw: bytes | BinaryIO) -> None:
    """Write a Part 10 file: preamble, "DICM", file meta group, then ``raw`` dataset bytes as is.

    ``raw`` is the dataset exactly as received in the transfer syntax named by ``file_meta``;
    it is copied, not decoded and re-encoded, so receiving stays cheap and lossless.
    """
    # A deep copy (file meta is tiny): enforce_standard adds and sets elements in place.
    meta = FileMetaDataset(copy.deepcopy(file_meta))
    fh.write(b"\x00" * 128 + b"DICM")
    # enforce_standard adds (0002,0000) group length, version and implementation UID, and
    # raises if the Media Storage SOP Class/Instance or Transfer Syntax UID is missing.
    write_file_meta_info(DicomFileLike(fh), meta, enforce_standard=True)
    if isinstance(raw, (bytes, bytearray, memoryview)):
        fh.write(raw)
    else:
        shutil.copyfileobj(raw, fh, _COPY_CHUNK)
