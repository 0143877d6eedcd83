"""Query/Retrieve SCU: find chest radiograph studies on a PACS and have it send them to us.

Study Root C-FIND at STUDY level (a date range, the modalities in the study), at SERIES level
within a study (modality, body part, instance count), and C-MOVE of one series to a move
destination (our own SCP's AE title, which the PACS must know). Only what the backfill needs,
typed; pynetdicom stays inside this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from screener.node.aetitle import validate_ae_title

__all__ = ["MoveRefused", "MoveResult", "Peer", "QueryError", "SeriesHit", "StudyHit", "find_series", "find_studies", "move_series"]

_PENDING = frozenset({0xFF00, 0xFF01})


class QueryError(RuntimeError):
    """The PACS could not be reached, refused the association, or answered with a failure."""


class MoveRefused(QueryError):
    """The PACS refuses to send to the move destination at all (0xA801: it does not know it, or
    the association for C-MOVE is rejected): no study would fare better, so the run stops."""


#: C-MOVE statuses meaning "not to this destination", whatever the study (PS3.4 C.4.2.1.5).
_MOVE_DESTINATION_UNKNOWN = 0xA801
#: A C-MOVE answers when the whole series is sent; a PACS need not send pending responses.
MOVE_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Peer:
    """The PACS answering C-FIND and C-MOVE, and the AE title we call it as."""

    ae_title: str
    host: str
    port: int
    calling_ae: str
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        validate_ae_title("backfill.source_ae_title", self.ae_title)
        validate_ae_title("backfill.calling_ae", self.calling_ae)
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a TCP port (1-65535)")

    @property
    def label(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class StudyHit:
    study_uid: str
    study_date: date | None
    age_years: float | None  # PatientAge, else from PatientBirthDate and StudyDate
    modalities: tuple[str, ...]
    instances: int | None


@dataclass(frozen=True)
class SeriesHit:
    study_uid: str
    series_uid: str
    modality: str
    body_part: str
    instances: int | None


@dataclass(frozen=True)
class MoveResult:
    status: int
    completed: int
    failed: int
    warning: int

    @property
    def ok(self) -> bool:
        return self.status == 0x0000 and self.failed == 0


def _ae(peer: Peer, context: str) -> AE:
    ae = AE(ae_title=peer.calling_ae)
    ae.add_requested_context(context)
    for attribute in ("connection_timeout", "acse_timeout", "dimse_timeout", "network_timeout"):
        setattr(ae, attribute, peer.timeout_s)
    return ae


def _find(peer: Peer, query: Dataset) -> list[Dataset]:
    ae = _ae(peer, StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise QueryError(f"{peer.label}: no association for C-FIND "
                         f"({'rejected' if assoc.is_rejected else 'unreachable or aborted'})")
    found: list[Dataset] = []
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = status.get("Status") if status else None
            if code is None:
                raise QueryError(f"{peer.label}: C-FIND got no response (timeout or abort)")
            if code in _PENDING:
                if identifier is not None:
                    found.append(identifier)
            elif code != 0x0000:
                raise QueryError(f"{peer.label}: C-FIND failed with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return found


def _dicom_date(value: object) -> date | None:
    text = str(value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _age(age_string: object, birth: date | None, study: date | None) -> float | None:
    """Age in years: PatientAge (nnnD/W/M/Y) if given, else birth date to study date."""
    text = str(age_string or "").strip().upper()
    if len(text) == 4 and text[:3].isdigit() and text[3] in "DWMY":
        return int(text[:3]) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[text[3]]
    if birth is not None and study is not None and study >= birth:
        return (study - birth).days / 365.25
    return None


def _int_or_none(value: object) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def find_studies(peer: Peer, first: date, last: date, modalities: tuple[str, ...]) -> list[StudyHit]:
    """Studies dated ``first``..``last`` (inclusive) with any of ``modalities`` in them."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.StudyDate = f"{first:%Y%m%d}-{last:%Y%m%d}"
    query.ModalitiesInStudy = list(modalities)
    query.PatientBirthDate = ""
    query.PatientAge = ""
    query.NumberOfStudyRelatedInstances = ""
    hits = []
    for found in _find(peer, query):
        uid = str(found.get("StudyInstanceUID", "") or "").strip()
        if not uid:
            continue
        study_date = _dicom_date(found.get("StudyDate"))
        in_study = found.get("ModalitiesInStudy") or ()
        hits.append(StudyHit(
            study_uid=uid, study_date=study_date,
            age_years=_age(found.get("PatientAge"), _dicom_date(found.get("PatientBirthDate")), study_date),
            modalities=tuple(str(m) for m in ([in_study] if isinstance(in_study, str) else in_study)),
            instances=_int_or_none(found.get("NumberOfStudyRelatedInstances"))))
    return hits


def find_series(peer: Peer, study_uid: str) -> list[SeriesHit]:
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    query.BodyPartExamined = ""
    query.NumberOfSeriesRelatedInstances = ""
    return [SeriesHit(study_uid=study_uid, series_uid=str(found.SeriesInstanceUID).strip(),
                      modality=str(found.get("Modality", "") or "").strip().upper(),
                      body_part=str(found.get("BodyPartExamined", "") or "").strip().upper(),
                      instances=_int_or_none(found.get("NumberOfSeriesRelatedInstances")))
            for found in _find(peer, query) if str(found.get("SeriesInstanceUID", "") or "").strip()]


def move_series(peer: Peer, destination_ae: str, study_uid: str, series_uid: str) -> MoveResult:
    """Ask the PACS to C-STORE one series to ``destination_ae``; returns when it is done."""
    ae = _ae(peer, StudyRootQueryRetrieveInformationModelMove)
    ae.dimse_timeout = max(peer.timeout_s, MOVE_TIMEOUT_S)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if assoc.is_rejected:
        raise MoveRefused(f"{peer.label}: the association for C-MOVE was rejected (is {peer.calling_ae} "
                          "allowed to retrieve?)")
    if not assoc.is_established:
        raise QueryError(f"{peer.label}: no association for C-MOVE (unreachable or aborted)")
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    final: Dataset | None = None
    try:
        for status, _ in assoc.send_c_move(query, destination_ae, StudyRootQueryRetrieveInformationModelMove):
            if not status:
                raise QueryError(f"{peer.label}: C-MOVE got no response (timeout or abort)")
            if int(status.get("Status", -1)) not in _PENDING:
                final = status
    finally:
        if assoc.is_established:
            assoc.release()
    if final is None:
        raise QueryError(f"{peer.label}: C-MOVE ended without a final status")

    if int(final.get("Status", -1)) == _MOVE_DESTINATION_UNKNOWN:
        raise MoveRefused(f"{peer.label}: C-MOVE refused with 0xA801: the PACS does not know the move "
                          f"destination {destination_ae!r} (register it with this node's host and port)")

    def count(keyword: str) -> int:
        return int(final.get(keyword, 0) or 0)

    return MoveResult(status=int(final.get("Status", -1)), completed=count("NumberOfCompletedSuboperations"),
                      failed=count("NumberOfFailedSuboperations"), warning=count("NumberOfWarningSuboperations"))
