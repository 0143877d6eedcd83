"""Spool: UID-only file names, atomic fsynced writes, moves from .incoming, watermark, sweeping."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from screener.node import spool
from screener.node.spool import (
    INCOMING,
    InvalidUID,
    SpoolFull,
    check_watermark,
    free_bytes,
    move_into_spool,
    spool_path,
    sweep_incoming,
    validate_uid,
    write_atomically,
)

STUDY, SERIES, SOP = "1.2.840.113619.2.1", "1.2.840.113619.2.1.3", "1.2.840.113619.2.1.3.4"


def test_spool_path_is_built_from_uids_inside_root(tmp_path: Path) -> None:
    path = spool_path(tmp_path, STUDY, SERIES, SOP)
    assert path == tmp_path / STUDY / SERIES / f"{SOP}.dcm"
    assert path.resolve().is_relative_to(tmp_path.resolve())


@pytest.mark.parametrize("uid", ["0", "1.2.3", "2.25.329800735698586629295641978511506172918", "1." + "2" * 62])
def test_valid_uids_pass(uid: str) -> None:
    assert validate_uid("SOPInstanceUID", uid) == uid


@pytest.mark.parametrize(
    "bad",
    ["../../x", "1.2/3", "", "1.2\x00.3", "1." + "2" * 63, "1.2.\n", "1.2.3\n", "1..2", ".1.2", "1.2.",
     "1.02.3", "01.2", "1.2.3a", "/etc/passwd", "1.2\\3", " 1.2", None, b"1.2.3"],
)
def test_invalid_sop_uid_is_refused_naming_the_attribute(tmp_path: Path, bad: object) -> None:
    with pytest.raises(InvalidUID) as info:
        spool_path(tmp_path, STUDY, SERIES, bad)  # type: ignore[arg-type]
    assert info.value.attribute == "SOPInstanceUID"
    assert "SOPInstanceUID" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_invalid_study_and_series_uids_name_their_attribute(tmp_path: Path) -> None:
    with pytest.raises(InvalidUID, match="StudyInstanceUID"):
        spool_path(tmp_path, "../..", SERIES, SOP)
    with pytest.raises(InvalidUID, match="SeriesInstanceUID"):
        spool_path(tmp_path, STUDY, "1.2/3", SOP)


def test_write_atomically_writes_and_returns_size(tmp_path: Path) -> None:
    path = spool_path(tmp_path, STUDY, SERIES, SOP)
    size = write_atomically(path, lambda fh: fh.write(b"abc" * 1000))
    assert size == 3000
    assert path.read_bytes() == b"abc" * 1000
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left


def test_write_atomically_fsyncs_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = spool.os.fsync
    monkeypatch.setattr(spool.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    write_atomically(tmp_path / "a.dcm", lambda fh: fh.write(b"x"))
    assert len(synced) >= 2  # the file, then the directory that holds the new name


def test_write_atomically_failure_leaves_no_temp_and_no_final_file(tmp_path: Path) -> None:
    path = tmp_path / "1.2.3.dcm"

    def write_half_then_fail(fh) -> None:
        fh.write(b"x" * 4096)
        raise ConnectionResetError("association aborted mid-dataset")

    with pytest.raises(ConnectionResetError):
        write_atomically(path, write_half_then_fail)
    assert list(tmp_path.iterdir()) == []


def test_write_atomically_failure_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "1.2.3.dcm"
    write_atomically(path, lambda fh: fh.write(b"old"))

    def fail(fh) -> None:
        fh.write(b"new, partial")
        raise OSError("disk error")

    with pytest.raises(OSError, match="disk error"):
        write_atomically(path, fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_watermark(tmp_path: Path) -> None:
    free = free_bytes(tmp_path)
    assert free > 0
    check_watermark(tmp_path, 0)
    with pytest.raises(SpoolFull) as info:
        check_watermark(tmp_path, free + 10**15)
    assert info.value.min_free_bytes == free + 10**15


def _incoming_file(root: Path, content: bytes, name: str = "tmpabc.dcm") -> Path:
    incoming = root / INCOMING
    incoming.mkdir(parents=True, exist_ok=True)
    path = incoming / name
    path.write_bytes(content)
    return path


def test_move_into_spool_renames_and_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _incoming_file(tmp_path, b"DICM" * 1000)
    inode = source.stat().st_ino
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(spool.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = spool_path(tmp_path, STUDY, SERIES, SOP)
    assert move_into_spool(source, path) == 4000
    assert not source.exists() and path.read_bytes() == b"DICM" * 1000
    assert path.stat().st_ino == inode  # renamed, not copied
    assert len(synced) >= 2  # the file, then the folder holding its new name


def test_move_into_spool_replaces_an_earlier_copy(tmp_path: Path) -> None:
    path = spool_path(tmp_path, STUDY, SERIES, SOP)
    move_into_spool(_incoming_file(tmp_path, b"first"), path)
    move_into_spool(_incoming_file(tmp_path, b"second"), path)
    assert path.read_bytes() == b"second"
    assert list((tmp_path / INCOMING).iterdir()) == []


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm, a tmpfs, as a second file system")
def test_move_into_spool_across_file_systems_copies_atomically(tmp_path: Path) -> None:
    other = Path(os.path.realpath("/dev/shm")) / f"screener-test-{os.getpid()}"
    other.mkdir()
    try:
        if os.stat(other).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the same file system as the test folder here")
        source = _incoming_file(other, b"x" * 3_000_000)
        path = spool_path(tmp_path, STUDY, SERIES, SOP)
        assert move_into_spool(source, path) == 3_000_000  # os.replace fails with EXDEV: copied
        assert path.read_bytes() == b"x" * 3_000_000 and not source.exists()
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    finally:
        shutil.rmtree(other)


def test_sweep_incoming_removes_only_stale_files(tmp_path: Path) -> None:
    stale = _incoming_file(tmp_path, b"partial", "tmpold.dcm")
    fresh = _incoming_file(tmp_path, b"arriving", "tmpnew.dcm")
    day_ago = time.time() - 86_400
    os.utime(stale, (day_ago, day_ago))
    assert sweep_incoming(tmp_path, older_than_s=3600) == 1
    assert not stale.exists() and fresh.exists()
    assert sweep_incoming(tmp_path / "nothing-here", older_than_s=0) == 0
