"""DICOM C-STORE / C-ECHO SCP: AE titles, allow-lists, limits, and the ack-only-on-disk rule.

The network layer (the pynetdicom handlers here) checks who is calling and hands each C-STORE
to a :class:`Receiver` as a plain :class:`StoreRequest`; the Receiver decides what the dataset
becomes: a spooled file plus a queued job, an acknowledged-and-dropped routing-loop object, or
a failure status. The C-STORE response says Success only after the file is fsynced and renamed
and its row committed (ARCHITECTURE.md, "ack only what is on disk"); when that cannot be done
the answer is 0xA700 Out of Resources, so the PACS retries, or a 0xC000-range status for data
we cannot accept.

Datasets are never held in memory whole: pynetdicom's chunked receive writes each P-DATA
fragment to a file as it arrives (in ``<spool>/.incoming`` in a receive process, see
screener.node.receivers), and the handler moves the finished file into the spool. Memory per
association stays at about one PDU whatever the image size. :class:`TransferGuard` aborts a
transfer that outgrows the size limit or the disk while it arrives; a deflated dataset is
inflated under the same limit, in bounded chunks, before its header is read.

Hostile peers cannot hold the node: every PDU must arrive within ``network_timeout_s`` and an
association request within ``acse_timeout_s`` of connecting (screener.node.compat.DeadlineSocket);
at most ``max_associations`` associations are open at once per receive process, at most
``max_associations_per_peer`` of them from one address, and connections that have not yet
asked for an association are capped too (:class:`_Server`). Refusals of connections and
associations are audited at most once a minute per peer and reason (:class:`RefusalAudit`), so
a flood cannot grow the events table without bound.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import queue
import socket
import ssl
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom import uid as tsuid
from pydicom.filereader import _read_file_meta_info, read_preamble  # the file meta, leaving fp after it
from pydicom.filereader import read_dataset as read_pydicom_dataset
from pynetdicom import AE, evt
from pynetdicom.events import Event as NetEvent
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
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
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from screener import MANUFACTURER
from screener.codes import ReasonCode
from screener.node import compat
from screener.node.aetitle import validate_ae_title
from screener.node.spool import (
    InvalidUID,
    SpoolFull,
    check_watermark,
    move_into_spool,
    spool_path,
    validate_uid,
)
from screener.pipeline.decode import SUPPORTED_TRANSFER_SYNTAXES, inflated_prefix
from screener.safe_text import quote, scrub
from screener.store.db import SQLITE_BEGIN
from screener.store.models import Event, utcnow
from screener.store.queue import ReceivedInstance, record_received, repoint_instance

LOGGER = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 B.2.3; 0xC210 and 0xC211 are the values pynetdicom itself uses).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210  # dataset unreadable or its UIDs unusable as spool names
UNABLE_TO_PROCESS = 0xC211  # an unexpected error in our code: never Success

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, diagnostic.
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01
SOURCE_SERVICE_PROVIDER_ACSE = 0x02
SOURCE_SERVICE_PROVIDER_PRESENTATION = 0x03
REASON_NO_REASON = 0x01
REASON_CALLING_AE = 0x03
REASON_CALLED_AE = 0x07
REASON_LOCAL_LIMIT = 0x02  # with source 3
#: (source, diagnostic) -> reason code; the diagnostic values mean different things per source.
REJECT_REASONS: dict[tuple[int, int], ReasonCode] = {
    (SOURCE_SERVICE_USER, 0x01): ReasonCode.NO_REASON_GIVEN,
    (SOURCE_SERVICE_USER, 0x02): ReasonCode.APPLICATION_CONTEXT_NOT_SUPPORTED,
    (SOURCE_SERVICE_USER, 0x03): ReasonCode.CALLING_AE_NOT_RECOGNISED,
    (SOURCE_SERVICE_USER, 0x07): ReasonCode.CALLED_AE_NOT_RECOGNISED,
    (SOURCE_SERVICE_PROVIDER_ACSE, 0x01): ReasonCode.NO_REASON_GIVEN,
    (SOURCE_SERVICE_PROVIDER_ACSE, 0x02): ReasonCode.PROTOCOL_VERSION_NOT_SUPPORTED,
    (SOURCE_SERVICE_PROVIDER_PRESENTATION, 0x01): ReasonCode.TEMPORARY_CONGESTION,
    (SOURCE_SERVICE_PROVIDER_PRESENTATION, 0x02): ReasonCode.LOCAL_LIMIT_EXCEEDED,
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
# The header attributes the receiver needs (all in groups 0008-0020); nothing after them is read.
_HEADER_TAGS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber", "PatientID",
                "Manufacturer")
_LAST_HEADER_TAG = 0x0020000E  # SeriesInstanceUID: the highest of _HEADER_TAGS
# Inflated bytes kept for the header read of a deflated dataset: the attributes above come
# before any pixel data and, in every real header, within the first few kilobytes.
_HEADER_BYTES = 4 << 20
_UID_ATTRIBUTE_CODES = {
    "SOPInstanceUID": ReasonCode.INVALID_SOP_INSTANCE_UID,
    "StudyInstanceUID": ReasonCode.INVALID_STUDY_INSTANCE_UID,
    "SeriesInstanceUID": ReasonCode.INVALID_SERIES_INSTANCE_UID,
}
# A file in .incoming not written for this long belongs to no live transfer: a transfer writes
# every PDU, and a PDU must arrive within network_timeout_s (plus its length at 64 KiB/s).
STALE_INCOMING_S = 600.0


def stale_incoming_s(settings: ReceiveSettings) -> float:
    """How old a partial file in .incoming must be before it is swept, for these settings."""
    return max(STALE_INCOMING_S, 2 * settings.network_timeout_s + settings.max_pdu / compat.MIN_BYTES_PER_S)
# While a dataset streams in, the free-space watermark is checked again every this many bytes.
_WATERMARK_EVERY = 16 << 20
# Connections that have not (yet) sent an association request, per receive process: this many
# times the association limits. They last at most acse_timeout_s each.
_CONNECTIONS_PER_ASSOCIATION = 2


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(value)
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; compare them as IPv4.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _same_ip(a: str, b: str) -> bool:
    try:
        return _ip(a) == _ip(b)
    except ValueError:
        return a == b


def _positive_number(key: str, value: object, upper: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= upper:
        raise ValueError(f"{key}: must be a number of seconds above 0 and at most {upper:g}, got {value!r}")


def _count(key: str, value: object, upper: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ValueError(f"{key}: must be a whole number from 1 to {upper}, got {value!r}")


@dataclass(frozen=True)
class ReceiveSettings:
    """What the SCP listens on, whom it accepts, and the limits it keeps.

    ``allowed_calling_aes`` / ``allowed_peers`` empty means anyone; ``port`` 0 picks a free port
    (read it back from the server). ``min_free_bytes`` is the spool free-space watermark.
    The association limits hold per receive process.
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
    #: From the TCP connection to a complete A-ASSOCIATE-RQ (and pynetdicom's ARTIM timer).
    acse_timeout_s: float = 5.0
    #: Longest silence between PDUs of an association, and longest time one PDU may take.
    network_timeout_s: float = 60.0
    max_associations: int = 16
    max_associations_per_peer: int = 8
    #: DICOM TLS (PS3.15 B.1, TLS 1.2 or later) on a port of its own, next to the plain one;
    #: 0 = off. The certificate and key (PEM) are the node's; ``tls_ca_file`` set = mutual TLS:
    #: a client must present a certificate signed by that CA.
    tls_port: int = 0
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    #: False: no plain (unencrypted) listener, DICOM TLS on ``tls_port`` only.
    plain: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once, at construction
        set_(self, "ae_title", validate_ae_title("ae_title", self.ae_title))
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be an integer 0-65535, got {self.port!r}")
        try:
            _ip(self.bind_address)
        except ValueError:
            raise ValueError(f"bind_address: {self.bind_address!r} is not an IP address") from None
        if isinstance(self.allowed_calling_aes, str):
            raise ValueError("allowed_calling_aes: must be a tuple of AE titles, not one string")
        set_(self, "allowed_calling_aes",
             tuple(validate_ae_title("allowed_calling_aes", ae) for ae in self.allowed_calling_aes))
        if isinstance(self.allowed_peers, str):
            raise ValueError("allowed_peers: must be a tuple of IP addresses, not one string")
        for peer in self.allowed_peers:
            try:
                _ip(peer)
            except ValueError:
                raise ValueError(f"allowed_peers: {peer!r} is not an IP address") from None
        set_(self, "allowed_peers", tuple(self.allowed_peers))
        # DICOM's smallest sensible PDU is 4096 bytes (PS3.8 D.1). No "0 = no limit": every PDU
        # is buffered whole before pynetdicom decodes it, so the limit bounds memory per peer.
        if isinstance(self.max_pdu, bool) or not isinstance(self.max_pdu, int) or not 4096 <= self.max_pdu <= 16 << 20:
            raise ValueError(f"max_pdu: must be 4096 to {16 << 20} bytes, got {self.max_pdu!r}")
        if isinstance(self.max_dataset_bytes, bool) or not isinstance(self.max_dataset_bytes, int) \
                or self.max_dataset_bytes <= 0:
            raise ValueError(f"max_dataset_bytes: must be a positive integer, got {self.max_dataset_bytes!r}")
        if not isinstance(self.min_free_bytes, int) or self.min_free_bytes < 0:
            raise ValueError(f"min_free_bytes: must be a non-negative integer, got {self.min_free_bytes!r}")
        _positive_number("acse_timeout_s", self.acse_timeout_s, 600)
        _positive_number("network_timeout_s", self.network_timeout_s, 3600)
        _count("max_associations", self.max_associations, 1024)
        _count("max_associations_per_peer", self.max_associations_per_peer, 1024)
        if self.max_associations_per_peer > self.max_associations:
            raise ValueError(f"max_associations_per_peer: {self.max_associations_per_peer} is more than "
                             f"max_associations {self.max_associations}; one peer could take every slot")
        if isinstance(self.tls_port, bool) or not isinstance(self.tls_port, int) or not 0 <= self.tls_port <= 65535:
            raise ValueError(f"tls_port: must be an integer 0-65535 (0 = no TLS), got {self.tls_port!r}")
        if self.plain and self.tls_port and self.tls_port == self.port:
            raise ValueError(f"tls_port: {self.tls_port} is the plain port too; give TLS its own port")
        if not self.plain and not self.tls_port:
            raise ValueError("plain: false needs a tls_port (the node would listen nowhere)")
        if self.tls_port and not (self.tls_cert_file and self.tls_key_file):
            raise ValueError("tls_cert_file: a TLS port needs the node's certificate and key (tls_cert_file, "
                             "tls_key_file, PEM)")
        if not isinstance(self.spool_root, (str, Path)) or str(self.spool_root) == "":
            raise ValueError(f"spool_root: must be a directory path, got {self.spool_root!r}")
        set_(self, "spool_root", Path(self.spool_root))
        if not isinstance(self.model_id, str) or not self.model_id.strip():
            raise ValueError("model_id: must be a non-empty string (jobs are queued per model id)")
        if not isinstance(self.patient_salt, bytes) or not self.patient_salt:
            raise ValueError("patient_salt: must be non-empty bytes (PatientID is stored hashed)")

    def ssl_context(self) -> ssl.SSLContext:
        """The server side of DICOM TLS: TLS 1.2+, our certificate, the client's verified
        against ``tls_ca_file`` when one is given (else no client certificate is asked for)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        if self.tls_ca_file:
            context.load_verify_locations(self.tls_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def peer_allowed(self, address: str) -> bool:
        if not self.allowed_peers:
            return True
        return any(_same_ip(address, allowed) for allowed in self.allowed_peers)

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


def _peer_key(peer_address: str | None) -> str:
    """The address a refusal is counted under: the IPv4 address, or the IPv6 /64 (one host
    has a whole /64 to pick addresses from)."""
    host = (peer_address or "").rsplit(":", 1)[0].strip("[]")
    try:
        address = _ip(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class RefusalAudit:
    """Audit of refused connections and associations, at most one row (and one log line) per
    peer address and reason per ``window_s``; the next row says how many were counted only.

    A peer opening thousands of connections a minute must not grow the events table (or
    hold the database's write lock) at that rate; an administrator still sees who, why and
    how often. ``wait=False`` hands the row to a background writer (bounded queue): the
    accepting thread must never wait for the database, or a locked database would stop
    the node accepting anyone.
    """

    _QUEUE = 1000

    def __init__(self, session_factory: sessionmaker[Session], window_s: float = 60.0) -> None:
        self.session_factory = session_factory
        self.window_s = window_s
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str, str], tuple[float, int]] = {}  # key -> (window start, suppressed)
        self._pending: queue.Queue[dict[str, Any]] = queue.Queue(self._QUEUE)
        self._writer: threading.Thread | None = None

    def __call__(self, kind: str, outcome: str, reason_code: ReasonCode, message: str,
                 peer_ae: str | None, peer_address: str | None, *, wait: bool = True) -> bool:
        """Record (or count) one refusal; True when a row was written (or queued)."""
        ip = _peer_key(peer_address)
        key = (kind, str(reason_code), ip)
        now = time.monotonic()
        with self._lock:
            start, suppressed = self._seen.get(key, (-1e18, 0))
            if now - start < self.window_s:
                self._seen[key] = (start, suppressed + 1)
                return False
            self._seen[key] = (now, 0)
            if len(self._seen) > 10_000:  # forget quiet keys; a flood from many addresses is bounded too
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window_s}
        if suppressed:
            message += f" ({suppressed} more from {ip} in the {self.window_s:g} s before were counted, not recorded)"
        LOGGER.warning("%s from %s: %s", kind.replace("_", " "), peer_address, message)
        row = dict(kind=kind, outcome=outcome, reason_code=reason_code.value, message=message[:1000],
                   peer_ae=peer_ae, peer_address=peer_address)
        if wait:
            return record_event(self.session_factory, **row)
        try:
            self._pending.put_nowait(row)
        except queue.Full:
            return False
        with self._lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write, name="refusal-audit", daemon=True)
                self._writer.start()
        return True

    def _write(self) -> None:
        while True:
            row = self._pending.get()
            record_event(self.session_factory, **row)


def _peer(assoc: Any) -> dict[str, str | None]:
    primitive = assoc.requestor.primitive
    calling = primitive.calling_ae_title if primitive else None
    return {"peer_ae": calling.strip()[:16] if calling else None,
            "peer_address": f"{assoc.requestor.address}:{assoc.requestor.port}"}


# ---------------------------------------------------------------- C-STORE logic


class StoreRefused(Exception):
    """A C-STORE that gets a failure status, with the audit reason code."""

    def __init__(self, status: int, reason_code: ReasonCode, message: str) -> None:
        self.status = status
        self.reason_code = reason_code
        super().__init__(message)


@dataclass(frozen=True)
class StoreRequest:
    """One received C-STORE, as the network layer hands it over.

    ``path`` is the complete dataset, a Part 10 file with file meta built from the command set
    and the accepted transfer syntax (pynetdicom's chunked receive); the SOP class and
    instance UIDs are the command's (Affected SOP Class / Instance UID).
    """

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str | None = None
    peer_address: str | None = None

    @property
    def peer(self) -> dict[str, str | None]:
        return {"peer_ae": self.calling_ae, "peer_address": self.peer_address}


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


def read_header(path: Path, max_dataset_bytes: int) -> pydicom.Dataset:
    """The attributes in ``_HEADER_TAGS`` of a received Part 10 file, reading nothing after them.

    A deflated dataset is inflated in bounded chunks and only counted past the header: pydicom
    would inflate it whole in memory (a 3 MB "deflate bomb" can inflate to gigabytes). If it
    inflates past ``max_dataset_bytes``, StoreRefused (0xA700, inflates-too-large), the same
    limit a plain dataset is held to while it arrives.
    """
    with path.open("rb") as fp:
        read_preamble(fp, False)
        syntax = _read_file_meta_info(fp).get("TransferSyntaxUID")  # leaves fp at the dataset
        source: Any = fp
        if syntax == tsuid.DeflatedExplicitVRLittleEndian:
            prefix = inflated_prefix(fp, max_dataset_bytes, _HEADER_BYTES)
            if prefix is None:
                raise StoreRefused(OUT_OF_RESOURCES, ReasonCode.INFLATES_TOO_LARGE,
                                   f"the deflated dataset inflates to more than max_dataset_bytes {max_dataset_bytes}")
            source = io.BytesIO(prefix)
        implicit = syntax == tsuid.ImplicitVRLittleEndian
        little = syntax != tsuid.ExplicitVRBigEndian
        # defer_size: a large value before the last tag we need is skipped, not read
        return read_pydicom_dataset(source, implicit, little, defer_size=65536,
                                    stop_when=lambda tag, vr, length: tag > _LAST_HEADER_TAG)


class Receiver:
    """Turns one received C-STORE into a spooled file + queued job, a drop, or a refusal."""

    def __init__(self, settings: ReceiveSettings, session_factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.session_factory = session_factory
        settings.spool_root.mkdir(parents=True, exist_ok=True)

    def store(self, request: StoreRequest) -> int:
        """The C-STORE status for ``request``; every refusal but a resource one is audited."""
        try:
            return self._store(request)
        except StoreRefused as refused:
            LOGGER.warning("C-STORE refused (0x%04X, %s): %s", refused.status, refused.reason_code, refused)
            if refused.status != OUT_OF_RESOURCES or refused.reason_code is ReasonCode.INFLATES_TOO_LARGE:
                # Resource failures are retried by the PACS and logged; refusals of the data
                # itself are what an administrator asks about, so they go to the audit.
                record_event(self.session_factory, "rejected", "error", reason_code=refused.reason_code.value,
                             sop_instance_uid=_valid_uid_or_none(request.sop_instance_uid),
                             message=str(refused)[:1000], **request.peer)
            return refused.status

    def _store(self, request: StoreRequest) -> int:
        received = request.path
        size = received.stat().st_size
        # TransferGuard aborts long before this; kept so the limit holds whatever the guard sees.
        if size > self.settings.max_dataset_bytes:
            raise StoreRefused(OUT_OF_RESOURCES, ReasonCode.TOO_LARGE,
                               f"dataset of {size} bytes exceeds max_dataset_bytes {self.settings.max_dataset_bytes}")
        header = self._header(request)
        if header.own_output:
            # pynetdicom deletes the .incoming file after this handler returns.
            record_event(self.session_factory, "dropped_own_output", "skipped",
                         sop_instance_uid=header.sop_instance_uid, study_uid=header.study_uid,
                         accession_number=header.accession_number, reason_code=ReasonCode.ROUTING_LOOP.value,
                         message=f"SOP class {header.sop_class_uid} from {MANUFACTURER} is our own output; "
                                 "acknowledged and dropped", **request.peer)
            return SUCCESS
        try:
            check_watermark(self.settings.spool_root, self.settings.min_free_bytes)
        except SpoolFull as full:
            raise StoreRefused(OUT_OF_RESOURCES, ReasonCode.SPOOL_FULL, str(full)) from full
        path = spool_path(self.settings.spool_root, header.study_uid, header.series_uid, header.sop_instance_uid)
        try:
            size = move_into_spool(received, path)
        except OSError as error:
            raise StoreRefused(OUT_OF_RESOURCES, ReasonCode.SPOOL_WRITE, f"writing {path.name}: {error}") from error
        self._record(request, header, path, size)
        # UIDs and the peer only: never a name (the patient ID reaches the database hashed).
        LOGGER.info("stored %s (%d bytes) from %s at %s", header.sop_instance_uid, size,
                    request.calling_ae, request.peer_address)
        return SUCCESS

    def _header(self, request: StoreRequest) -> _Header:
        try:
            ds = read_header(request.path, self.settings.max_dataset_bytes)
            header = _Header(
                sop_class_uid=request.sop_class_uid,
                sop_instance_uid=validate_uid("SOPInstanceUID", ds.get("SOPInstanceUID")),
                study_uid=validate_uid("StudyInstanceUID", ds.get("StudyInstanceUID")),
                series_uid=validate_uid("SeriesInstanceUID", ds.get("SeriesInstanceUID")),
                accession_number=str(ds.get("AccessionNumber", "")) or None,
                patient_id=str(ds.get("PatientID", "")) or None,
                manufacturer=str(ds.get("Manufacturer", "") or "").strip(),
            )
        except StoreRefused:
            raise
        except InvalidUID as invalid:
            raise StoreRefused(CANNOT_UNDERSTAND, _UID_ATTRIBUTE_CODES[invalid.attribute],
                               f"{invalid.attribute} is not a valid UID: {quote(invalid.value, 'UI')}") from invalid
        except Exception as error:  # pydicom raises many kinds on a malformed dataset
            raise StoreRefused(CANNOT_UNDERSTAND, ReasonCode.UNDECODABLE,
                               f"dataset cannot be decoded: {type(error).__name__}: {scrub(error)}") from error
        # The command set names the instance too, and the file meta is built from it.
        if request.sop_instance_uid != header.sop_instance_uid:
            raise StoreRefused(CANNOT_UNDERSTAND, ReasonCode.UID_MISMATCH,
                               "Affected SOP Instance UID differs from the dataset's SOPInstanceUID")
        return header

    def _record(self, request: StoreRequest, header: _Header, path: Path, size: int) -> None:
        received = ReceivedInstance(
            sop_instance_uid=header.sop_instance_uid, study_instance_uid=header.study_uid,
            series_instance_uid=header.series_uid, sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=request.transfer_syntax_uid, spool_path=str(path),
            size_bytes=size, accession_number=header.accession_number, patient_id=header.patient_id,
            calling_ae=request.calling_ae, peer_address=request.peer_address,
        )
        try:
            with self.session_factory() as session:
                instance, _, _ = record_received(session, received, self.settings.model_id,
                                                         self.settings.patient_salt)
        except OperationalError as error:
            # Without a row nothing reads the file; retention's orphan sweep removes it (it may
            # also be the very file an earlier row points at, re-sent: so not deleted here).
            raise StoreRefused(OUT_OF_RESOURCES, ReasonCode.DATABASE_UNAVAILABLE,
                               f"database unavailable: {scrub(error.orig)}") from error
        if instance.spool_path == str(path):
            return
        # The same SOP instance again under another study or series (or a data folder that
        # moved): one copy is on record, and the other would be an unreferenced copy of a
        # patient's image. Keep the one on record while it is there; once retention removed
        # it, this copy takes its place (a job for a new model version will read it).
        if Path(instance.spool_path).is_file():
            path.unlink(missing_ok=True)
            return
        try:
            with self.session_factory() as session:
                repoint_instance(session, instance.id, str(path), size)
        except OperationalError as error:
            raise StoreRefused(OUT_OF_RESOURCES, ReasonCode.DATABASE_UNAVAILABLE,
                               f"database unavailable: {scrub(error.orig)}") from error


def _valid_uid_or_none(value: str) -> str | None:
    try:
        return validate_uid("SOPInstanceUID", value)
    except InvalidUID:
        return None


#: Command fields the SCP serves (PS3.7 E.1): C-STORE-RQ and C-ECHO-RQ.
_C_STORE_RQ = 0x0001
_C_ECHO_RQ = 0x0030
_LARGEST_COMMAND = 64 * 1024  # a C-STORE-RQ command set is about 200 bytes


def check_command(command: bytes) -> tuple[ReasonCode, str] | None:
    """The refusal for a complete DIMSE command set (Implicit VR Little Endian), or None."""
    try:
        ds = read_pydicom_dataset(io.BytesIO(command), True, True)
        field_ = int(ds.get((0x0000, 0x0100)).value)
    except Exception as error:
        return ReasonCode.INVALID_COMMAND, f"the command set cannot be decoded ({type(error).__name__})"
    if field_ == _C_ECHO_RQ:
        return None
    if field_ != _C_STORE_RQ:
        return ReasonCode.INVALID_COMMAND, f"command field 0x{field_:04X} is not a C-STORE or C-ECHO request"
    for tag, name in (((0x0000, 0x0002), "Affected SOP Class UID"), ((0x0000, 0x1000), "Affected SOP Instance UID")):
        element = ds.get(tag)
        raw = element.value if element is not None else None
        if isinstance(raw, bytes):
            raw = raw.decode("ascii", "replace")
        value = str(raw or "").rstrip("\x00 ")
        # Only what pynetdicom cannot survive: a UID of the right length but wrong characters
        # reaches the Receiver, which answers 0xC210 for that one object.
        if not value or len(value) > 64:
            what = "missing or empty" if not value else f"{len(value)} characters long (at most 64)"
            return ReasonCode.INVALID_COMMAND, f"C-STORE request: {name} (0000,{tag[1]:04X}) is {what}"
    return None


class TransferGuard:
    """Checks every P-DATA PDU as it arrives (EVT_PDU_RECV, in the association's reader
    thread), before pynetdicom decodes it, and aborts the association (A-ABORT) when:

    - a dataset outgrows ``max_dataset_bytes`` or free space falls under the watermark while
      it streams in (Receiver checks once a dataset is complete, and by then an oversized one
      is on disk already); the sender gets no Success, so it keeps the image;
    - a fragment names a presentation context that was not accepted, or a command set cannot
      be decoded, is not a C-STORE or C-ECHO request, or a C-STORE request's Affected SOP
      Class / Instance UID is missing, empty or longer than 64 characters.
      pynetdicom 3 would end such an association without a word (its reader thread dies on
      the exception, leaving the peer waiting and the partial file behind), or answer nothing
      at all; here each is refused cleanly and audited with its reason.

    The partial file in .incoming is swept. Aborts made here are remembered, so the A-ABORT
    audit for pynetdicom's own aborts (``_handle_pdu_sent``) does not count them twice.
    """

    _ABORTED = -1

    def __init__(self, settings: ReceiveSettings, session_factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.session_factory = session_factory
        # Dataset bytes so far per association; an association's entry goes with it.
        self._received: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._commands: weakref.WeakKeyDictionary[Any, bytearray] = weakref.WeakKeyDictionary()
        self.aborted: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def __call__(self, event: NetEvent) -> None:
        if not isinstance(event.pdu, P_DATA_TF):
            return
        assoc = event.assoc
        with self._lock:
            total = self._received.get(assoc, 0)
        if total == self._ABORTED:
            return
        accepted = {cx.context_id for cx in assoc.accepted_contexts}
        for item in event.pdu.presentation_data_value_items:
            value = item.presentation_data_value or b"\x00"
            refusal = None
            if item.presentation_context_id not in accepted:
                refusal = (ReasonCode.UNKNOWN_PRESENTATION_CONTEXT,
                           f"data on presentation context {item.presentation_context_id}, which was not accepted")
            elif value[0] & 0x01:  # message control header: a command fragment
                command = self._commands.setdefault(assoc, bytearray())
                command += value[1:]
                if len(command) > _LARGEST_COMMAND:
                    refusal = ReasonCode.INVALID_COMMAND, f"command set longer than {_LARGEST_COMMAND} bytes"
                elif value[0] & 0x02:  # the command's last fragment
                    refusal = check_command(bytes(command))
                    command.clear()
            else:
                before, total = total, total + len(value) - 1
                refusal = self._check(before, total)
                if refusal is None and value[0] & 0x02:  # the dataset's last fragment: the next starts at 0
                    total = 0
            if refusal is not None:
                # Nothing of this PDU reaches pynetdicom's decoder: the abort is all that happens.
                event.pdu.presentation_data_value_items = []
                self._abort(event, *refusal)
                total = self._ABORTED
                break
        with self._lock:
            self._received[assoc] = total

    def _check(self, before: int, total: int) -> tuple[ReasonCode, str] | None:
        limit = self.settings.max_dataset_bytes
        if total > limit:
            return ReasonCode.TOO_LARGE, f"dataset passed max_dataset_bytes {limit} while arriving; association aborted"
        if total // _WATERMARK_EVERY > before // _WATERMARK_EVERY:
            try:
                check_watermark(self.settings.spool_root, self.settings.min_free_bytes)
            except SpoolFull as full:
                return ReasonCode.SPOOL_FULL, f"{full} while a dataset was arriving; association aborted"
        return None

    def _abort(self, event: NetEvent, reason_code: ReasonCode, message: str) -> None:
        LOGGER.warning("aborting association: %s", message)
        self.aborted.add(event.assoc)
        record_event(self.session_factory, "rejected", "error", reason_code=reason_code.value, message=message,
                     **_peer(event.assoc))
        event.assoc.abort(block=False)  # inside a handler: queue the A-ABORT, do not wait for it


# ---------------------------------------------------------------- network layer


def _handle_echo(event: NetEvent) -> int:
    return SUCCESS


def store_request(event: NetEvent) -> StoreRequest:
    """The plain value the Receiver works on, from pynetdicom's EVT_C_STORE event."""
    peer = _peer(event.assoc)
    return StoreRequest(
        path=Path(event.dataset_path), sop_class_uid=str(event.request.AffectedSOPClassUID),
        sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
        transfer_syntax_uid=str(event.context.transfer_syntax), calling_ae=peer["peer_ae"],
        peer_address=peer["peer_address"])


def _handle_store(event: NetEvent, receiver: Receiver) -> int:
    try:
        return receiver.store(store_request(event))
    except Exception:
        LOGGER.exception("C-STORE handler failed")
        return UNABLE_TO_PROCESS


def _reject(event: NetEvent, audit: RefusalAudit, result: int, source: int, diagnostic: int,
            code: ReasonCode, message: str) -> None:
    assoc = event.assoc
    # Audit first: once the peer has the A-ASSOCIATE-RJ, the refusal must already be on record.
    audit("association_rejected", "rejected", code, message, **_peer(assoc))
    assoc.acse.send_reject(result, source, diagnostic)
    # As pynetdicom's own ACSE does: wait until the DUL has sent the A-ASSOCIATE-RJ and the peer
    # closed, otherwise the caller closes the socket first and the peer sees only an abort.
    assoc.kill()


def _handle_requested(event: NetEvent, settings: ReceiveSettings, audit: RefusalAudit) -> None:
    """Check the peer and the association limits before pynetdicom negotiates; a rejection
    here skips negotiation."""
    assoc = event.assoc
    rq = assoc.requestor.primitive
    calling, called = rq.calling_ae_title.strip(), rq.called_ae_title.strip()
    address = assoc.requestor.address
    others = [a for a in compat.acceptors(assoc.ae) if a is not assoc and compat.is_requested(a)]
    from_peer = [a for a in others if _same_ip(a.requestor.address, address)]
    if not settings.peer_allowed(address):
        _reject(event, audit, REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_NO_REASON,
                ReasonCode.PEER_NOT_ALLOWED, f"peer address {address} not in allowed_peers")
    elif not settings.calling_ae_allowed(calling):
        _reject(event, audit, REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_CALLING_AE,
                ReasonCode.CALLING_AE_NOT_RECOGNISED, f"calling AE title {quote(calling, 'CS')} not recognised")
    elif called != settings.ae_title:
        _reject(event, audit, REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_CALLED_AE,
                ReasonCode.CALLED_AE_NOT_RECOGNISED, f"called AE title {quote(called, 'CS')} is not {settings.ae_title!r}")
    elif len(others) >= settings.max_associations:
        _reject(event, audit, REJECTED_TRANSIENT, SOURCE_SERVICE_PROVIDER_PRESENTATION, REASON_LOCAL_LIMIT,
                ReasonCode.LOCAL_LIMIT_EXCEEDED,
                f"{len(others)} associations open, max_associations is {settings.max_associations}")
    elif len(from_peer) >= settings.max_associations_per_peer:
        _reject(event, audit, REJECTED_TRANSIENT, SOURCE_SERVICE_PROVIDER_PRESENTATION, REASON_LOCAL_LIMIT,
                ReasonCode.PEER_LIMIT_EXCEEDED, f"{len(from_peer)} associations open from {address}, "
                f"max_associations_per_peer is {settings.max_associations_per_peer}")


def _handle_rejected(event: NetEvent, audit: RefusalAudit) -> None:
    """Audit rejections made by pynetdicom itself (e.g. no acceptable presentation context)."""
    primitive = event.assoc.acceptor.primitive
    source = getattr(primitive, "result_source", None)
    diagnostic = getattr(primitive, "diagnostic", None)
    code = REJECT_REASONS.get((source, diagnostic), ReasonCode.NO_REASON_GIVEN)  # type: ignore[arg-type]
    audit("association_rejected", "rejected", code,
          f"rejected by the association layer (result {getattr(primitive, 'result', None)}, source {source}, "
          f"diagnostic {diagnostic})", **_peer(event.assoc))


def _handle_pdu_sent(event: NetEvent, audit: RefusalAudit, guard: TransferGuard) -> None:
    """An A-ABORT that pynetdicom sends on its own (an undecodable PDU or association request,
    a DIMSE message it cannot parse, an unknown SOP class): audited. Ours (TransferGuard) are
    audited where they are decided."""
    if isinstance(event.pdu, A_ABORT_RQ) and event.assoc not in guard.aborted:
        audit("association_aborted", "error", ReasonCode.PROTOCOL_ERROR,
              f"association aborted by the DICOM protocol layer (source {event.pdu.source}, reason "
              f"{event.pdu.reason_diagnostic}): the peer sent data that could not be parsed or used",
              **_peer(event.assoc))


class _Tally:
    """A thread-safe running count (this process's accepted associations, for /metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self) -> None:
        with self._lock:
            self.value += 1


_ACCEPTED = _Tally()


def accepted_associations() -> int:
    """Associations this process has accepted since it started."""
    return _ACCEPTED.value


def _handle_accepted(event: NetEvent, audit: RefusalAudit) -> None:
    """Count the association; pynetdicom accepts one even when no presentation context was:
    audited, as the peer can send nothing on it."""
    _ACCEPTED.add()
    if not event.assoc.accepted_contexts:
        audit("association_rejected", "rejected", ReasonCode.NO_PRESENTATION_CONTEXT,
              "association accepted without any presentation context (none of the SOP classes or transfer "
              "syntaxes offered are served)", **_peer(event.assoc))


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server with connection caps and read deadlines; optionally one of
    several sharing a port (SO_REUSEPORT)."""

    def __init__(self, *args: Any, settings: ReceiveSettings, audit: RefusalAudit, reuse_port: bool = False,
                 **kwargs: Any) -> None:
        self.reuse_port = reuse_port  # read by server_bind, which the base __init__ calls
        # read by compat.DeadlineRequestHandler for every new connection
        self.acse_timeout_s = settings.acse_timeout_s
        self.pdu_timeout_s = settings.network_timeout_s
        self.max_connections = settings.max_associations * _CONNECTIONS_PER_ASSOCIATION
        self.max_connections_per_peer = settings.max_associations_per_peer * _CONNECTIONS_PER_ASSOCIATION
        self.audit = audit
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.reuse_port:
            # Every socket of a SO_REUSEPORT group must set it before bind; Linux then spreads
            # new connections across the processes listening (screener.node.receivers).
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept; a TLS connection is wrapped without its handshake, which the association's
        own thread then does under the acse_timeout_s deadline (pynetdicom would handshake
        here, in the one accepting thread, for as long as a silent client likes)."""
        client, address = self.socket.accept()
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse (close at once) a connection over the caps: such a connection would only
        wait for a slot, and enough of them would keep every caller out."""
        address = str(client_address[0])
        live = compat.acceptors(self.ae)
        from_peer = sum(1 for a in live if _same_ip(str(a.requestor.address), address))
        if len(live) >= self.max_connections:
            why = f"{len(live)} connections open (at most {self.max_connections})"
        elif from_peer >= self.max_connections_per_peer:
            why = f"{from_peer} connections open from {address} (at most {self.max_connections_per_peer})"
        else:
            return True
        self.audit("connection_refused", "rejected", ReasonCode.CONNECTION_LIMIT_EXCEEDED, f"connection closed: {why}",
                   None, f"{client_address[0]}:{client_address[1]}", wait=False)
        return False

    def on_timeout(self, assoc: Any, message: str) -> None:
        self.audit("connection_timeout", "rejected", ReasonCode.ASSOCIATION_TIMEOUT, message, **_peer(assoc))

    def on_tls_failure(self, assoc: Any, message: str) -> None:
        self.audit("connection_refused", "rejected", ReasonCode.TLS_HANDSHAKE_FAILED, message, **_peer(assoc))


def build_ae(settings: ReceiveSettings) -> AE:
    """An AE with our presentation contexts, timeouts and the settings' AE title checks."""
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.acse_timeout = settings.acse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    ae.dimse_timeout = settings.network_timeout_s
    # Our EVT_REQUESTED handler enforces max_associations on requested associations only, and
    # _Server caps connections: pynetdicom's own count (of every connection) must not be lower.
    ae.maximum_associations = settings.max_associations * _CONNECTIONS_PER_ASSOCIATION + 1
    # Belt and braces behind the EVT_REQUESTED handler: pynetdicom checks these itself too.
    ae.require_called_aet = True
    ae.require_calling_aet = list(settings.allowed_calling_aes)
    ae.add_supported_context(Verification)
    for sop_class in IMAGE_STORAGE:
        ae.add_supported_context(sop_class, list(IMAGE_SYNTAXES))
    for sop_class in OWN_OUTPUT_STORAGE:
        ae.add_supported_context(sop_class, list(UNCOMPRESSED_SYNTAXES))
    return ae


def event_handlers(settings: ReceiveSettings, session_factory: sessionmaker[Session], audit: RefusalAudit,
                   receiver: Receiver | None = None) -> list[Any]:
    receiver = receiver or Receiver(settings, session_factory)
    guard = TransferGuard(settings, session_factory)
    return [
        (evt.EVT_PDU_RECV, guard),
        (evt.EVT_REQUESTED, _handle_requested, [settings, audit]),
        (evt.EVT_REJECTED, _handle_rejected, [audit]),
        (evt.EVT_ACCEPTED, _handle_accepted, [audit]),
        (evt.EVT_PDU_SENT, _handle_pdu_sent, [audit, guard]),
        (evt.EVT_C_ECHO, _handle_echo),
        (evt.EVT_C_STORE, _handle_store, [receiver]),
    ]


def start_scp(settings: ReceiveSettings, session_factory: sessionmaker[Session],
              receiver: Receiver | None = None, *, reuse_port: bool = False,
              tls: bool = False) -> ThreadedAssociationServer:
    """Start listening in background threads; returns the server (``stop`` it when done).

    ``reuse_port``: bind with SO_REUSEPORT, to share the port with other processes' SCPs
    (see screener.node.receivers, which also checks that nothing else holds the port).
    ``tls``: listen on ``settings.tls_port`` with DICOM TLS instead of on ``settings.port``.

    Switches on pynetdicom's chunked receive, a process-wide option (pynetdicom has no
    per-server one): datasets stream to files in the process's temporary directory, never
    whole in memory. A receive process points that directory at ``<spool>/.incoming``
    (screener.node.receivers) so the finished file is renamed into the spool; from a temporary
    directory on another file system it is copied instead.
    """
    compat.enable_chunked_receive()
    compat.quiet_standard_handlers()
    settings.spool_root.mkdir(parents=True, exist_ok=True)
    ae = build_ae(settings)
    audit = RefusalAudit(session_factory)
    server = ae.make_server((settings.bind_address, settings.tls_port if tls else settings.port),
                            ssl_context=settings.ssl_context() if tls else None,
                            evt_handlers=event_handlers(settings, session_factory, audit, receiver),
                            server_class=_Server, request_handler=compat.DeadlineRequestHandler,
                            settings=settings, audit=audit, reuse_port=reuse_port)
    compat.start_in_background(ae, server, f"scp-{settings.ae_title}{'-tls' if tls else ''}")
    return server


def associations_in_use(server: ThreadedAssociationServer) -> int:
    """Requested associations open now (what max_associations counts)."""
    return sum(1 for a in compat.acceptors(server.ae) if compat.is_requested(a))


def bound_port(server: ThreadedAssociationServer) -> int:
    """The port the server listens on (useful with ``port=0``)."""
    return int(server.server_address[1])


def stop(server: ThreadedAssociationServer) -> None:
    """Stop accepting, close the socket and end the server's AE."""
    server.shutdown()
    server.ae.shutdown()
