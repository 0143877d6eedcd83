"""Dispatch: deliver result objects (SR, GSPS) to PACS destinations by C-STORE SCU.

The outbox lives in the database (``deliveries``, see screener/store/queue.py). A run takes the
due pending rows, sends each over its own association and records the outcome with
``mark_sent`` / ``mark_failed``; the store owns backoff, the dead state and the audit events.
Sending is at least once: if the node dies between the destination's acknowledgement and
``mark_sent``, the object goes again, and the PACS de-duplicates on the deterministic SOP
Instance UID (ARCHITECTURE.md, "exactly one SR per (source image, model version)").
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import structlog
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE
from sqlalchemy.orm import Session, sessionmaker

from screener.codes import ReasonCode
from screener.metrics import NodeMetrics
from screener.node.aetitle import validate_ae_title
from screener.store.models import Delivery, DeliveryKind, DeliveryState
from screener.store.queue import InvalidTransition, due_deliveries, mark_failed, mark_sent

log = structlog.get_logger(__name__)

SUCCESS = 0x0000
# Storage warnings (PS3.4 B.2.3): the object was stored, possibly with coercion. Re-sending
# would not change that, so they count as delivered.
STORAGE_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})


class DispatchError(RuntimeError):
    """The object could not be handed to the destination (no association, no response)."""


class DestinationUnreachable(DispatchError):
    """No connection at all (refused, timed out, TLS failed): the destination's other
    deliveries in the same run would fail the same way and are not tried."""


#: Transfer syntaxes any storage SCP accepts; a compressed object is also offered in these.
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


# ---------------------------------------------------------------- configuration


def _check_positive(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{what}: must be a positive number, got {value!r}")


@dataclass(frozen=True)
class TLSConfig:
    """Client-side TLS for one destination: CA bundle to verify the PACS, optional client cert."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls: cert_file and key_file go together (client certificate and its key)")

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
        context.check_hostname = self.check_hostname
        if self.cert_file is not None:
            context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context


@dataclass(frozen=True)
class Destination:
    """A C-STORE SCP that receives our result objects."""

    name: str
    ae_title: str
    host: str
    port: int
    send_sr: bool = True
    send_gsps: bool = True
    send_result_image: bool = True
    send_pdf: bool = True
    tls: TLSConfig | None = None
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name: a destination name is required, got {self.name!r}")
        where = f"destination {self.name!r}"
        validate_ae_title(f"{where}: ae_title", self.ae_title)
        if not isinstance(self.host, str) or not self.host.strip():
            raise ValueError(f"{where}: host: a host name or address is required, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"{where}: port: must be an integer 1-65535, got {self.port!r}")
        _check_positive(self.timeout_s, f"{where}: timeout_s")

    @property
    def label(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    def sends(self, kind: DeliveryKind | str) -> bool:
        return {DeliveryKind.SR: self.send_sr, DeliveryKind.GSPS: self.send_gsps,
                DeliveryKind.IMAGE: self.send_result_image, DeliveryKind.PDF: self.send_pdf}[DeliveryKind(kind)]

    def kinds(self) -> tuple[DeliveryKind, ...]:
        """The object kinds to queue for this destination (what ``complete_job`` takes)."""
        return tuple(kind for kind in DeliveryKind if self.sends(kind))


@dataclass(frozen=True)
class DispatchSettings:
    calling_ae: str = "CXRBMD"
    max_attempts: int = 10
    backoff_base_s: float = 30.0
    backoff_cap_s: float = 3600.0
    batch_limit: int = 100

    def __post_init__(self) -> None:
        validate_ae_title("calling_ae", self.calling_ae)
        for name in ("max_attempts", "batch_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        _check_positive(self.backoff_base_s, "backoff_base_s")
        _check_positive(self.backoff_cap_s, "backoff_cap_s")
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError(f"backoff_cap_s: {self.backoff_cap_s} is below backoff_base_s {self.backoff_base_s}")


# ---------------------------------------------------------------- one C-STORE


def proposed_syntaxes(stored_as: str) -> list[list[str]]:
    """The presentation contexts (their transfer syntaxes) proposed for an object stored in
    ``stored_as``: that syntax first, and uncompressed ones. A compressed object gets two
    contexts: an SCP picks one syntax per context and may well pick uncompressed, or refuse the
    compressed one (DCMTK storescp by default): then the object is decompressed."""
    if stored_as in _UNCOMPRESSED:
        return [list(dict.fromkeys([stored_as, *map(str, _UNCOMPRESSED)]))]
    return [[stored_as], [str(ts) for ts in _UNCOMPRESSED]]


def send_file(destination: Destination, path: Path | str, settings: DispatchSettings) -> int:
    """C-STORE the DICOM file at ``path`` over one association; returns the response status.

    Raises DispatchError when no association is established, the destination accepts none of
    the proposed transfer syntaxes, or no response arrives; OSError / pydicom errors when the
    file cannot be read.
    """
    dataset = pydicom.dcmread(path)
    sop_class = dataset.SOPClassUID
    ae = AE(ae_title=settings.calling_ae)
    stored_as = dataset.file_meta.TransferSyntaxUID
    for syntaxes in proposed_syntaxes(str(stored_as)):
        ae.add_requested_context(sop_class, syntaxes)
    for attribute in ("connection_timeout", "acse_timeout", "dimse_timeout", "network_timeout"):
        setattr(ae, attribute, destination.timeout_s)
    where = f"destination {destination.name} ({destination.label})"
    # pynetdicom reports a refused TCP connection as an aborted association; these handlers
    # tell "never connected" from "connected, then rejected/aborted", and keep the reason.
    seen: dict[str, str] = {}
    tls_args = None
    if destination.tls is not None:
        context = destination.tls.context()

        class RecordingSSLSocket(ssl.SSLSocket):
            """pynetdicom logs and swallows a failed handshake; keep its reason for the error."""

            def connect(self, address: Any) -> None:
                try:
                    super().connect(address)
                except OSError as error:
                    if isinstance(error, ssl.SSLError):
                        seen["tls"] = f"TLS handshake failed: {error}"
                    else:
                        seen["tls"] = f"TLS connection failed: {error or type(error).__name__}"
                    raise

        context.sslsocket_class = RecordingSSLSocket
        tls_args = (context, destination.host)

    def on_open(event: Any) -> None:
        seen["connected"] = "yes"

    def on_acse(event: Any) -> None:
        primitive = event.primitive
        if isinstance(primitive, A_ASSOCIATE) and primitive.result not in (None, 0x00):
            seen["reason"] = f"{primitive.source_str}: {primitive.reason_str}"

    handlers = [(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACSE_RECV, on_acse)]
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         tls_args=tls_args, evt_handlers=handlers)
    if not assoc.is_established:
        if assoc.is_rejected:
            reason = seen.get("reason", "no reason given")
            raise DispatchError(f"{where} refused the association from {settings.calling_ae} ({reason})")
        if "connected" not in seen and "tls" in seen:
            raise DestinationUnreachable(f"{where}: {seen['tls']}")
        if "connected" not in seen:
            raise DestinationUnreachable(f"{where} unreachable (no connection within {destination.timeout_s:g} s)")
        # A peer that supports none of the proposed contexts (say, no Secondary Capture) aborts
        # or rejects the request: that object's failure, not the destination's.
        raise DispatchError(f"{where} aborted the association request for {sop_class.name}")
    try:
        accepted = {str(c.transfer_syntax[0]) for c in assoc.accepted_contexts if c.abstract_syntax == sop_class}
        if stored_as not in _UNCOMPRESSED and stored_as not in accepted and accepted & {str(u) for u in _UNCOMPRESSED}:
            # e.g. the JPEG result image to a PACS that takes uncompressed only; the same instance
            dataset.decompress(generate_instance_uid=False)
        try:
            response = assoc.send_c_store(dataset)
        except ValueError as error:  # no accepted presentation context for this SOP class/syntax
            raise DispatchError(f"{where} did not accept {sop_class.name} "
                                f"in {stored_as.name} or uncompressed: {error}") from error
        status = response.get("Status") if response else None
        if status is None:
            raise DispatchError(f"{where} sent no C-STORE response (timeout or aborted association)")
        return int(status)
    finally:
        if assoc.is_established:
            assoc.release()


# ---------------------------------------------------------------- the outbox run


@dataclass(frozen=True)
class DispatchReport:
    """What one run did: sent, failed (retry scheduled), dead (attempts exhausted)."""

    sent: int = 0
    failed: int = 0
    dead: int = 0
    skipped: int = 0  # no longer pending when we came to record it (another dispatcher did)
    errors: tuple[str, ...] = field(default=())

    @property
    def attempted(self) -> int:
        return self.sent + self.failed + self.dead


class Dispatcher:
    """Sends due deliveries to their destinations and records each outcome in the store."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        destinations: Mapping[str, Destination],
        settings: DispatchSettings,
        object_path: Callable[[Delivery], Path],
        send: Callable[[Destination, Path, DispatchSettings], int] = send_file,
        metrics: NodeMetrics | None = None,
    ) -> None:
        for key, destination in destinations.items():
            if key != destination.name:
                raise ValueError(f"destinations: key {key!r} differs from the destination's name {destination.name!r}")
        self._sessions = session_factory
        self._destinations = dict(destinations)
        self._settings = settings
        self._object_path = object_path
        self._send = send
        self._metrics = metrics

    def run_due(self, now: datetime | None = None) -> DispatchReport:
        """Send every due delivery (up to the batch limit) once."""
        with self._sessions() as session:
            due = due_deliveries(session, now, limit=self._settings.batch_limit)
        counts = {"sent": 0, "failed": 0, "dead": 0, "skipped": 0}
        errors: list[str] = []
        # Per run, a destination that gave no association is not tried again: its other
        # deliveries fail with the same error at once instead of each waiting for the timeout,
        # so one dead PACS cannot hold up the others.
        down: dict[str, str] = {}
        for delivery in due:
            failure = self._attempt(delivery, down)
            outcome = self._record(delivery, failure, now)
            counts[outcome] += 1
            if failure is not None:
                errors.append(f"delivery {delivery.id}: {failure[1]}")
        report = DispatchReport(**counts, errors=tuple(errors))
        if due:
            log.info("dispatch_run", due=len(due), sent=report.sent, failed=report.failed,
                     dead=report.dead, skipped=report.skipped)
        return report

    def _attempt(self, delivery: Delivery, down: dict[str, str]) -> tuple[ReasonCode, str] | None:
        """Send one delivery; None on success, else the reason code and error for the audit."""
        destination = self._destinations.get(delivery.destination)
        if destination is None:
            return ReasonCode.DELIVERY_FAILED, f"destination {delivery.destination!r} is not configured"
        if not destination.sends(delivery.kind):
            return ReasonCode.DELIVERY_FAILED, f"destination {destination.name!r} is configured not to receive {delivery.kind}"
        if destination.name in down:
            return ReasonCode.DESTINATION_UNREACHABLE, down[destination.name]
        try:
            path = self._object_path(delivery)
        except FileNotFoundError as error:
            return ReasonCode.OBJECT_MISSING, str(error)
        try:
            status = self._send(destination, path, self._settings)
        except DestinationUnreachable as error:
            down[destination.name] = str(error)
            return ReasonCode.DESTINATION_UNREACHABLE, str(error)
        except DispatchError as error:  # this object only (refused, aborted, no response)
            return ReasonCode.DELIVERY_FAILED, str(error)
        except Exception as error:  # unreadable object file, bad TLS files: retry, keep going
            return ReasonCode.DELIVERY_FAILED, f"{type(error).__name__}: {error}"
        if status == SUCCESS or status in STORAGE_WARNINGS:
            return None
        return (ReasonCode.DELIVERY_FAILED,
                f"destination {destination.name} ({destination.label}) answered C-STORE status 0x{status:04X}")

    def _record(self, delivery: Delivery, failure: tuple[ReasonCode, str] | None, now: datetime | None) -> str:
        fields: dict[str, Any] = dict(delivery_id=delivery.id, destination=delivery.destination,
                                      kind=delivery.kind, sop_instance_uid=delivery.sop_instance_uid)
        try:
            with self._sessions() as session:
                if failure is None:
                    mark_sent(session, delivery.id, now=now)
                    log.info("delivery_sent", **fields)
                    if self._metrics is not None and delivery.kind == DeliveryKind.SR:
                        self._metrics.observe_sr_acknowledged(delivery.destination, delivery.job.instance.received_at,
                                                              now)
                    return "sent"
                code, error = failure
                row = mark_failed(session, delivery.id, error, now=now, reason_code=code,
                                  backoff_base_s=self._settings.backoff_base_s,
                                  backoff_cap_s=self._settings.backoff_cap_s,
                                  max_attempts=self._settings.max_attempts,
                                  # the object file is written before its delivery row, so a
                                  # missing one was purged or lost (a restore without the
                                  # outbox): retrying cannot bring it back
                                  retry=code != ReasonCode.OBJECT_MISSING)
        except (InvalidTransition, KeyError) as gone:
            log.warning("delivery_not_pending", error=str(gone), **fields)
            return "skipped"
        log.warning("delivery_failed", state=row.state, attempts=row.attempts, error=error,
                    next_attempt_at=row.next_attempt_at and row.next_attempt_at.isoformat(), **fields)
        return "dead" if row.state == DeliveryState.DEAD else "failed"


def schedule(scheduler: Any, dispatcher: Dispatcher, interval_s: float, *, job_id: str = "dispatch") -> Any:
    """Add an interval job to an apscheduler 3 scheduler that runs ``dispatcher.run_due``.

    One run at a time (max_instances=1) and missed runs collapse into one (coalesce): a slow
    destination must not pile up overlapping runs. The first run is due at once.
    """
    _check_positive(interval_s, "interval_s")
    return scheduler.add_job(dispatcher.run_due, "interval", seconds=interval_s, id=job_id,
                             max_instances=1, coalesce=True, replace_existing=True,
                             next_run_time=datetime.now(UTC))
