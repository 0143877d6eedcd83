"""Dispatch: C-STORE SCU to real peers on loopback (DCMTK storescp, pynetdicom SCPs), outbox
bookkeeping, backoff, dead deliveries and the apscheduler job."""

from __future__ import annotations

import io
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from screener.node.dispatch import (
    Destination,
    DispatchError,
    Dispatcher,
    DispatchSettings,
    TLSConfig,
    schedule,
    send_file,
)
from screener.store.models import Delivery, Event
from screener.store.queue import ReceivedInstance, claim_jobs, complete_job, record_received
from tests.support.common import free_port
from tests.support.store import job_result
from tests.support.tls import make_ca, make_server_cert
from tests.support.dcmtk import dcmtk_tool

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
SALT = b"per-install-salt-0123456789abcdef"
TIMEOUT_S = 5.0
SETTINGS = DispatchSettings(calling_ae="CXRBMD", max_attempts=10, backoff_base_s=30, backoff_cap_s=3600)


# ---------------------------------------------------------------- real peers


def echo_ok(port: int, ae_title: str) -> bool:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    for attribute in ("connection_timeout", "acse_timeout", "dimse_timeout", "network_timeout"):
        setattr(ae, attribute, 2)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()


@dataclass
class StoreSCP:
    port: int
    out_dir: Path
    process: subprocess.Popen[bytes]

    def received_uids(self) -> set[str]:
        uids = set()
        for path in self.out_dir.iterdir():
            if path.is_file():
                uids.add(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        return uids


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """Start DCMTK storescp (AE PACS) on a port, wait until it answers C-ECHO; stop at teardown."""
    started: list[StoreSCP] = []

    def start(port: int | None = None, accept_all: bool = True) -> StoreSCP:
        """``accept_all``: +xa, every transfer syntax; else DCMTK's default, uncompressed only."""
        port = port or free_port()
        out_dir = tmp_path / f"storescp-{port}"
        out_dir.mkdir()
        log = (tmp_path / f"storescp-{port}.log").open("wb")
        process = subprocess.Popen(
            [dcmtk_tool("storescp"), "--aetitle", "PACS", "--output-directory", str(out_dir),
             *(["+xa"] if accept_all else []), "--acse-timeout", "10", "--dimse-timeout", "10", "--socket-timeout", "10", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        peer = StoreSCP(port, out_dir, process)
        started.append(peer)
        deadline = time.monotonic() + 15
        while not echo_ok(port, "PACS"):
            if process.poll() is not None:
                pytest.fail(f"storescp exited with {process.returncode}: {log.name}")
            if time.monotonic() > deadline:
                pytest.fail(f"storescp did not answer C-ECHO on port {port} within 15 s")
            time.sleep(0.1)
        return peer

    yield start
    for peer in started:
        peer.process.terminate()
        try:
            peer.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            peer.process.kill()
            peer.process.wait(timeout=5)


@pytest.fixture
def pynetdicom_scp() -> Iterator[Callable[..., int]]:
    """A pynetdicom storage SCP with a chosen C-STORE status or called-AE check; returns the port."""
    servers = []

    def start(status: int = 0x0000, require_called_aet: bool = False, only_sr: bool = False) -> int:
        ae = AE(ae_title="PACS")
        # only_sr: a PACS that takes reports but no images (set once: the setter adds)
        ae.supported_contexts = [c for c in AllStoragePresentationContexts if not only_sr or ".88." in c.abstract_syntax]
        ae.require_called_aet = require_called_aet
        port = free_port()
        servers.append(ae.start_server(("127.0.0.1", port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, lambda event: status)]))
        return port

    yield start
    for server in servers:
        server.shutdown()


# ---------------------------------------------------------------- objects and outbox rows


def sr_file(directory: Path, uid: str) -> Path:
    """A real SR (pydicom's test-SR.dcm) under a SOP Instance UID of our own."""
    source = get_testdata_file("test-SR.dcm")
    assert source is not None, "pydicom's test-SR.dcm is missing"
    dataset = pydicom.dcmread(source)
    dataset.SOPInstanceUID = uid
    dataset.file_meta.MediaStorageSOPInstanceUID = uid
    path = directory / f"{uid}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def objects(tmp_path: Path) -> dict[str, Path]:
    """SR files by SOP Instance UID; the dispatcher's object_path looks deliveries up here."""
    return {}


def jpeg_sc_file(directory: Path, uid: str) -> Path:
    """A JPEG baseline (YBR_FULL_422) Secondary Capture, as the result image is stored."""
    dataset = pydicom.dcmread(get_testdata_file("SC_rgb.dcm"))
    buffer = io.BytesIO()
    Image.fromarray(dataset.pixel_array).save(buffer, format="JPEG", quality=90, subsampling="4:2:2")
    dataset.PixelData = encapsulate([buffer.getvalue()])
    dataset["PixelData"].VR = "OB"
    dataset.PhotometricInterpretation = "YBR_FULL_422"
    dataset.LossyImageCompression = "01"
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = uid
    path = directory / f"{uid}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def completed(factory: sessionmaker[Session], objects: dict[str, Path], tmp_path: Path, n: int,
              destinations: list[tuple[str, tuple[str, ...]]], image_uid: str | None = None) -> str:
    """A done job with pending deliveries (created at T0, so due now); returns the SR UID.
    ``image_uid``: the job also has a result image (a JPEG Secondary Capture) of that UID."""
    received = ReceivedInstance(
        sop_instance_uid=f"1.2.3.4.{n}", study_instance_uid="1.2.3", series_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
        spool_path=f"/spool/1.2.3.4.{n}.dcm", size_bytes=1000, accession_number="ACC1",
        patient_id="PID-42", calling_ae="MODALITY", peer_address="127.0.0.1:1",
    )
    sr_uid = f"2.25.{1000 + n}"
    objects[sr_uid] = sr_file(tmp_path, sr_uid)
    with factory() as s:
        _, job, _ = record_received(s, received, "demo-1.0", SALT, now=T0)
    assert job is not None
    [claimed] = claim_jobs(factory, "w1", 1, 60, now=T0)
    assert claimed.id == job.id
    uids = {"sr": sr_uid}
    if image_uid is not None:
        objects[image_uid] = jpeg_sc_file(tmp_path, image_uid)
        uids["image"] = image_uid
    with factory() as s:
        complete_job(s, job.id, "w1", "done", job_result(uids), destinations, now=T0)
    return sr_uid


def dispatcher(factory: sessionmaker[Session], objects: dict[str, Path], *destinations: Destination,
               settings: DispatchSettings = SETTINGS) -> Dispatcher:
    def object_path(delivery: Delivery) -> Path:
        return objects[delivery.sop_instance_uid]  # type: ignore[index]

    return Dispatcher(factory, {d.name: d for d in destinations}, settings, object_path)


def destination(name: str, port: int, **changes: object) -> Destination:
    fields: dict[str, object] = dict(name=name, ae_title="PACS", host="127.0.0.1", port=port, timeout_s=TIMEOUT_S)
    fields.update(changes)
    return Destination(**fields)  # type: ignore[arg-type]


def deliveries(factory: sessionmaker[Session]) -> list[Delivery]:
    with factory() as s:
        return list(s.scalars(select(Delivery).order_by(Delivery.id)))


def events(factory: sessionmaker[Session], kind: str) -> list[Event]:
    with factory() as s:
        return list(s.scalars(select(Event).filter_by(kind=kind).order_by(Event.id)))


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(("changes", "field"), [
    (dict(ae_title="A" * 17), "ae_title"),
    (dict(ae_title="PA\\CS"), "ae_title"),
    (dict(ae_title="  "), "ae_title"),
    (dict(port=0), "port"),
    (dict(port=65536), "port"),
    (dict(port="104"), "port"),
    (dict(host=""), "host"),
    (dict(timeout_s=0), "timeout_s"),
    (dict(name=""), "name"),
])
def test_destination_validates_fields_and_names_them(changes: dict[str, object], field: str) -> None:
    fields: dict[str, object] = dict(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)
    fields.update(changes)
    with pytest.raises(ValueError, match=field):
        Destination(**fields)  # type: ignore[arg-type]


def test_destination_kinds_and_tls_config() -> None:
    assert destination("pacs", 104).kinds() == ("sr", "gsps", "image", "pdf")
    assert destination("pacs", 104, send_gsps=False, send_pdf=False).kinds() == ("sr", "image")
    assert destination("pacs", 104, send_sr=False, send_gsps=False, send_result_image=False).kinds() == ("pdf",)
    assert destination("pacs", 104).label == "PACS@127.0.0.1:104"
    with pytest.raises(ValueError, match="cert_file and key_file"):
        TLSConfig(ca_file=Path("ca.pem"), cert_file=Path("c.pem"))


@pytest.mark.parametrize(("changes", "field"), [
    (dict(calling_ae="X" * 17), "calling_ae"),
    (dict(max_attempts=0), "max_attempts"),
    (dict(backoff_base_s=-1), "backoff_base_s"),
    (dict(backoff_base_s=60, backoff_cap_s=30), "backoff_cap_s"),
    (dict(batch_limit=0), "batch_limit"),
])
def test_settings_validate_fields_and_name_them(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DispatchSettings(**changes)  # type: ignore[arg-type]
    assert (DispatchSettings().calling_ae, DispatchSettings().max_attempts) == ("CXRBMD", 10)


# ---------------------------------------------------------------- send_file


@pytest.mark.dcmtk
def test_send_file_stores_sr_at_dcmtk_storescp(storescp: Callable[..., StoreSCP], tmp_path: Path) -> None:
    peer = storescp()
    path = sr_file(tmp_path, "2.25.77")
    assert send_file(destination("pacs", peer.port), path, SETTINGS) == 0x0000
    assert peer.received_uids() == {"2.25.77"}


@pytest.mark.dcmtk
def test_jpeg_result_image_is_decompressed_for_an_scp_that_takes_only_uncompressed(
        storescp: Callable[..., StoreSCP], tmp_path: Path) -> None:
    peer = storescp(accept_all=False)
    path = jpeg_sc_file(tmp_path, "2.25.78")
    assert send_file(destination("pacs", peer.port), path, SETTINGS) == 0x0000
    assert peer.received_uids() == {"2.25.78"}
    [received] = [p for p in peer.out_dir.iterdir() if p.is_file()]
    stored = pydicom.dcmread(received)
    assert stored.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert stored.PhotometricInterpretation == "RGB" and stored.pixel_array.shape[-1] == 3


def test_an_object_the_destination_refuses_does_not_hold_up_its_other_deliveries(
        pynetdicom_scp: Callable[..., int], factory: sessionmaker[Session], objects: dict[str, Path],
        tmp_path: Path) -> None:
    port = pynetdicom_scp(only_sr=True)
    completed(factory, objects, tmp_path, 1, [("pacs", ("image", "sr"))], image_uid="2.25.90")
    report = dispatcher(factory, objects, destination("pacs", port)).run_due()
    assert (report.sent, report.failed) == (1, 1)
    rows = {row.kind: row for row in deliveries(factory)}
    assert rows["sr"].state == "sent"  # tried, whether the image came before it or not
    assert rows["image"].state == "pending"
    assert "aborted the association request for Secondary Capture" in (rows["image"].last_error or "")


def test_send_file_unreachable_names_the_destination(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(DispatchError, match=rf"pacs \(PACS@127.0.0.1:{port}\) unreachable"):
        send_file(destination("pacs", port), sr_file(tmp_path, "2.25.1"), SETTINGS)


def test_send_file_refused_association(pynetdicom_scp: Callable[..., int], tmp_path: Path) -> None:
    port = pynetdicom_scp(require_called_aet=True)
    with pytest.raises(DispatchError, match=r"\(ORTHANC@127.0.0.1:\d+\) refused the association"):
        send_file(destination("pacs", port, ae_title="ORTHANC"), sr_file(tmp_path, "2.25.1"), SETTINGS)


# ---------------------------------------------------------------- the outbox run


@pytest.mark.dcmtk
def test_run_due_sends_and_records_sent(storescp: Callable[..., StoreSCP], factory: sessionmaker[Session],
                                        objects: dict[str, Path], tmp_path: Path) -> None:
    peer = storescp()
    uid = completed(factory, objects, tmp_path, 1, [("pacs", ("sr",))])
    report = dispatcher(factory, objects, destination("pacs", peer.port)).run_due()
    assert (report.sent, report.failed, report.dead) == (1, 0, 0)
    assert peer.received_uids() == {uid}
    [row] = deliveries(factory)
    assert (row.state, row.attempts, row.next_attempt_at, row.last_error) == ("sent", 1, None, None)
    [event] = events(factory, "sent")
    assert event.delivery_id == row.id and event.outcome == "ok" and "pacs" in (event.message or "")
    assert dispatcher(factory, objects, destination("pacs", peer.port)).run_due().attempted == 0


@pytest.mark.dcmtk
def test_destination_down_then_up(storescp: Callable[..., StoreSCP], factory: sessionmaker[Session],
                                  objects: dict[str, Path], tmp_path: Path) -> None:
    port = free_port()  # nothing listens here yet
    uid = completed(factory, objects, tmp_path, 1, [("pacs", ("sr",))])
    run = dispatcher(factory, objects, destination("pacs", port))
    t1 = T0 + timedelta(minutes=5)
    report = run.run_due(now=t1)
    assert (report.sent, report.failed, report.dead) == (0, 1, 0)
    [row] = deliveries(factory)
    assert (row.state, row.attempts) == ("pending", 1)
    assert row.next_attempt_at == t1 + timedelta(seconds=SETTINGS.backoff_base_s)
    assert "unreachable" in (row.last_error or "")
    [event] = events(factory, "delivery_retry")
    assert event.outcome == "error" and event.delivery_id == row.id and "unreachable" in (event.message or "")

    assert run.run_due(now=t1 + timedelta(seconds=10)).attempted == 0  # backoff not over yet
    peer = storescp(port)  # the PACS comes back on the same port
    report = run.run_due(now=t1 + timedelta(seconds=31))
    assert (report.sent, report.failed) == (1, 0)
    assert peer.received_uids() == {uid}
    [row] = deliveries(factory)
    assert (row.state, row.attempts) == ("sent", 2)


def test_dead_after_max_attempts(factory: sessionmaker[Session], objects: dict[str, Path], tmp_path: Path) -> None:
    completed(factory, objects, tmp_path, 1, [("pacs", ("sr",))])
    settings = DispatchSettings(max_attempts=3, backoff_base_s=10, backoff_cap_s=20)
    run = dispatcher(factory, objects, destination("pacs", free_port()), settings=settings)
    now = T0
    outcomes = []
    for _ in range(3):
        now += timedelta(hours=1)
        report = run.run_due(now=now)
        outcomes.append((report.failed, report.dead))
    assert outcomes == [(1, 0), (1, 0), (0, 1)]
    [row] = deliveries(factory)
    assert (row.state, row.attempts, row.next_attempt_at) == ("dead", 3, None)
    assert "unreachable" in (row.last_error or "")
    [event] = events(factory, "dead")
    assert event.outcome == "error" and "gave up after 3 attempts" in (event.message or "")
    assert run.run_due(now=now + timedelta(days=1)).attempted == 0


def test_a_missing_object_file_is_dead_at_once(factory: sessionmaker[Session], objects: dict[str, Path],
                                              tmp_path: Path) -> None:
    """An outbox file that is gone (purged, or a restore without the outbox) cannot come back:
    the delivery is dead on the first attempt with object-missing, not retried for days."""
    completed(factory, objects, tmp_path, 1, [("pacs", ("sr",))])

    def gone(delivery: Delivery) -> Path:
        raise FileNotFoundError(f"the sr file for {delivery.sop_instance_uid} is gone")

    run = Dispatcher(factory, {"pacs": destination("pacs", free_port())}, SETTINGS, gone)
    report = run.run_due(now=T0 + timedelta(minutes=1))
    assert (report.failed, report.dead) == (0, 1)
    [row] = deliveries(factory)
    assert (row.state, row.attempts) == ("dead", 1)
    [event] = events(factory, "dead")
    assert event.reason_code == "object-missing" and "not retried: " in (event.message or "")


@pytest.mark.dcmtk
def test_one_destination_down_does_not_block_the_other(
    storescp: Callable[..., StoreSCP], factory: sessionmaker[Session], objects: dict[str, Path], tmp_path: Path,
) -> None:
    peer = storescp()
    # The dead destination's rows come first in the batch, twice over.
    uids = [completed(factory, objects, tmp_path, n, [("archive", ("sr",)), ("pacs", ("sr",))]) for n in (1, 2)]
    run = dispatcher(factory, objects, destination("archive", free_port()), destination("pacs", peer.port))
    started = time.monotonic()
    report = run.run_due()
    assert (report.sent, report.failed, report.dead) == (2, 2, 0)
    assert time.monotonic() - started < 2 * TIMEOUT_S
    assert peer.received_uids() == set(uids)
    states = {(d.destination, d.state, d.attempts) for d in deliveries(factory)}
    assert states == {("archive", "pending", 1), ("pacs", "sent", 1)}


def test_non_success_status_is_a_failed_attempt(pynetdicom_scp: Callable[..., int], factory: sessionmaker[Session],
                                                objects: dict[str, Path], tmp_path: Path) -> None:
    port = pynetdicom_scp(status=0xA700)
    completed(factory, objects, tmp_path, 1, [("pacs", ("sr",))])
    report = dispatcher(factory, objects, destination("pacs", port)).run_due(now=T0)
    assert (report.sent, report.failed) == (0, 1)
    [row] = deliveries(factory)
    assert (row.state, row.attempts) == ("pending", 1)
    assert "C-STORE status 0xA700" in (row.last_error or "")


def test_unknown_or_disabled_destination_fails_with_reason(factory: sessionmaker[Session],
                                                           objects: dict[str, Path], tmp_path: Path) -> None:
    completed(factory, objects, tmp_path, 1, [("gone", ("sr",)), ("pacs", ("sr",))])
    report = dispatcher(factory, objects, destination("pacs", free_port(), send_sr=False)).run_due(now=T0)
    assert report.failed == 2
    errors = {d.destination: d.last_error for d in deliveries(factory)}
    assert "not configured" in (errors["gone"] or "")
    assert "not to receive sr" in (errors["pacs"] or "")


# ---------------------------------------------------------------- the scheduler job


@pytest.mark.dcmtk
def test_scheduler_job_runs_due_deliveries(storescp: Callable[..., StoreSCP], factory: sessionmaker[Session],
                                           objects: dict[str, Path], tmp_path: Path) -> None:
    peer = storescp()
    uid = completed(factory, objects, tmp_path, 1, [("pacs", ("sr",))])
    scheduler = BackgroundScheduler(timezone=UTC)
    job = schedule(scheduler, dispatcher(factory, objects, destination("pacs", peer.port)), interval_s=0.5)
    assert (job.max_instances, job.coalesce) == (1, True)
    scheduler.start()
    try:
        deadline = time.monotonic() + 20
        while deliveries(factory)[0].state != "sent":
            assert time.monotonic() < deadline, "the scheduled dispatch did not send within 20 s"
            time.sleep(0.1)
    finally:
        scheduler.shutdown(wait=True)
    assert peer.received_uids() == {uid}


# ---------------------------------------------------------------- TLS against a real DCMTK peer

@pytest.fixture
def tls_storescp(tmp_path: Path) -> Iterator[tuple[StoreSCP, Path]]:
    """DCMTK storescp with TLS (no client certificate required); yields it and its CA certificate."""
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = make_ca(pki, "test-ca")
    cert, key = make_server_cert(pki, ca)
    port = free_port()
    out_dir = tmp_path / "storescp-tls"
    out_dir.mkdir()
    log_path = tmp_path / "storescp-tls.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [dcmtk_tool("storescp"), "--aetitle", "PACS", "--output-directory", str(out_dir), "+xa",
             "+tls", str(key), str(cert), "-pem", "+cf", str(ca[0]), "-ic",
             "--acse-timeout", "10", "--dimse-timeout", "10", "--socket-timeout", "10", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )
    peer = StoreSCP(port, out_dir, process)
    try:
        deadline = time.monotonic() + 15
        while True:  # wait until the port accepts TCP (no TLS probe: it would count as a failed association)
            if process.poll() is not None:
                pytest.fail(f"storescp (TLS) exited with {process.returncode}: {log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"storescp (TLS) did not listen on port {port} within 15 s")
            time.sleep(0.1)
        yield peer, ca[0]
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def tls_destination(tmp_path: Path, port: int, ca_file: Path) -> Destination:
    """A destination built the way the config file builds it (relative CA path, resolved)."""
    from screener.config import load_config

    config = tmp_path / "screener.toml"
    relative = ca_file.relative_to(tmp_path)
    config.write_text(f'[[destinations]]\nname = "secure-pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
                      f'port = {port}\ntls_ca_file = "{relative}"\n')
    [dest] = load_config(config).destinations
    built = dest.destination()
    assert built.tls is not None and built.tls.ca_file == ca_file.resolve()
    return Destination(name=built.name, ae_title=built.ae_title, host=built.host, port=built.port,
                       tls=built.tls, timeout_s=TIMEOUT_S)


@pytest.mark.dcmtk
def test_run_due_sends_over_tls_to_dcmtk(tls_storescp: tuple[StoreSCP, Path], factory: sessionmaker[Session],
                                         objects: dict[str, Path], tmp_path: Path) -> None:
    peer, ca_file = tls_storescp
    uid = completed(factory, objects, tmp_path, 1, [("secure-pacs", ("sr",))])
    report = dispatcher(factory, objects, tls_destination(tmp_path, peer.port, ca_file)).run_due()
    assert (report.sent, report.failed, report.dead) == (1, 0, 0), deliveries(factory)[0].last_error
    assert peer.received_uids() == {uid}
    [row] = deliveries(factory)
    assert (row.state, row.attempts, row.last_error) == ("sent", 1, None)


@pytest.mark.dcmtk
def test_tls_with_the_wrong_ca_fails_and_stays_pending(tls_storescp: tuple[StoreSCP, Path],
                                                       factory: sessionmaker[Session], objects: dict[str, Path],
                                                       tmp_path: Path) -> None:
    peer, _ = tls_storescp
    other = tmp_path / "other"
    other.mkdir()
    wrong_ca, _ = make_ca(other, "other-ca")
    completed(factory, objects, tmp_path, 1, [("secure-pacs", ("sr",))])
    report = dispatcher(factory, objects, tls_destination(tmp_path, peer.port, wrong_ca)).run_due()
    assert (report.sent, report.failed) == (0, 1)
    assert peer.received_uids() == set()
    [row] = deliveries(factory)
    assert row.state == "pending" and row.attempts == 1
    assert "TLS" in (row.last_error or "") and "certificate" in (row.last_error or ""), row.last_error


@pytest.mark.dcmtk
def test_tls_destination_never_falls_back_to_clear(storescp: Callable[..., StoreSCP], factory: sessionmaker[Session],
                                                   objects: dict[str, Path], tmp_path: Path) -> None:
    """A plain (non-TLS) PACS on the port: the TLS destination fails, nothing is sent in clear."""
    peer = storescp()
    ca_file, _ = make_ca(tmp_path, "some-ca")
    completed(factory, objects, tmp_path, 1, [("secure-pacs", ("sr",))])
    report = dispatcher(factory, objects, tls_destination(tmp_path, peer.port, ca_file)).run_due()
    assert (report.sent, report.failed) == (0, 1)
    assert peer.received_uids() == set()
    [row] = deliveries(factory)
    assert row.state == "pending" and "TLS" in (row.last_error or ""), row.last_error
