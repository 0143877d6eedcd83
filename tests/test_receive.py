"""Receive: a real pynetdicom SCP on loopback, driven by DCMTK echoscu/storescu."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from screener.node.receive import ReceiveSettings
from screener.node.spool import INCOMING, spool_path, sweep_incoming
from screener.store.models import Event, Instance, Job
from tests.support.common import edit_dataset, rg1_file
from tests.support.dcmtk import run_tool

SALT = b"receive-test-salt"
MODEL = "demo-1.0"
CALLING = "PACS"


@pytest.fixture
def settings(tmp_path: Path) -> ReceiveSettings:
    return ReceiveSettings(spool_root=tmp_path / "spool", model_id=MODEL, patient_salt=SALT, port=0,
                           allowed_calling_aes=(CALLING,), min_free_bytes=0)


def storescu(port: int, path: Path, *flags: str, calling: str = CALLING, called: str = "CXRBMD"):
    # -v: storescu then prints each response status by name, e.g. "(Refused: OutOfResources)".
    return run_tool("storescu", "-v", "-aet", calling, "-aec", called, *flags, "127.0.0.1", port, path)


def rows(factory: sessionmaker[Session], model: type, **where: object) -> list:
    with factory() as s:
        return list(s.scalars(select(model).filter_by(**where).order_by(model.id)))


def rg1_copy(tmp_path: Path, **changes: object) -> Path:
    ds = edit_dataset(pydicom.dcmread(rg1_file()), **changes)
    if "SOPInstanceUID" in changes:
        ds.file_meta.MediaStorageSOPInstanceUID = changes["SOPInstanceUID"]
    out = tmp_path / "sent" / "copy.dcm"
    out.parent.mkdir(exist_ok=True)
    ds.save_as(out, enforce_file_format=False)
    return out


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(("field", "value"), [
    ("ae_title", ""), ("ae_title", "A" * 17), ("ae_title", "A\\B"), ("port", 70000), ("port", -1),
    ("bind_address", "localhost:104"), ("allowed_calling_aes", "PACS"), ("allowed_calling_aes", ("",)),
    ("allowed_peers", ("10.0.0.300",)), ("max_pdu", 100), ("max_dataset_bytes", 0),
    ("min_free_bytes", -1), ("model_id", " "), ("patient_salt", b""), ("patient_salt", "text"),
])
def test_settings_name_the_invalid_field(settings: ReceiveSettings, field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(settings, **{field: value})


def test_settings_are_frozen_and_normalised(settings: ReceiveSettings) -> None:
    s = dataclasses.replace(settings, ae_title=" CXRBMD ", allowed_calling_aes=["PACS "])  # type: ignore[arg-type]
    assert s.ae_title == "CXRBMD" and s.allowed_calling_aes == ("PACS",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 104  # type: ignore[misc]
    assert s.peer_allowed("10.1.1.1")
    assert dataclasses.replace(s, allowed_peers=("127.0.0.1",)).peer_allowed("::ffff:127.0.0.1")


# ---------------------------------------------------------------- echo and store


@pytest.mark.dcmtk
def test_echo(scp, settings: ReceiveSettings) -> None:
    port = scp(settings)
    result = run_tool("echoscu", "-aet", CALLING, "-aec", "CXRBMD", "127.0.0.1", port)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(("name", "flags"), [("RG1_UNCR.dcm", ()), ("RG1_J2KR.dcm", ("-xv", "-R"))])
@pytest.mark.dcmtk
def test_store_spools_streams_and_queues(scp, settings, factory, name: str, flags: tuple[str, ...]) -> None:
    port = scp(settings)
    source = rg1_file(name)
    result = storescu(port, source, *flags)
    assert result.returncode == 0, result.stdout
    assert "Received Store Response (Success)" in result.stdout, result.stdout

    sent = pydicom.dcmread(source)
    path = spool_path(settings.spool_root, sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID)
    stored = pydicom.dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert stored.PixelData == sent.PixelData  # byte for byte: streamed, not re-encoded

    [instance] = rows(factory, Instance)
    assert instance.sop_instance_uid == sent.SOPInstanceUID and instance.spool_path == str(path)
    assert instance.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID
    assert instance.calling_ae == CALLING and instance.size_bytes == path.stat().st_size
    [job] = rows(factory, Job)
    assert job.state == "queued" and job.model_id == MODEL
    [event] = rows(factory, Event, kind="received")
    assert event.peer_ae == CALLING and event.peer_address.startswith("127.0.0.1:")
    # Nothing but the file itself (no leftover temp files) in the spool.
    assert files_under(settings.spool_root) == {path}


@pytest.mark.dcmtk
def test_explicit_big_endian_is_stored_as_sent(scp, settings, factory, tmp_path: Path) -> None:
    """The retired big endian syntax, which old archives still send: stored as is, pixels intact."""
    big = tmp_path / "big-endian.dcm"
    converted = run_tool("dcmconv", "+tb", rg1_file(), big)
    assert converted.returncode == 0, converted.stdout
    port = scp(settings)
    result = storescu(port, big, "-xb")  # propose explicit big endian first
    assert "Received Store Response (Success)" in result.stdout, result.stdout
    [instance] = rows(factory, Instance)
    assert instance.transfer_syntax_uid == "1.2.840.10008.1.2.2"
    stored = pydicom.dcmread(instance.spool_path)
    assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2"
    assert (stored.pixel_array == pydicom.dcmread(rg1_file()).pixel_array).all()


@pytest.mark.dcmtk
def test_same_instance_twice_is_one_job_and_a_duplicate_event(scp, settings, factory) -> None:
    port = scp(settings)
    for _ in range(2):
        result = storescu(port, rg1_file())
        assert result.returncode == 0, result.stdout
    assert len(rows(factory, Job)) == 1
    assert len(rows(factory, Event, kind="duplicate")) == 1


@pytest.mark.dcmtk
def test_routing_loop_sr_is_acknowledged_and_dropped(scp, settings, factory) -> None:
    port = scp(settings)
    sr = Path(get_testdata_file("test-SR.dcm"))
    assert pydicom.dcmread(sr).SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    result = storescu(port, sr)
    assert result.returncode == 0, result.stdout
    assert "Received Store Response (Success)" in result.stdout, result.stdout
    assert rows(factory, Instance) == [] and rows(factory, Job) == []
    assert files_under(settings.spool_root) == set()
    [event] = rows(factory, Event, kind="dropped_own_output")
    assert event.peer_ae == CALLING and event.sop_instance_uid == pydicom.dcmread(sr).SOPInstanceUID


@pytest.mark.dcmtk
def test_our_result_image_and_pdf_are_dropped_but_other_secondary_captures_are_not(scp, settings, factory,
                                                                                     tmp_path) -> None:
    """A Secondary Capture is an input kind too: ours is told apart by its Manufacturer. The
    Encapsulated PDF is accepted (so a routing loop cannot stall) and dropped."""
    port = scp(settings)
    ours = pydicom.dcmread(get_testdata_file("SC_rgb.dcm"))
    ours.Manufacturer = "CXR-BMD Screener"
    ours.SOPInstanceUID = ours.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ours.save_as(tmp_path / "ours.dcm")
    pdf = pydicom.Dataset()
    pdf.file_meta = pydicom.dataset.FileMetaDataset()
    pdf.SOPClassUID = pdf.file_meta.MediaStorageSOPClassUID = pydicom.uid.EncapsulatedPDFStorage
    pdf.SOPInstanceUID = pdf.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    pdf.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    pdf.StudyInstanceUID, pdf.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    pdf.Manufacturer, pdf.Modality, pdf.MIMETypeOfEncapsulatedDocument = "CXR-BMD Screener", "DOC", "application/pdf"
    pdf.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    pdf.save_as(tmp_path / "ours.pdf.dcm", enforce_file_format=True)
    for path in (tmp_path / "ours.dcm", tmp_path / "ours.pdf.dcm", Path(get_testdata_file("SC_rgb.dcm"))):
        result = storescu(port, path)
        assert "Received Store Response (Success)" in result.stdout, result.stdout
    dropped = {e.sop_instance_uid for e in rows(factory, Event, kind="dropped_own_output")}
    assert dropped == {ours.SOPInstanceUID, pdf.SOPInstanceUID}
    [stored] = rows(factory, Instance)  # someone else's secondary capture: received as usual
    assert stored.sop_instance_uid == pydicom.dcmread(get_testdata_file("SC_rgb.dcm")).SOPInstanceUID


# ---------------------------------------------------------------- association checks


@pytest.mark.dcmtk
def test_unknown_calling_ae_is_rejected_and_audited(scp, settings, factory) -> None:
    port = scp(settings)
    result = storescu(port, rg1_file(), calling="STRANGER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout, result.stdout
    [event] = rows(factory, Event, kind="association_rejected")
    assert event.peer_ae == "STRANGER" and event.reason_code == "calling-ae-not-recognised"
    assert rows(factory, Instance) == []


@pytest.mark.dcmtk
def test_wrong_called_ae_is_rejected_and_audited(scp, settings, factory) -> None:
    port = scp(settings)
    result = storescu(port, rg1_file(), called="SOMEONEELSE")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout, result.stdout
    [event] = rows(factory, Event, kind="association_rejected")
    assert event.reason_code == "called-ae-not-recognised"


@pytest.mark.dcmtk
def test_peer_not_in_allow_list_is_rejected_and_audited(scp, settings, factory) -> None:
    port = scp(dataclasses.replace(settings, allowed_peers=("10.9.9.9",)))
    result = run_tool("echoscu", "-aet", CALLING, "-aec", "CXRBMD", "127.0.0.1", port)
    assert result.returncode != 0
    assert "No Reason" in result.stdout, result.stdout
    [event] = rows(factory, Event, kind="association_rejected")
    assert event.reason_code == "peer-not-allowed" and event.peer_address.startswith("127.0.0.1:")


# ---------------------------------------------------------------- refusals


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.dcmtk
def test_traversal_uid_is_refused_and_nothing_escapes(scp, settings, factory, tmp_path: Path) -> None:
    port = scp(settings)
    evil = rg1_copy(tmp_path, SOPInstanceUID="../../evil")
    before = files_under(tmp_path.parent)
    result = storescu(port, evil)
    assert result.returncode != 0
    assert "Received Store Response (Error: CannotUnderstand)" in result.stdout, result.stdout
    new = files_under(tmp_path.parent) - before
    assert not [p for p in new if "evil" in str(p)]
    assert not [p for p in new if p.is_relative_to(settings.spool_root)]
    assert rows(factory, Instance) == [] and rows(factory, Job) == []
    [event] = rows(factory, Event, kind="rejected")
    assert event.reason_code == "invalid-sop-instance-uid" and "not a valid UI" in event.message and "evil" not in event.message


@pytest.mark.dcmtk
def test_spool_under_watermark_is_out_of_resources(scp, settings, factory) -> None:
    port = scp(dataclasses.replace(settings, min_free_bytes=2**62))
    result = storescu(port, rg1_file())
    assert result.returncode != 0
    assert "Received Store Response (Refused: OutOfResources)" in result.stdout, result.stdout
    assert rows(factory, Instance) == [] and rows(factory, Job) == []
    assert files_under(settings.spool_root) == set()


def spooled(settings: ReceiveSettings) -> set[Path]:
    return {p for p in files_under(settings.spool_root) if INCOMING not in p.parts}


@pytest.mark.dcmtk
def test_dataset_over_size_limit_is_aborted_while_arriving(scp, settings, factory) -> None:
    port = scp(dataclasses.replace(settings, max_dataset_bytes=1024))
    result = storescu(port, rg1_file())
    assert result.returncode != 0
    assert "Peer aborted Association" in result.stdout, result.stdout
    assert rows(factory, Instance) == [] and spooled(settings) == set()
    [event] = rows(factory, Event, kind="rejected")
    assert event.reason_code == "too-large" and event.peer_ae == CALLING
    # What reached the disk stops within one PDU of the limit, not at the 7 MB dataset's end.
    partial = sum(p.stat().st_size for p in (settings.spool_root / INCOMING).iterdir())
    assert partial < 1024 + 2 * settings.max_pdu
    assert sweep_incoming(settings.spool_root, older_than_s=0) == 1  # the partial file, swept


@pytest.mark.dcmtk
def test_spool_filling_up_while_a_large_dataset_arrives_aborts(scp, settings, factory, tmp_path: Path) -> None:
    big = rg1_copy(tmp_path)
    ds = pydicom.dcmread(big)
    ds.PixelData, ds.Rows = ds.PixelData * 3, ds.Rows * 3  # 21 MB: past the 16 MB re-check
    ds.save_as(big)
    port = scp(dataclasses.replace(settings, min_free_bytes=2**62))
    result = storescu(port, big)
    assert "Peer aborted Association" in result.stdout, result.stdout
    [event] = rows(factory, Event, kind="rejected")
    assert event.reason_code == "spool-full" and rows(factory, Instance) == []


@pytest.mark.dcmtk
def test_pdu_longer_than_negotiated_closes_the_connection_without_allocating_it(scp, settings) -> None:
    port = scp(settings)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(bytes([0x01, 0x00]) + (0xFFFFFFF0).to_bytes(4, "big"))  # a 4 GiB A-ASSOCIATE-RQ
        assert sock.recv(16) == b""  # closed at once; no 4 GiB buffer was allocated
    echo = run_tool("echoscu", "-aet", CALLING, "-aec", "CXRBMD", "127.0.0.1", port)
    assert echo.returncode == 0, echo.stdout  # and the node still serves


@pytest.mark.dcmtk
def test_database_down_is_out_of_resources_never_success(scp, settings, factory, engine) -> None:
    port = scp(settings)
    with engine.begin() as connection:
        connection.execute(text("PRAGMA foreign_keys=OFF"))
        for table in ("deliveries", "jobs", "instances"):
            connection.execute(text(f"DROP TABLE {table}"))
    result = storescu(port, rg1_file())
    assert result.returncode != 0
    assert "Received Store Response (Refused: OutOfResources)" in result.stdout, result.stdout
    assert "(Success)" not in result.stdout
