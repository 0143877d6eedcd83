"""Spool: UID-only file names, atomic fsynced writes, watermark, streamed Part 10 files."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian

from screener.node import spool
from screener.node.spool import (
    InvalidUID,
    SpoolFull,
    check_watermark,
    free_bytes,
    spool_path,
    validate_uid,
    write_atomically,
    write_dataset_stream,
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


def _dataset_and_meta() -> tuple[bytes, FileMetaDataset]:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    ds.SOPInstanceUID = SOP
    ds.StudyInstanceUID = STUDY
    ds.PatientID = "P1"
    raw = DicomBytesIO()  # what arrives over the wire, as is
    raw.is_little_endian, raw.is_implicit_VR = True, False
    write_dataset(raw, ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return raw.getvalue(), meta


@pytest.mark.parametrize("as_stream", [False, True])
def test_write_dataset_stream_reads_back_with_pydicom(tmp_path: Path, as_stream: bool) -> None:
    raw, meta = _dataset_and_meta()
    path = spool_path(tmp_path, STUDY, SERIES, SOP)
    source = io.BytesIO(raw) if as_stream else raw
    size = write_atomically(path, lambda fh: write_dataset_stream(fh, meta, source))

    data = path.read_bytes()
    assert size == len(data)
    assert data[:128] == b"\x00" * 128 and data[128:132] == b"DICM"
    assert data.endswith(raw)  # dataset bytes copied, not re-encoded
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == SOP
    group_length = ds.file_meta.FileMetaInformationGroupLength
    assert group_length == len(data) - 132 - 12 - len(raw)  # 12: the group length element itself
    assert ds.SOPInstanceUID == SOP and ds.PatientID == "P1"
    assert "FileMetaInformationGroupLength" not in meta  # the caller's meta is not modified


def test_write_dataset_stream_refuses_incomplete_file_meta(tmp_path: Path) -> None:
    raw, meta = _dataset_and_meta()
    del meta.TransferSyntaxUID
    path = tmp_path / "x.dcm"
    with pytest.raises(AttributeError, match="Transfer Syntax UID"):
        write_atomically(path, lambda fh: write_dataset_stream(fh, meta, raw))
    assert list(tmp_path.iterdir()) == []
