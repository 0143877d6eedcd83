"""SQLAlchemy models for instances, jobs, deliveries and events.

The schema is owned by the Alembic migrations in ``migrations/versions``; a test checks that
these models and the migrated database agree.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from screener.result import ObjectKind

UID = String(64)
AE_TITLE = String(16)

# Deterministic constraint names, so later migrations (SQLite batch mode) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    INELIGIBLE = "ineligible"
    FAILED = "failed"


#: The result objects a destination can be sent (one outbox row each).
DeliveryKind = ObjectKind


class BackfillState(StrEnum):
    """A study of a backfill: waiting, being retrieved, retrieved, left out (with a reason), failed."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: Any) -> Any:
    """Aggregates (MIN/MAX) bypass the column type (and its UTC handling): SQLite hands back text, naive UTC."""
    if value is None or not isinstance(value, (str, datetime)):
        return value
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def hash_patient_id(patient_id: str | None, salt: bytes) -> str | None:
    """Salted SHA-256 (HMAC) of a Patient ID: joins records of one patient without storing the ID."""
    if not salt:
        raise ValueError("salt: a per-install salt is required to hash PatientID")
    if patient_id is None or patient_id == "":
        return None
    return hmac.new(salt, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite has no time zone type and hands back naive values; storing naive UTC and attaching
    UTC on the way out keeps comparisons (lease expiry, due retries) correct as plain strings.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware UTC time")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _in(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Instance(Base):
    """One received SOP instance and where its file lies in the spool."""

    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid"),
        Index(None, "study_instance_uid"),
        Index(None, "accession_number"),
        Index(None, "series_instance_uid"),  # the backfill's "already screened?" per series
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    accession_number: Mapped[str | None] = mapped_column(String(64))
    patient_id_hash: Mapped[str | None] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(AE_TITLE)
    peer_address: Mapped[str | None] = mapped_column(String(255))
    spool_path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)

    jobs: Mapped[list[Job]] = relationship(back_populates="instance")


class Job(Base):
    """Running one model version on one instance; claimed by a worker under a lease."""

    __tablename__ = "jobs"
    __table_args__ = (
        # Exactly one result per (source image, model version), enforced by the database.
        UniqueConstraint("instance_id", "model_id"),
        CheckConstraint(_in("state", JobState), name="state"),
        Index(None, "state", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    model_id: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    result_json: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    instance: Mapped[Instance] = relationship(back_populates="jobs")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job")


class Delivery(Base):
    """Outbox row: one result object (SR or GSPS) to one destination."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("job_id", "destination", "kind"),
        CheckConstraint(_in("kind", DeliveryKind), name="kind"),
        CheckConstraint(_in("state", DeliveryState), name="state"),
        Index(None, "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="deliveries")


class Event(Base):
    """Audit row, written in the same transaction as the state change it describes."""

    __tablename__ = "events"
    __table_args__ = (
        Index(None, "time"),
        Index(None, "sop_instance_uid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(16))
    peer_ae: Mapped[str | None] = mapped_column(AE_TITLE)
    peer_address: Mapped[str | None] = mapped_column(String(255))
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    study_uid: Mapped[str | None] = mapped_column(UID)
    accession_number: Mapped[str | None] = mapped_column(String(64))
    reason_code: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(Text)
    model_id: Mapped[str | None] = mapped_column(String(128))
    timings_json: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result_json: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Plain columns, not foreign keys: the audit trail must outlive a purge of jobs/deliveries.
    job_id: Mapped[int | None] = mapped_column(Integer)
    delivery_id: Mapped[int | None] = mapped_column(Integer)


class BackfillRun(Base):
    """One backfill: an archive query (source, date range, age band) for one model version.

    Running the same command again, on this node or another sharing the database, joins the
    same run (``key``): that is how it resumes and how several nodes share it.
    """

    __tablename__ = "backfill_runs"
    __table_args__ = (UniqueConstraint("key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(String(255))
    first_date: Mapped[date] = mapped_column(Date)
    last_date: Mapped[date] = mapped_column(Date)
    min_age: Mapped[float | None] = mapped_column(Float)
    max_age: Mapped[float | None] = mapped_column(Float)
    model_id: Mapped[str] = mapped_column(String(128))
    # The query walks the date range in windows; every study of the days up to here is listed.
    queried_through: Mapped[date | None] = mapped_column(Date)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class BackfillStudy(Base):
    """One study of a backfill run, claimed under a lease like a job."""

    __tablename__ = "backfill_studies"
    __table_args__ = (
        UniqueConstraint("run_id", "study_uid"),
        CheckConstraint(_in("state", BackfillState), name="state"),
        Index(None, "run_id", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("backfill_runs.id"))
    study_uid: Mapped[str] = mapped_column(UID)
    study_date: Mapped[date | None] = mapped_column(Date)
    state: Mapped[str] = mapped_column(String(16))
    reason_code: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer)
    images: Mapped[int] = mapped_column(Integer)  # instances the PACS sent us for it
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # first C-MOVE started by an attempt of this run (None: never retrieved by it)
    moved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
