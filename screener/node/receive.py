"""DICOM C-STORE / C-ECHO SCP: AE titles, allow-lists, limits, and the ack-only-on-disk rule.

The network layer (the pynetdicom handlers here) checks who is calling and hands each C-STORE
to a :class:`Receiver`, which decides what the dataset becomes: a spooled file plus a queued
job, an acknowledged-and-dropped routing-loop object, or a failure status. The C-STORE response
says Success only after the file is fsynced and renamed and its row committed
(ARCHITECTURE.md, "ack only what is on disk"); when that cannot be done the answer is 0xA700
Out of Resources, so the PACS retries, or a 0xC000-range status for data we cannot accept.

Datasets are never held in memory whole: pynetdicom's chunked receive writes each P-DATA
fragment to a file as it arrives (in ``<spool>/.incoming`` in a receive process, see
screener.node.receivers), and the handler moves the finished file into the spool. Memory per
association stays at about one PDU whatever the image size, and the copy to disk overlaps the
transfer instead of following it. :class:`TransferGuard` aborts a transfer that outgrows the
size limit or the disk while it arrives.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom import uid as tsuid
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event as NetEvent
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EncapsulatedPDFStorage,
    EnhancedSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from screener import MANUFACTURER
from screener.pipeline.decode import SUPPORTED_TRANSFER_SYNTAXES
from screener.node.spool import (
    InvalidUID,
    SpoolFull,
    check_watermark,
    move_into_spool,
    spool_path,
    validate_uid,
)
from screener.store.db import SQLITE_BEGIN
from screener.store.models import Event, utcnow
from screener.store.queue import ReceivedInstance, record_received

LOGGER = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 B.2.3; 0xC210 and 0xC211 are the values pynetdicom itself uses).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210  # dataset unreadable or its UIDs unusable as spool names
UNABLE_TO_PROCESS = 0xC211  # an unexpected error in our code: never Success

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, diagnostic.
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
REASON_NO_REASON = 0x01
REASON_CALLING_AE = 0x03
REASON_CALLED_AE = 0x07
_REASON_NAMES = {
    REASON_NO_REASON: "no-reason-given",
    0x02: "application-context-not-supported",
    REASON_CALLING_AE: "calling-ae-not-recognised",
    REASON_CALLED_AE: "called-ae-not-recognised",
}

IMAGE_STORAGE = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
# What we send back to the PACS ourselves; routing loops return it, and it must never be queued.
OWN_OUTPUT_STORAGE = (
    BasicTextSRStorage,
    EnhancedSRStorage,
    ComprehensiveSRStorage,
    Comprehensive3DSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    EncapsulatedPDFStorage,
)
UNCOMPRESSED_SYNTAXES = (
    tsuid.ExplicitVRLittleEndian,
    tsuid.ImplicitVRLittleEndian,
    tsuid.DeflatedExplicitVRLittleEndian,
)
# Exactly what screener.pipeline.decode decodes (uncompressed first, then a fixed order), so
# the SCP never accepts an image the worker cannot read nor refuses one it could.
IMAGE_SYNTAXES = UNCOMPRESSED_SYNTAXES + tuple(sorted(SUPPORTED_TRANSFER_SYNTAXES - set(UNCOMPRESSED_SYNTAXES)))

_OWN_OUTPUT_UIDS = frozenset(str(u) for u in OWN_OUTPUT_STORAGE)
# The header attributes the receiver needs; the rest of the dataset is not parsed.
_HEADER_TAGS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber", "PatientID",
                "Manufacturer")
# A file in .incoming not written for this long belongs to no live transfer: a transfer writes
# every PDU, and pynetdicom ends an association after 60 s without data (network_timeout).
STALE_INCOMING_S = 600.0
# Socket reads of at most this much; PDUs other than P-DATA (an association request with many
# presentation contexts) may exceed a small negotiated maximum up to this size.
_READ_SIZE = 1 << 20
_LARGEST_OTHER_PDU = 1 << 20
# While a dataset streams in, the free-space watermark is checked again every this many bytes.
_WATERMARK_EVERY = 16 << 20
_AE_FORBIDDEN = frozenset("\\") | frozenset(chr(c) for c in range(32)) | {chr(127)}


def _validate_ae_title(name: str, value: object) -> str:
    # PS3.5 6.2 AE: at most 16 characters, no backslash or control characters, not all spaces.
    if not isinstance(value, str) or not value.strip() or len(value) > 16 or _AE_FORBIDDEN & set(value):
        raise ValueError(f"{name}: {value!r} is not a valid AE title (1-16 characters, no backslash "
                         "or control characters)")
    return value.strip()


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(value)
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; compare them as IPv4.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class ReceiveSettings:
    """What the SCP listens on, whom it accepts, and the limits it keeps.

    ``allowed_calling_aes`` / ``allowed_peers`` empty means anyone; ``port`` 0 picks a free port
    (read it back from the server). ``min_free_bytes`` is the spool free-space watermark.
    """

    spool_root: Path
    model_id: str
    patient_salt: bytes = field(repr=False)
    port: int = 11112
    ae_title: str = "CXRBMD"
    bind_address: str = "127.0.0.1"
    allowed_calling_aes: tuple[str, ...] = ()
    allowed_peers: tuple[str, ...] = ()
    max_pdu: int = 262_144
    max_dataset_bytes: int = 512 * 1024 * 1024
    min_free_bytes: int = 1024 * 1024 * 1024

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once, at construction
        set_(self, "ae_title", _validate_ae_title("ae_title", self.ae_title))
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be an integer 0-65535, got {self.port!r}")
        try:
            _ip(self.bind_address)
        except ValueError:
            raise ValueError(f"bind_address: {self.bind_address!r} is not an IP address") from None
        if isinstance(self.allowed_calling_aes, str):
            raise ValueError("allowed_calling_aes: must be a tuple of AE titles, not one string")
        set_(self, "allowed_calling_aes",
             tuple(_validate_ae_title("allowed_calling_aes", ae) for ae in self.allowed_calling_aes))
        if isinstance(self.allowed_peers, str):
            raise ValueError("allowed_peers: must be a tuple of IP addresses, not one string")
        for peer in self.allowed_peers:
            try:
                _ip(peer)
            except ValueError:
                raise ValueError(f"allowed_peers: {peer!r} is not an IP address") from None
        set_(self, "allowed_peers", tuple(self.allowed_peers))
        # pynetdicom: 0 means no limit; DICOM's smallest sensible PDU is 4096 bytes (PS3.8 D.1).
        if not isinstance(self.max_pdu, int) or not (self.max_pdu == 0 or 4096 <= self.max_pdu < 2**32):
            raise ValueError(f"max_pdu: must be 0 (no limit) or 4096 to 2**32-1, got {self.max_pdu!r}")
        if not isinstance(self.max_dataset_bytes, int) or self.max_dataset_bytes <= 0:
            raise ValueError(f"max_dataset_bytes: must be a positive integer, got {self.max_dataset_bytes!r}")
        if not isinstance(self.min_free_bytes, int) or self.min_free_bytes < 0:
            raise ValueError(f"min_free_bytes: must be a non-negative integer, got {self.min_free_bytes!r}")
        if not isinstance(self.spool_root, (str, Path)) or str(self.spool_root) == "":
            raise ValueError(f"spool_root: must be a directory path, got {self.spool_root!r}")
        set_(self, "spool_root", Path(self.spool_root))
        if not isinstance(self.model_id, str) or not self.model_id.strip():
            raise ValueError("model_id: must be a non-empty string (jobs are queued per model id)")
        if not isinstance(self.patient_salt, bytes) or not self.patient_salt:
            raise ValueError("patient_salt: must be non-empty bytes (PatientID is stored hashed)")

    def peer_allowed(self, address: str) -> bool:
        if not self.allowed_peers:
            return True
        try:
            peer = _ip(address)
        except ValueError:
            return False
        return any(peer == _ip(allowed) for allowed in self.allowed_peers)

    def calling_ae_allowed(self, ae_title: str) -> bool:
        return not self.allowed_calling_aes or ae_title.strip() in self.allowed_calling_aes


# ---------------------------------------------------------------- audit


def record_event(session_factory: sessionmaker[Session], kind: str, outcome: str, **fields: Any) -> bool:
    """Write one audit row in its own transaction; False (and a log line) if the DB refuses.

    Used where no state changes (rejections, drops): a failing audit write must not turn a
    refusal into a success or crash the association thread.
    """
    try:
        with session_factory() as session:
            session.connection(execution_options={SQLITE_BEGIN: "IMMEDIATE"})
            session.add(Event(time=utcnow(), kind=kind, outcome=outcome, **fields))
            session.commit()
        return True
    except SQLAlchemyError:
        LOGGER.exception("audit event %s could not be written", kind)
        return False


def _peer(assoc: Any) -> dict[str, str | None]:
    calling = assoc.requestor.primitive.calling_ae_title if assoc.requestor.primitive else None
    return {"peer_ae": calling.strip() if calling else None,
            "peer_address": f"{assoc.requestor.address}:{assoc.requestor.port}"}


# ---------------------------------------------------------------- C-STORE logic


class StoreRefused(Exception):
    """A C-STORE that gets a failure status, with the audit reason code."""

    def __init__(self, status: int, reason_code: str, message: str) -> None:
        self.status = status
        self.reason_code = reason_code
        super().__init__(message)


@dataclass(frozen=True)
class _Header:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    accession_number: str | None
    patient_id: str | None
    manufacturer: str = ""

    @property
    def own_output(self) -> bool:
        """A result kind (SR, PR, KO, PDF: by SOP class, whoever wrote it), or anything we wrote
        (by Manufacturer: our result image is a Secondary Capture, which is also an input kind).
        The worker's eligibility check refuses the same Manufacturer."""
        return self.sop_class_uid in _OWN_OUTPUT_UIDS or self.manufacturer == MANUFACTURER


class Receiver:
    """Turns one received C-STORE into a spooled file + queued job, a drop, or a refusal."""

    def __init__(self, settings: ReceiveSettings, session_factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.session_factory = session_factory

    def store(self, event: NetEvent) -> int:
        peer = _peer(event.assoc)
        try:
            return self._store(event, peer)
        except StoreRefused as refused:
            LOGGER.warning("C-STORE refused (0x%04X): %s", refused.status, refused)
            if refused.status != OUT_OF_RESOURCES:
                # Resource failures are retried by the PACS and logged; refusals of the data
                # itself are what an administrator asks about, so they go to the audit.
                record_event(self.session_factory, "rejected", "error", reason_code=refused.reason_code,
                             message=str(refused)[:1000], **peer)
            return refused.status

    def _store(self, event: NetEvent, peer: dict[str, str | None]) -> int:
        # Chunked receive (start_scp): the dataset is already a Part 10 file in .incoming,
        # with file meta built from the command set and the accepted transfer syntax.
        received = Path(event.dataset_path)
        size = received.stat().st_size
        # TransferGuard aborts long before this; kept so the limit holds whatever the guard sees.
        if size > self.settings.max_dataset_bytes:
            raise StoreRefused(OUT_OF_RESOURCES, "too-large",
                               f"dataset of {size} bytes exceeds max_dataset_bytes "
                               f"{self.settings.max_dataset_bytes}")
        header = self._header(event, received)
        if header.own_output:
            # pynetdicom deletes the .incoming file after this handler returns.
            record_event(self.session_factory, "dropped_own_output", "skipped",
                         sop_instance_uid=header.sop_instance_uid, study_uid=header.study_uid,
                         accession_number=header.accession_number, reason_code="routing-loop",
                         message=f"SOP class {header.sop_class_uid} from {MANUFACTURER} is our own output; "
                                 "acknowledged and dropped", **peer)
            return SUCCESS
        try:
            check_watermark(self.settings.spool_root, self.settings.min_free_bytes)
        except SpoolFull as full:
            raise StoreRefused(OUT_OF_RESOURCES, "spool-full", str(full)) from full
        path = spool_path(self.settings.spool_root, header.study_uid, header.series_uid,
                          header.sop_instance_uid)
        try:
            size = move_into_spool(received, path)
        except OSError as error:
            raise StoreRefused(OUT_OF_RESOURCES, "spool-write", f"writing {path.name}: {error}") from error
        self._record(event, header, path, size, peer)
        # UIDs and the peer only: never a name (the patient ID reaches the database hashed).
        LOGGER.info("stored %s (%d bytes) from %s at %s", header.sop_instance_uid, size,
                    peer["peer_ae"], peer["peer_address"])
        return SUCCESS

    def _header(self, event: NetEvent, received: Path) -> _Header:
        try:
            # Only the few attributes we need, and never the pixel data.
            ds = dcmread(received, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
            sop_class = str(event.request.AffectedSOPClassUID)
            header = _Header(
                sop_class_uid=sop_class,
                sop_instance_uid=validate_uid("SOPInstanceUID", ds.get("SOPInstanceUID")),
                study_uid=validate_uid("StudyInstanceUID", ds.get("StudyInstanceUID")),
                series_uid=validate_uid("SeriesInstanceUID", ds.get("SeriesInstanceUID")),
                accession_number=str(ds.get("AccessionNumber", "")) or None,
                patient_id=str(ds.get("PatientID", "")) or None,
                manufacturer=str(ds.get("Manufacturer", "") or "").strip(),
            )
        except InvalidUID as invalid:
            raise StoreRefused(CANNOT_UNDERSTAND, f"invalid-{invalid.attribute}",
                               f"{invalid.attribute} is not a valid UID: {str(invalid.value)[:128]!r}") from invalid
        except Exception as error:  # pydicom raises many kinds on a malformed dataset
            raise StoreRefused(CANNOT_UNDERSTAND, "undecodable", f"dataset cannot be decoded: {error}") from error
        # The command set names the instance too, and the file meta is built from it.
        if str(event.request.AffectedSOPInstanceUID) != header.sop_instance_uid:
            raise StoreRefused(CANNOT_UNDERSTAND, "uid-mismatch",
                               "Affected SOP Instance UID differs from the dataset's SOPInstanceUID")
        return header

    def _record(self, event: NetEvent, header: _Header, path: Path, size: int,
                peer: dict[str, str | None]) -> None:
        received = ReceivedInstance(
            sop_instance_uid=header.sop_instance_uid, study_instance_uid=header.study_uid,
            series_instance_uid=header.series_uid, sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=str(event.context.transfer_syntax), spool_path=str(path),
            size_bytes=size, accession_number=header.accession_number, patient_id=header.patient_id,
            calling_ae=peer["peer_ae"], peer_address=peer["peer_address"],
        )
        try:
            with self.session_factory() as session:
                record_received(session, received, self.settings.model_id, self.settings.patient_salt)
        except OperationalError as error:
            # The file stays: without a row nothing reads it, and the PACS resend overwrites it.
            raise StoreRefused(OUT_OF_RESOURCES, "database-unavailable",
                               f"database unavailable: {error.orig}") from error


class TransferGuard:
    """Stops a dataset that outgrows ``max_dataset_bytes`` or the disk while it streams in.

    Receiver checks size and free space once a dataset is complete, and by then an oversized
    one is on disk already. This runs for every P-DATA PDU (EVT_PDU_RECV, in the association's
    reader thread), counts the dataset bytes of the message in progress, and aborts the
    association (A-ABORT) as soon as they pass the limit or free space falls under the
    watermark. The sender gets no Success, so it keeps the image; the partial file in
    .incoming is swept.
    """

    _ABORTED = -1

    def __init__(self, settings: ReceiveSettings, session_factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.session_factory = session_factory
        # Dataset bytes so far per association; an association's entry goes with it.
        self._received: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def __call__(self, event: NetEvent) -> None:
        if not isinstance(event.pdu, P_DATA_TF):
            return
        assoc = event.assoc
        with self._lock:
            total = self._received.get(assoc, 0)
        if total == self._ABORTED:
            return
        for item in event.pdu.presentation_data_value_items:
            value = item.presentation_data_value or b"\x00"
            if value[0] & 0x01:  # message control header: a command fragment
                continue
            before, total = total, total + len(value) - 1
            refusal = self._check(before, total)
            if refusal is not None:
                self._abort(event, *refusal)
                total = self._ABORTED
                break
            if value[0] & 0x02:  # the dataset's last fragment: the next message starts at 0
                total = 0
        with self._lock:
            self._received[assoc] = total

    def _check(self, before: int, total: int) -> tuple[str, str] | None:
        limit = self.settings.max_dataset_bytes
        if total > limit:
            return "too-large", f"dataset passed max_dataset_bytes {limit} while arriving; association aborted"
        if total // _WATERMARK_EVERY > before // _WATERMARK_EVERY:
            try:
                check_watermark(self.settings.spool_root, self.settings.min_free_bytes)
            except SpoolFull as full:
                return "spool-full", f"{full} while a dataset was arriving; association aborted"
        return None

    def _abort(self, event: NetEvent, reason_code: str, message: str) -> None:
        LOGGER.warning("aborting association: %s", message)
        record_event(self.session_factory, "rejected", "error", reason_code=reason_code, message=message,
                     **_peer(event.assoc))
        event.assoc.abort(block=False)  # inside a handler: queue the A-ABORT, do not wait for it


# ---------------------------------------------------------------- network layer


def _handle_echo(event: NetEvent) -> int:
    return SUCCESS


def _handle_store(event: NetEvent, receiver: Receiver) -> int:
    try:
        return receiver.store(event)
    except Exception:
        LOGGER.exception("C-STORE handler failed")
        return UNABLE_TO_PROCESS


def _reject(event: NetEvent, session_factory: sessionmaker[Session], reason: int, message: str) -> None:
    assoc = event.assoc
    LOGGER.warning("association rejected: %s", message)
    # Audit first: once the peer has the A-ASSOCIATE-RJ, the refusal must already be on record.
    record_event(session_factory, "association_rejected", "rejected",
                 reason_code=_REASON_NAMES[reason], message=message, **_peer(assoc))
    assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, reason)
    # As pynetdicom's own ACSE does: wait until the DUL has sent the A-ASSOCIATE-RJ and the peer
    # closed, otherwise the caller closes the socket first and the peer sees only an abort.
    assoc.kill()


def _handle_requested(event: NetEvent, settings: ReceiveSettings,
                      session_factory: sessionmaker[Session]) -> None:
    """Check the peer before pynetdicom negotiates; a rejection here skips negotiation."""
    assoc = event.assoc
    rq = assoc.requestor.primitive
    calling, called = rq.calling_ae_title.strip(), rq.called_ae_title.strip()
    if not settings.peer_allowed(assoc.requestor.address):
        _reject(event, session_factory, REASON_NO_REASON,
                f"peer address {assoc.requestor.address} not in allowed_peers")
    elif not settings.calling_ae_allowed(calling):
        _reject(event, session_factory, REASON_CALLING_AE,
                f"calling AE title {calling!r} not recognised")
    elif called != settings.ae_title:
        _reject(event, session_factory, REASON_CALLED_AE,
                f"called AE title {called!r} is not {settings.ae_title!r}")


def _handle_rejected(event: NetEvent, session_factory: sessionmaker[Session]) -> None:
    """Audit rejections made by pynetdicom itself (e.g. too many associations)."""
    primitive = event.assoc.acceptor.primitive
    reason = getattr(primitive, "diagnostic", None)
    record_event(session_factory, "association_rejected", "rejected",
                 reason_code=_REASON_NAMES.get(reason, f"diagnostic-{reason}") if reason else None,
                 message=f"rejected by the association layer (source {getattr(primitive, 'result_source', None)})",
                 **_peer(event.assoc))


def build_ae(settings: ReceiveSettings, session_factory: sessionmaker[Session]) -> AE:
    """An AE with our presentation contexts and the settings' AE title checks."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    # Belt and braces behind the EVT_REQUESTED handler: pynetdicom checks these itself too.
    ae.require_called_aet = True
    ae.require_calling_aet = list(settings.allowed_calling_aes)
    ae.add_supported_context(Verification)
    for sop_class in IMAGE_STORAGE:
        ae.add_supported_context(sop_class, list(IMAGE_SYNTAXES))
    for sop_class in OWN_OUTPUT_STORAGE:
        ae.add_supported_context(sop_class, list(UNCOMPRESSED_SYNTAXES))
    return ae


def event_handlers(settings: ReceiveSettings, session_factory: sessionmaker[Session],
                   receiver: Receiver | None = None) -> list[Any]:
    receiver = receiver or Receiver(settings, session_factory)
    return [
        (evt.EVT_PDU_RECV, TransferGuard(settings, session_factory)),
        (evt.EVT_REQUESTED, _handle_requested, [settings, session_factory]),
        (evt.EVT_REJECTED, _handle_rejected, [session_factory]),
        (evt.EVT_C_ECHO, _handle_echo),
        (evt.EVT_C_STORE, _handle_store, [receiver]),
    ]


class _BulkReceiveSocket(AssociationSocket):
    """pynetdicom's socket, reading each PDU with as few system calls as the kernel allows.

    ``AssociationSocket.recv`` reads at most 4 KiB per call: about 1,800 calls for a 7 MB
    radiograph, each releasing and retaking the GIL against the other associations' threads.
    Here each call takes up to 1 MiB, whatever the kernel holds. The buffer grows only as bytes
    arrive: a PDU header announcing 4 GiB must not allocate 4 GiB before one byte of it came.
    A PDU longer than the maximum we negotiated (and than any association request needs) is a
    protocol violation; raising OSError makes pynetdicom close the connection (Evt17).
    Same contract otherwise: a short result means the peer closed the connection.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        limit = self._assoc.acceptor.maximum_length  # our max PDU; 0 = no limit
        if limit and nr_bytes > max(limit, _LARGEST_OTHER_PDU):
            raise OSError(f"peer announced a PDU of {nr_bytes} bytes; the maximum is {limit}")
        sock = self.socket
        assert sock is not None  # the DUL only reads from a connected socket
        buffer = bytearray()
        while len(buffer) < nr_bytes:
            chunk = sock.recv(min(nr_bytes - len(buffer), _READ_SIZE))
            if not chunk:
                break
            buffer += chunk
        return buffer


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server; optionally one of several sharing a port (SO_REUSEPORT)."""

    def __init__(self, *args: Any, reuse_port: bool = False, **kwargs: Any) -> None:
        self.reuse_port = reuse_port  # read by server_bind, which the base __init__ calls
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.reuse_port:
            # Every socket of a SO_REUSEPORT group must set it before bind; Linux then spreads
            # new connections across the processes listening (screener.node.receivers).
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class _RequestHandler(RequestHandler):
    """pynetdicom's acceptor, with the bulk-receive socket."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        # The socket was just built by the base class around our connection; a subclass that
        # only overrides recv and adds no state can stand in for it.
        assoc.dul.socket.__class__ = _BulkReceiveSocket
        return assoc


def start_scp(settings: ReceiveSettings, session_factory: sessionmaker[Session],
              receiver: Receiver | None = None, *, reuse_port: bool = False) -> ThreadedAssociationServer:
    """Start listening in background threads; returns the server (``stop`` it when done).

    ``reuse_port``: bind with SO_REUSEPORT, to share the port with other processes' SCPs
    (see screener.node.receivers, which also checks that nothing else holds the port).

    Switches on pynetdicom's chunked receive, a process-wide option (pynetdicom has no
    per-server one): datasets stream to files in the process's temporary directory, never
    whole in memory. A receive process points that directory at ``<spool>/.incoming``
    (screener.node.receivers) so the finished file is renamed into the spool; from a temporary
    directory on another file system it is copied instead.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    settings.spool_root.mkdir(parents=True, exist_ok=True)
    ae = build_ae(settings, session_factory)
    server = ae.make_server((settings.bind_address, settings.port),
                            evt_handlers=event_handlers(settings, session_factory, receiver),
                            server_class=_Server, request_handler=_RequestHandler, reuse_port=reuse_port)
    # What AE.start_server(block=False) does, which has no way to pass a request handler.
    ae._servers.append(server)  # server.shutdown() takes itself off this list
    threading.Thread(target=server.serve_forever, name=f"scp-{settings.ae_title}", daemon=True).start()
    return server


def bound_port(server: ThreadedAssociationServer) -> int:
    """The port the server listens on (useful with ``port=0``)."""
    return int(server.server_address[1])


def stop(server: ThreadedAssociationServer) -> None:
    """Stop accepting, close the socket and end the server's AE."""
    server.shutdown()
    server.ae.shutdown()
