"""The job queue and delivery outbox, with their audit events.

Every function here that changes state owns one transaction: the state change and its
``events`` row commit together or not at all (ARCHITECTURE.md, "the queue lives in the
database"). Functions that take a ``Session`` require it to have no transaction in progress,
commit before returning, and roll back and re-raise on any error. On SQLite the transaction
starts with BEGIN IMMEDIATE; on PostgreSQL claims use ``SELECT ... FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, joinedload, sessionmaker

from screener.codes import ReasonCode
from screener.result import JobResult
from screener.store.db import SQLITE_BEGIN
from screener.store.models import (
    Delivery,
    DeliveryKind,
    DeliveryState,
    Event,
    Instance,
    Job,
    JobState,
    hash_patient_id,
    utcnow,
)

DEFAULT_MAX_ATTEMPTS = 3


class LeaseLost(RuntimeError):
    """The worker no longer holds the job's lease (it expired and another worker reclaimed it)."""

    def __init__(self, job_id: int, owner: str, holder: str | None, state: str) -> None:
        self.job_id = job_id
        self.owner = owner
        super().__init__(f"job {job_id}: lease not held by {owner!r} (state {state}, lease_owner {holder!r})")


class InvalidTransition(RuntimeError):
    """A state change that the current state does not allow."""


@dataclass(frozen=True)
class ReceivedInstance:
    """What the receive handler knows about one stored SOP instance."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    spool_path: str
    size_bytes: int
    accession_number: str | None = None
    patient_id: str | None = None  # hashed before it reaches the database
    calling_ae: str | None = None
    peer_address: str | None = None


# ---------------------------------------------------------------- transactions and helpers


@contextmanager
def _write_transaction(session: Session) -> Iterator[None]:
    """Run the body as one write transaction: commit on success, roll back on any error."""
    if session.in_transaction():
        # The caller's pending changes would silently commit with ours, and an already-open
        # SQLite read transaction could not be made IMMEDIATE.
        raise RuntimeError("session: queue functions own their transaction; commit or roll back first")
    session.connection(execution_options={SQLITE_BEGIN: "IMMEDIATE"})
    try:
        yield
        session.commit()
    except BaseException:
        session.rollback()
        raise


def _now(now: datetime | None) -> datetime:
    if now is None:
        return utcnow()
    if now.tzinfo is None:
        raise ValueError(f"now: naive datetime {now!r}; pass a timezone-aware UTC time")
    return now.astimezone(UTC)


def _job_event(session: Session, job: Job, kind: str, outcome: str, now: datetime, **fields: Any) -> Event:
    instance = job.instance
    event = Event(
        time=now,
        kind=kind,
        outcome=outcome,
        sop_instance_uid=instance.sop_instance_uid,
        study_uid=instance.study_instance_uid,
        accession_number=instance.accession_number,
        model_id=job.model_id,
        job_id=job.id,
        **fields,
    )
    session.add(event)
    session.flush()  # surfaces a failing event insert here, inside the transaction
    return event


def _held_job(session: Session, job_id: int, owner: str) -> Job:
    """The job if ``owner`` still holds its lease, else LeaseLost.

    A lease that has expired but was not yet reclaimed still counts as held: nobody else has
    the work, and the write lock taken for this transaction keeps a claim from racing us.
    """
    # populate_existing: the identity map may hold this job as it was before another worker
    # changed it; the lease check must see the row as it is now (locked, on PostgreSQL).
    job = session.get(Job, job_id, options=[joinedload(Job.instance, innerjoin=True)],
                      populate_existing=True, with_for_update=True)
    if job is None:
        raise KeyError(f"job_id: no job {job_id}")
    if job.state != JobState.RUNNING or job.lease_owner != owner:
        raise LeaseLost(job_id, owner, job.lease_owner, job.state)
    return job


def _release(job: Job, state: JobState, now: datetime) -> None:
    job.state = state
    job.lease_owner = None
    job.lease_expires_at = None
    job.updated_at = now


# ---------------------------------------------------------------- receive


def record_received(
    session: Session,
    received: ReceivedInstance,
    model_id: str,
    salt: bytes,
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    now: datetime | None = None,
) -> tuple[Instance, Job | None, bool]:
    """Store the instance row and queue a job for ``model_id``; returns (instance, job, duplicate).

    A SOP Instance UID seen before keeps its first instance row. It gets a job only if it has
    none for this model id yet; otherwise nothing is queued, a "duplicate" event is written and
    ``job`` is None. Returns after commit, so the caller may then acknowledge the C-STORE.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts: must be at least 1, got {max_attempts}")
    now = _now(now)
    peer = {"peer_ae": received.calling_ae, "peer_address": received.peer_address}
    with _write_transaction(session):
        instance = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == received.sop_instance_uid)
        ).one_or_none()
        if instance is None:
            instance = _new_instance(received, salt, now)
            session.add(instance)
            session.flush()
        elif session.scalars(
            select(Job).where(Job.instance_id == instance.id, Job.model_id == model_id)
        ).one_or_none() is not None:
            session.add(Event(
                time=now, kind="duplicate", outcome="skipped", model_id=model_id,
                sop_instance_uid=instance.sop_instance_uid, study_uid=instance.study_instance_uid,
                accession_number=instance.accession_number,
                message="SOP Instance UID already received for this model id; not queued again", **peer,
            ))
            session.flush()
            return instance, None, True
        job = Job(instance=instance, model_id=model_id, state=JobState.QUEUED, attempts=0,
                  max_attempts=max_attempts, created_at=now, updated_at=now)
        session.add(job)
        session.flush()
        _job_event(session, job, "received", "ok", now, **peer)
    return instance, job, False


def repoint_instance(session: Session, instance_id: int, spool_path: str, size_bytes: int,
                     *, now: datetime | None = None) -> None:
    """Point an instance row at a new copy of its file (the one on record is gone), audited."""
    now = _now(now)
    with _write_transaction(session):
        instance = session.get(Instance, instance_id, with_for_update=True)
        if instance is None:
            raise KeyError(f"instance_id: no instance {instance_id}")
        instance.spool_path, instance.size_bytes = spool_path, size_bytes
        session.add(Event(time=now, kind="relocated", outcome="ok", sop_instance_uid=instance.sop_instance_uid,
                          study_uid=instance.study_instance_uid, accession_number=instance.accession_number,
                          message="received again after the spooled copy was removed; the new copy is used"))
        session.flush()


def _new_instance(received: ReceivedInstance, salt: bytes, now: datetime) -> Instance:
    return Instance(
        sop_instance_uid=received.sop_instance_uid,
        study_instance_uid=received.study_instance_uid,
        series_instance_uid=received.series_instance_uid,
        sop_class_uid=received.sop_class_uid,
        transfer_syntax_uid=received.transfer_syntax_uid,
        accession_number=received.accession_number,
        patient_id_hash=hash_patient_id(received.patient_id, salt),
        calling_ae=received.calling_ae,
        peer_address=received.peer_address,
        spool_path=received.spool_path,
        size_bytes=received.size_bytes,
        received_at=now,
    )


# ---------------------------------------------------------------- claim


def claim_jobs(
    session_factory: sessionmaker[Session],
    owner: str,
    limit: int,
    lease_seconds: float,
    now: datetime | None = None,
) -> list[Job]:
    """Claim up to ``limit`` jobs for ``owner``: queued ones, or running ones whose lease expired.

    ``owner`` must be unique per claiming worker: the lease is checked by owner name. Expired
    jobs that have used all their attempts become failed instead of being claimed again.
    Returned jobs (with their ``instance`` loaded) are detached and safe to use in any thread.
    """
    if limit < 1:
        raise ValueError(f"limit: must be at least 1, got {limit}")
    if lease_seconds <= 0:
        raise ValueError(f"lease_seconds: must be positive, got {lease_seconds}")
    now = _now(now)
    expires = now + timedelta(seconds=lease_seconds)
    with session_factory() as session, _write_transaction(session):
        _fail_exhausted_leases(session, now)
        jobs = _lock_claimable(session, now, limit)
        for job in jobs:
            reclaimed_from = job.lease_owner if job.state == JobState.RUNNING else None
            job.state = JobState.RUNNING
            job.lease_owner = owner
            job.lease_expires_at = expires
            job.attempts += 1
            job.updated_at = now
            message = f"attempt {job.attempts} of {job.max_attempts} by {owner}"
            if reclaimed_from is not None:
                message += f"; reclaimed after the lease of {reclaimed_from} expired"
            _job_event(session, job, "claimed", "ok", now, message=message)
    return jobs


def renew_leases(session_factory: sessionmaker[Session], owner: str, job_ids: Sequence[int], lease_seconds: float,
                 now: datetime | None = None) -> int:
    """Extend ``owner``'s leases on ``job_ids`` (still running, still held) by ``lease_seconds``
    from now; returns how many were renewed. A worker calls it while a long batch runs, so a
    slow machine or a large model is not mistaken for a dead worker. No audit event: a renewal
    changes no state an administrator acts on, and a batch renews every few seconds."""
    now = _now(now)
    if not job_ids:
        return 0
    with session_factory() as session, _write_transaction(session):
        result = session.execute(
            update(Job)
            .where(Job.id.in_(list(job_ids)), Job.state == JobState.RUNNING, Job.lease_owner == owner)
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
            .execution_options(synchronize_session=False))
    return int(result.rowcount or 0)


def _expired(now: datetime) -> Any:
    return and_(Job.state == JobState.RUNNING, Job.lease_expires_at <= now)


def _lock_claimable(session: Session, now: datetime, limit: int) -> list[Job]:
    # FOR UPDATE SKIP LOCKED lets PostgreSQL workers claim disjoint rows without waiting; SQLite
    # ignores it, and the IMMEDIATE transaction serialises claimers there instead.
    query = (
        select(Job)
        .options(joinedload(Job.instance, innerjoin=True))
        .where(or_(Job.state == JobState.QUEUED, and_(_expired(now), Job.attempts < Job.max_attempts)))
        .order_by(Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=Job)
    )
    return list(session.scalars(query))


def _fail_exhausted_leases(session: Session, now: datetime) -> None:
    """A job whose last allowed attempt also lost its lease fails instead of looping forever."""
    query = (
        select(Job)
        .options(joinedload(Job.instance, innerjoin=True))
        .where(_expired(now), Job.attempts >= Job.max_attempts)
        .with_for_update(skip_locked=True, of=Job)
    )
    for job in session.scalars(query):
        job.last_error = f"lease expired {job.attempts} times"
        holder = job.lease_owner
        _release(job, JobState.FAILED, now)
        _job_event(session, job, "failed", "error", now, reason_code=ReasonCode.LEASE_EXPIRED.value,
                   message=f"{job.last_error}; last holder {holder}")


# ---------------------------------------------------------------- finish a job


def complete_job(
    session: Session,
    job_id: int,
    owner: str,
    state: JobState | str,
    result: JobResult,
    destinations: Sequence[tuple[str, Iterable[DeliveryKind | str]]],
    *,
    now: datetime | None = None,
) -> Job:
    """Finish a job as done or ineligible, store its result and queue one delivery per
    destination and object kind (each with the SOP Instance UID of its object, from the
    result's outputs). Raises LeaseLost if ``owner`` no longer holds the job."""
    state = JobState(state)
    if state not in (JobState.DONE, JobState.INELIGIBLE):
        raise InvalidTransition(f"state: a job completes as done or ineligible, not {state}")
    if not isinstance(result, JobResult):
        raise TypeError(f"result: a screener.result.JobResult, got {type(result).__name__}")
    now = _now(now)
    with _write_transaction(session):
        job = _held_job(session, job_id, owner)
        _release(job, state, now)
        job.result_json = result.to_json()
        job.last_error = None
        for destination, kinds in destinations:
            for kind in kinds:
                kind = DeliveryKind(kind)
                output = result.output(kind)
                if output is None:
                    raise ValueError(f"destinations: {destination} takes the {kind}, which the result does not have")
                session.add(Delivery(job=job, destination=destination, kind=kind,
                                     sop_instance_uid=output.sop_instance_uid, state=DeliveryState.PENDING,
                                     attempts=0, next_attempt_at=now))
        session.flush()
        _job_event(session, job, str(state), "ok", now, result_json=job.result_json,
                   reason_code=None if state is JobState.DONE else result.code.value)
    return job


def job_result(job: Job) -> JobResult | None:
    """The job's stored result document, typed (None while it has none)."""
    return JobResult.from_json(job.result_json) if job.result_json else None


def fail_job(
    session: Session,
    job_id: int,
    owner: str,
    reason_code: ReasonCode | str,
    error: str,
    retry: bool,
    *,
    result: JobResult | None = None,
    now: datetime | None = None,
) -> Job:
    """Record a failed attempt with its stable ``reason_code``: back to queued if ``retry`` and
    attempts remain, else failed. Raises LeaseLost if ``owner`` no longer holds the job."""
    code = ReasonCode(reason_code)
    now = _now(now)
    with _write_transaction(session):
        job = _held_job(session, job_id, owner)
        job.last_error = f"{code}: {error}"
        if result is not None:
            job.result_json = result.to_json()
        if retry and job.attempts < job.max_attempts:
            _release(job, JobState.QUEUED, now)
            _job_event(session, job, "retry", "error", now, reason_code=code.value,
                       message=f"attempt {job.attempts} of {job.max_attempts} failed: {error}")
        else:
            _release(job, JobState.FAILED, now)
            why = "not retryable" if not retry else f"attempts exhausted ({job.attempts})"
            _job_event(session, job, "failed", "error", now, reason_code=code.value, message=f"{why}: {error}",
                       result_json=job.result_json if result is not None else None)
    return job


# ---------------------------------------------------------------- deliveries


def due_deliveries(session: Session, now: datetime | None = None, limit: int = 100) -> list[Delivery]:
    """Pending deliveries whose next attempt is due, oldest first (read only, no event)."""
    if session.in_transaction():
        raise RuntimeError("session: commit or roll back before reading due deliveries")
    now = _now(now)
    query = (
        select(Delivery)
        .options(joinedload(Delivery.job, innerjoin=True).joinedload(Job.instance, innerjoin=True))
        .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
        .order_by(Delivery.next_attempt_at, Delivery.id)
        .limit(limit)
    )
    deliveries = list(session.scalars(query))
    # End the read transaction so the next write can begin IMMEDIATE; commit, not rollback,
    # because rollback would expire the rows just loaded.
    session.commit()
    return deliveries


def _pending_delivery(session: Session, delivery_id: int) -> Delivery:
    delivery = session.get(
        Delivery, delivery_id,
        options=[joinedload(Delivery.job, innerjoin=True).joinedload(Job.instance, innerjoin=True)],
        populate_existing=True, with_for_update=True,
    )
    if delivery is None:
        raise KeyError(f"delivery_id: no delivery {delivery_id}")
    if delivery.state != DeliveryState.PENDING:
        raise InvalidTransition(f"delivery {delivery_id}: state is {delivery.state}, not pending")
    return delivery


def _delivery_event(session: Session, delivery: Delivery, kind: str, outcome: str, now: datetime,
                    message: str, reason_code: str | None = None) -> None:
    _job_event(session, delivery.job, kind, outcome, now, delivery_id=delivery.id, reason_code=reason_code,
               message=f"{delivery.kind} to {delivery.destination}: {message}")


def mark_sent(session: Session, delivery_id: int, *, now: datetime | None = None) -> Delivery:
    """The destination acknowledged the object."""
    now = _now(now)
    with _write_transaction(session):
        delivery = _pending_delivery(session, delivery_id)
        delivery.state = DeliveryState.SENT
        delivery.attempts += 1
        delivery.next_attempt_at = None
        delivery.last_error = None
        _delivery_event(session, delivery, "sent", "ok", now, f"attempt {delivery.attempts}")
    return delivery


def backoff_seconds(attempts: int, base_s: float, cap_s: float) -> float:
    """Delay before the next try after ``attempts`` failures: base * 2**(attempts-1), capped."""
    # min() before the power would overflow for large attempt counts, so cap the exponent too.
    return min(cap_s, base_s * 2.0 ** min(attempts - 1, 62))


def mark_failed(
    session: Session,
    delivery_id: int,
    error: str,
    *,
    backoff_base_s: float,
    backoff_cap_s: float,
    max_attempts: int,
    reason_code: ReasonCode | str = ReasonCode.DELIVERY_FAILED,
    now: datetime | None = None,
    retry: bool = True,
) -> Delivery:
    """A send failed: retry later with capped exponential backoff, or dead after max_attempts
    (at once when ``retry`` is False: a failure that another attempt cannot cure)."""
    code = ReasonCode(reason_code).value
    now = _now(now)
    with _write_transaction(session):
        delivery = _pending_delivery(session, delivery_id)
        delivery.attempts += 1
        delivery.last_error = error
        if delivery.attempts >= max_attempts or not retry:
            delivery.state = DeliveryState.DEAD
            delivery.next_attempt_at = None
            _delivery_event(session, delivery, "dead", "error", now,
                            f"gave up after {delivery.attempts} attempts: {error}" if retry
                            else f"not retried: {error}", reason_code=code)
        else:
            delay = backoff_seconds(delivery.attempts, backoff_base_s, backoff_cap_s)
            delivery.next_attempt_at = now + timedelta(seconds=delay)
            _delivery_event(session, delivery, "delivery_retry", "error", now,
                            f"attempt {delivery.attempts} failed, next in {delay:g} s: {error}", reason_code=code)
    return delivery


# ---------------------------------------------------------------- administration


def requeue_jobs(session: Session, job_ids: Sequence[int], *, reason: str,
                 now: datetime | None = None) -> list[int]:
    """Put finished (failed, done, ineligible) jobs back in the queue with fresh attempts.

    Running and queued jobs are left alone (their lease decides). Returns the ids requeued.
    """
    now = _now(now)
    done: list[int] = []
    with _write_transaction(session):
        for job_id in job_ids:
            job = session.get(Job, job_id, options=[joinedload(Job.instance, innerjoin=True)],
                              populate_existing=True, with_for_update=True)
            if job is None or job.state in (JobState.RUNNING, JobState.QUEUED):
                continue
            previous = job.state
            _release(job, JobState.QUEUED, now)
            job.attempts = 0
            _job_event(session, job, "requeued", "ok", now, message=f"was {previous}: {reason}")
            done.append(job_id)
    return done


def failed_job_ids(session: Session, since: datetime) -> list[int]:
    """Ids of jobs that are failed and last changed at or after ``since``."""
    ids = list(session.scalars(select(Job.id).where(Job.state == JobState.FAILED, Job.updated_at >= _now(since))))
    session.commit()
    return ids
