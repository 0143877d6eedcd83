"""Hostile input cannot stop the node: each attack a peer on loopback could make, for real.

A real SCP (screener.node.receive.start_scp) on a free port, real sockets sending the bytes an
attacker would, pynetdicom as the honest caller. Loopback has all of 127.0.0.0/8, so the
honest caller binds 127.0.0.2 and the attacker 127.0.0.1, two peers as far as the node sees.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from screener.node.receive import ReceiveSettings
from screener.node.receivers import ReceiverPool
from screener.node.spool import INCOMING
from screener.store.models import Event
from tests.support.attacks import deflate_bomb
from tests.support.common import rg1_file, wait_for

ACSE_S = 2.0
NETWORK_S = 2.0
HONEST = "127.0.0.2"


def settings(tmp_path: Path, **changes: object) -> ReceiveSettings:
    values: dict[str, object] = dict(spool_root=tmp_path / "spool", model_id="demo-1.0", patient_salt=b"salt",
                                     port=0, min_free_bytes=0, acse_timeout_s=ACSE_S, network_timeout_s=NETWORK_S)
    values.update(changes)
    return ReceiveSettings(**values)  # type: ignore[arg-type]


def echo(port: int, source: str = HONEST, timeout_s: float = 5.0) -> tuple[bool, float, object]:
    """(established and C-ECHO Success, seconds taken, the association) from ``source``."""
    ae = AE(ae_title="HONEST")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout_s
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRBMD", bind_address=(source, 0))
    ok = False
    if assoc.is_established:
        status = assoc.send_c_echo()
        ok = bool(status) and status.Status == 0
        assoc.release()
    return ok, time.monotonic() - started, assoc


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the node closes ``sock`` (recv returns b"" or resets) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def events(factory: sessionmaker[Session], kind: str) -> list[Event]:
    with factory() as session:
        return list(session.scalars(select(Event).where(Event.kind == kind)))


# ---------------------------------------------------------------- slots and timeouts


def test_partial_pdus_do_not_hold_slots_and_are_closed(tmp_path: Path, scp, factory) -> None:
    # Before: 20 connections sending the first 3 bytes of a PDU made every caller get
    # A-ASSOCIATE-RJ for as long as the attacker waited (the read blocked, no timer fired).
    port = scp(settings(tmp_path))
    attack = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    for sock in attack:
        sock.sendall(b"\x04\x00\x00")
    ok, seconds, _ = echo(port)
    assert ok and seconds < 2.0
    started = time.monotonic()
    assert all(closed_within(sock, ACSE_S + 3) for sock in attack)
    assert time.monotonic() - started < ACSE_S + 3
    assert echo(port, source="127.0.0.1")[0]
    timeouts = events(factory, "connection_timeout")
    assert timeouts and {e.reason_code for e in timeouts} == {"association-timeout"}
    assert len(timeouts) <= 2  # rate-limited: one row per peer and minute, with a count


def test_idle_connections_take_no_association_slot_and_refusals_are_rate_limited(tmp_path: Path, scp, factory) -> None:
    # Before: 50 connections that sent nothing refused every caller for ~30 s each.
    port = scp(settings(tmp_path, max_associations=4, max_associations_per_peer=2))
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    ok, seconds, _ = echo(port)
    assert ok and seconds < 2.0
    assert all(closed_within(sock, ACSE_S + 3) for sock in idle)
    refused = events(factory, "connection_refused")
    assert refused and {e.reason_code for e in refused} == {"connection-limit-exceeded"}
    assert len(refused) == 1 and "more from 127.0.0.1" not in (refused[0].message or "")
    assert echo(port, source="127.0.0.1")[0]


def test_slow_sender_is_closed_within_the_network_timeout(tmp_path: Path, scp, factory) -> None:
    # Before: one byte every 150 ms kept an association open for ever.
    port = scp(settings(tmp_path))
    ae = AE(ae_title="SLOW")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRBMD")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    started = time.monotonic()
    # A P-DATA-TF header announcing 1000 bytes, then the bytes one at a time.
    raw.sendall(b"\x04\x00" + struct.pack(">I", 1000))
    while assoc.is_alive() and time.monotonic() - started < NETWORK_S + 5:
        try:
            raw.sendall(b"\x00")
        except OSError:
            break
        time.sleep(0.15)
    wait_for("the node to close the slow association", lambda: not assoc.is_alive(), NETWORK_S + 5)
    assert time.monotonic() - started < NETWORK_S + 5
    assert any("PDU not received in time" in (e.message or "") for e in events(factory, "connection_timeout"))


def test_slow_association_request_is_closed_within_the_acse_timeout(tmp_path: Path, scp) -> None:
    port = scp(settings(tmp_path))
    sock = socket.create_connection(("127.0.0.1", port))
    started = time.monotonic()
    closed = False
    for byte in b"\x01\x00\x00\x00\x01\x00" + bytes(250):  # an A-ASSOCIATE-RQ, one byte per 150 ms
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.15)
        if time.monotonic() - started > ACSE_S + 4:
            break
    assert closed or closed_within(sock, 1.0)
    assert time.monotonic() - started < ACSE_S + 4


def test_association_limits_reject_with_local_limit_exceeded(tmp_path: Path, scp, factory) -> None:
    port = scp(settings(tmp_path, max_associations=2, max_associations_per_peer=1))
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    first = ae.associate("127.0.0.1", port, ae_title="CXRBMD")
    assert first.is_established
    again = ae.associate("127.0.0.1", port, ae_title="CXRBMD")  # same peer: over its limit
    assert again.is_rejected
    second = ae.associate("127.0.0.1", port, ae_title="CXRBMD", bind_address=("127.0.0.3", 0))
    assert second.is_established
    ok, _, third = echo(port)  # a third peer: every slot is taken
    assert not ok and third.is_rejected
    rj = third.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit
    for assoc in (first, second):
        assoc.release()
    assert echo(port)[0]
    codes = [e.reason_code for e in events(factory, "association_rejected")]
    assert codes == ["peer-limit-exceeded", "local-limit-exceeded"]


# ---------------------------------------------------------------- what pynetdicom refused alone


def _command(**elements: object) -> bytes:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    write_dataset(body, ds)
    group = struct.pack("<HHI", 0x0000, 0x0000, 4) + struct.pack("<I", len(body.getvalue()))
    return group + body.getvalue()


def _p_data(context_id: int, control: int, data: bytes) -> bytes:
    item = struct.pack(">IB", len(data) + 2, context_id) + bytes([control]) + data
    return b"\x04\x00" + struct.pack(">I", len(item)) + item


def _store_association(port: int) -> object:
    ae = AE(ae_title="RAW")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRBMD")
    assert assoc.is_established
    return assoc


@pytest.mark.parametrize("uid", ["", "1." * 40 + "1"], ids=["empty", "over-64"])
def test_invalid_command_uid_is_refused_and_audited(tmp_path: Path, scp, factory, uid: str) -> None:
    # Before: pynetdicom's reader thread died (empty UID) or it aborted silently (too long);
    # neither reached the audit.
    port = scp(settings(tmp_path))
    assoc = _store_association(port)
    context = assoc.accepted_contexts[0].context_id
    command = _command(AffectedSOPClassUID=ComputedRadiographyImageStorage, CommandField=0x0001, MessageID=1,
                       Priority=0, CommandDataSetType=0x0000, AffectedSOPInstanceUID=uid)
    assoc.dul.socket.socket.sendall(_p_data(context, 0x03, command))
    wait_for("the association to end", lambda: not assoc.is_alive(), 10)
    rows = events(factory, "rejected")
    assert [e.reason_code for e in rows] == ["invalid-command"]
    assert "Affected SOP Instance UID" in (rows[0].message or "")
    assert echo(port)[0]


def test_data_on_an_unaccepted_presentation_context_is_refused_and_audited(tmp_path: Path, scp, factory) -> None:
    port = scp(settings(tmp_path))
    assoc = _store_association(port)
    command = _command(AffectedSOPClassUID=ComputedRadiographyImageStorage, CommandField=0x0001, MessageID=1,
                       Priority=0, CommandDataSetType=0x0000, AffectedSOPInstanceUID="1.2.3")
    assoc.dul.socket.socket.sendall(_p_data(99, 0x03, command))
    wait_for("the association to end", lambda: not assoc.is_alive(), 10)
    assert [e.reason_code for e in events(factory, "rejected")] == ["unknown-presentation-context"]
    assert not list((tmp_path / "spool" / INCOMING).glob("*"))


def test_undecodable_pdu_abort_is_audited(tmp_path: Path, scp, factory) -> None:
    port = scp(settings(tmp_path))
    assoc = _store_association(port)
    assoc.dul.socket.socket.sendall(b"\x09\x00\x00\x00\x00\x02\x00\x00")  # PDU type 9 does not exist
    wait_for("the association to end", lambda: not assoc.is_alive(), 10)
    aborted = events(factory, "association_aborted")
    assert [e.reason_code for e in aborted] == ["protocol-error"]


# ---------------------------------------------------------------- deflate bomb


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_deflate_bomb_is_refused_within_a_memory_ceiling(tmp_path: Path, engine, factory, monkeypatch) -> None:
    # Before: a 3 MB file inflating to 3 GiB drove the receive process to 6.4 GB resident and
    # was answered Success.
    bomb = tmp_path / "bomb.dcm"
    uid = deflate_bomb(bomb, 1 << 30)  # 1 GiB inflated, about 1 MB on disk
    assert bomb.stat().st_size < 8 << 20
    receive = settings(tmp_path, max_dataset_bytes=64 << 20)
    pool = ReceiverPool(receive, str(engine.url), processes=1)
    port = pool.start()
    try:
        baseline = peak_rss_bytes(pool.pids()[0])
        # The sender streams the file as it is (pynetdicom would otherwise inflate it to send).
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        ae = AE(ae_title="BOMBER")
        ae.add_requested_context(ComputedRadiographyImageStorage, DeflatedExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="CXRBMD")
        assert assoc.is_established
        status = assoc.send_c_store(bomb)
        assoc.release()
        assert status.Status == 0xA700
        assert peak_rss_bytes(pool.pids()[0]) - baseline < 200 << 20
    finally:
        pool.stop()
    rows = events(factory, "rejected")
    assert [(e.reason_code, e.sop_instance_uid) for e in rows] == [("inflates-too-large", uid)]
    assert not [p for p in (tmp_path / "spool").rglob("*.dcm") if INCOMING not in p.parts]


def test_a_valid_image_still_arrives_beside_the_attacks(tmp_path: Path, scp, factory) -> None:
    port = scp(settings(tmp_path))
    attack = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
    for sock in attack:
        sock.sendall(b"\x04")
    ae = AE(ae_title="PACS")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRBMD", bind_address=(HONEST, 0))
    status = assoc.send_c_store(rg1_file("RG1_UNCR.dcm"))
    assoc.release()
    assert status.Status == 0
    assert [e.kind for e in events(factory, "received")] == ["received"]
    for sock in attack:
        sock.close()


def test_a_pdu_header_without_its_body_cannot_smuggle_an_oversized_pdu(tmp_path: Path, scp) -> None:
    # An unknown PDU type makes pynetdicom skip the body read; the next header must still be
    # taken as a header, so the 4 GiB PDU it announces is refused at once, not buffered.
    port = scp(settings(tmp_path))
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"\x09\x00\x00\x00\x00\x00" + b"\x04\x00\xff\xff\xff\x00")
    sent, started = 0, time.monotonic()
    try:
        while time.monotonic() - started < ACSE_S + 3:
            sock.sendall(bytes(1 << 20))
            sent += 1 << 20
    except OSError:
        pass
    assert closed_within(sock, 2.0)
    assert sent < 256 << 20  # the node stopped reading long before it could fill its memory


def test_a_locked_database_does_not_stop_the_node_accepting(tmp_path: Path, scp, engine) -> None:
    # The refusal audit of a connection over the cap is written in the background: the
    # accepting thread never waits for the database's write lock.
    port = scp(settings(tmp_path, max_associations=2, max_associations_per_peer=1))
    raw = engine.raw_connection()
    raw.driver_connection.execute("BEGIN IMMEDIATE")
    try:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]  # the third is over the cap
        ok, seconds, _ = echo(port, source="127.0.0.3")
        assert ok and seconds < 3.0
    finally:
        raw.driver_connection.execute("ROLLBACK")
        raw.close()
    for sock in held:
        sock.close()
