"""Backfill progress in the database: runs, their studies, claims under a lease, the audit.

The same rules as the job queue (screener.store.queue): every change is one write transaction
with its audit event; studies are claimed with FOR UPDATE SKIP LOCKED on PostgreSQL (several
nodes take disjoint studies without waiting) and under SQLite's IMMEDIATE lock otherwise; a
claim whose holder died is taken over once its lease expires, or at once when the holder was
a process on this same host that no longer exists (a backfill killed and started again).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from screener.codes import ReasonCode
from screener.store.models import BackfillRun, BackfillState, BackfillStudy, Event, Instance, Job, JobState
from screener.store.queue import _now, _write_transaction

__all__ = ["NewStudy", "RunProgress", "claim_study", "finish_run_if_done", "finish_study", "list_studies",
           "open_run", "progress", "queued_jobs", "release_study", "renew_study", "retry_study", "runs", "screened_instances", "set_queried_through"]

_FINAL_JOB_STATES = (JobState.DONE, JobState.INELIGIBLE, JobState.FAILED)


@dataclass(frozen=True)
class NewStudy:
    study_uid: str
    study_date: date | None
    state: BackfillState = BackfillState.PENDING
    reason_code: ReasonCode | None = None  # why it is left out (state skipped)


@dataclass(frozen=True)
class RunProgress:
    run_id: int
    key: str
    source: str
    first_date: date
    last_date: date
    model_id: str
    queried_through: date | None
    counts: dict[str, int]  # studies by state
    skipped: dict[str, int]  # skipped studies by reason code
    images: int  # retrieved
    screened: int  # of those, jobs finished for the run's model
    started_at: datetime
    finished_at: datetime | None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def left(self) -> int:
        return self.counts.get(BackfillState.PENDING, 0) + self.counts.get(BackfillState.RUNNING, 0)


def _event(session: Session, kind: str, outcome: str, now: datetime, *, study_uid: str | None = None,
           reason: ReasonCode | None = None, message: str | None = None, model_id: str | None = None,
           peer_ae: str | None = None) -> None:
    session.add(Event(time=now, kind=kind, outcome=outcome, study_uid=study_uid, peer_ae=peer_ae,
                      reason_code=reason.value if reason else None, message=message, model_id=model_id))


def open_run(session_factory: sessionmaker[Session], *, key: str, source: str, first_date: date, last_date: date,
             min_age: float | None, max_age: float | None, model_id: str, now: datetime | None = None) -> tuple[int, bool]:
    """The run for ``key``, created if new; returns (run id, created)."""
    now = _now(now)
    with session_factory() as session, _write_transaction(session):
        found = session.scalars(select(BackfillRun).where(BackfillRun.key == key).with_for_update()).first()
        if found is not None:
            return found.id, False
        values = dict(key=key, source=source, first_date=first_date, last_date=last_date, min_age=min_age,
                      max_age=max_age, model_id=model_id, created_at=now)
        # Two nodes starting the same backfill at once: one row, the other joins it.
        inserted = session.execute(_insert(session, BackfillRun).values(**values)
                                   .on_conflict_do_nothing(index_elements=["key"]))
        run_id = session.scalars(select(BackfillRun.id).where(BackfillRun.key == key)).one()
        created = bool(inserted.rowcount)
        if created:
            _event(session, "backfill_started", "ok", now, model_id=model_id,
                   message=f"{source}: studies {first_date}..{last_date}")
    return run_id, created


def _insert(session: Session, table: Any) -> Any:
    return (pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert)(table)


def list_studies(session_factory: sessionmaker[Session], run_id: int, studies: Iterable[NewStudy],
                 now: datetime | None = None) -> int:
    """Add the studies a query found (those already listed are left as they are); returns how many were new."""
    now = _now(now)
    # In UID order: two nodes listing the same window insert in the same order, so they cannot deadlock.
    rows = [dict(run_id=run_id, study_uid=s.study_uid, study_date=s.study_date, state=s.state.value,
                 reason_code=s.reason_code.value if s.reason_code else None, attempts=0, images=0, updated_at=now)
            for s in sorted(studies, key=lambda study: study.study_uid)]
    if not rows:
        return 0
    with session_factory() as session, _write_transaction(session):
        result = session.execute(_insert(session, BackfillStudy).values(rows)
                                 .on_conflict_do_nothing(index_elements=["run_id", "study_uid"]))
        return int(result.rowcount or 0)


def set_queried_through(session_factory: sessionmaker[Session], run_id: int, day: date) -> None:
    with session_factory() as session, _write_transaction(session):
        run = session.get(BackfillRun, run_id, with_for_update=True)
        assert run is not None
        if run.queried_through is None or day > run.queried_through:
            run.queried_through = day


def _holder_is_gone(owner: str | None, host: str) -> bool:
    """A holder named "<host>:<pid>:..." on this host whose process no longer exists."""
    if not owner:
        return False
    parts = owner.split(":")
    if len(parts) < 2 or parts[0] != host or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def claim_study(session_factory: sessionmaker[Session], run_id: int, owner: str, lease_seconds: float,
                max_attempts: int, now: datetime | None = None) -> BackfillStudy | None:
    """The next pending study of the run (or one whose holder is gone), leased to ``owner``."""
    now = _now(now)
    host = owner.split(":")[0]
    with session_factory() as session, _write_transaction(session):
        running = session.scalars(
            select(BackfillStudy).where(BackfillStudy.run_id == run_id, BackfillStudy.state == BackfillState.RUNNING)
            .with_for_update(skip_locked=True)).all()
        for study in running:
            expired = study.lease_expires_at is not None and study.lease_expires_at <= now
            if expired or _holder_is_gone(study.lease_owner, host):
                gone = study.lease_owner
                if study.attempts >= max_attempts:
                    study.state, study.reason_code = BackfillState.FAILED, ReasonCode.LEASE_EXPIRED.value
                    study.last_error = f"its retrieval was interrupted {study.attempts} times"
                    _event(session, "backfill_study", "error", now, study_uid=study.study_uid,
                           reason=ReasonCode.LEASE_EXPIRED, message=f"{study.last_error}; last holder {gone}")
                else:
                    study.state = BackfillState.PENDING
                study.lease_owner = study.lease_expires_at = None
                study.updated_at = now
        session.flush()
        study = session.scalars(
            select(BackfillStudy).where(BackfillStudy.run_id == run_id, BackfillStudy.state == BackfillState.PENDING,
                                        or_(BackfillStudy.lease_expires_at.is_(None),
                                            BackfillStudy.lease_expires_at <= now))
            .order_by(BackfillStudy.study_date, BackfillStudy.id).limit(1).with_for_update(skip_locked=True)).first()
        if study is None:
            return None
        study.state = BackfillState.RUNNING
        study.lease_owner = owner
        study.lease_expires_at = now + timedelta(seconds=lease_seconds)
        study.attempts += 1
        study.updated_at = now
    return study


def _held(session: Session, study_id: int, owner: str) -> BackfillStudy | None:
    """The study if ``owner`` still holds it (locked, as it is now), else None."""
    study = session.get(BackfillStudy, study_id, with_for_update=True, populate_existing=True)
    if study is None or study.state != BackfillState.RUNNING or study.lease_owner != owner:
        return None
    return study


def finish_study(session_factory: sessionmaker[Session], study_id: int, owner: str, state: BackfillState, *,
                 images: int = 0, reason: ReasonCode | None = None, message: str | None = None,
                 model_id: str | None = None, peer_ae: str | None = None, now: datetime | None = None) -> bool:
    """Record a claimed study's end with its audit event; False if ``owner`` no longer holds it."""
    now = _now(now)
    with session_factory() as session, _write_transaction(session):
        study = _held(session, study_id, owner)
        if study is None:
            return False
        study.state = state.value
        study.reason_code = reason.value if reason else None
        study.images = images
        study.last_error = message if state == BackfillState.FAILED else None
        study.lease_owner = study.lease_expires_at = None
        study.updated_at = now
        outcome = {BackfillState.DONE: "ok", BackfillState.SKIPPED: "skipped"}.get(state, "error")
        _event(session, "backfill_study", outcome, now, study_uid=study.study_uid, reason=reason,
               message=message or f"{images} image(s) retrieved", model_id=model_id, peer_ae=peer_ae)
        _finish_run_if_done(session, study.run_id, now)
    return True


def retry_study(session_factory: sessionmaker[Session], study_id: int, owner: str, delay_s: float, message: str,
                max_attempts: int, *, reason: ReasonCode = ReasonCode.BACKFILL_MOVE_FAILED,
                peer_ae: str | None = None, now: datetime | None = None) -> BackfillState | None:
    """A failed retrieval: pending again after ``delay_s``, or failed once attempts are used up."""
    now = _now(now)
    with session_factory() as session, _write_transaction(session):
        study = _held(session, study_id, owner)
        if study is None:
            return None
        final = study.attempts >= max_attempts
        study.state = BackfillState.FAILED if final else BackfillState.PENDING
        study.reason_code = reason.value if final else None
        study.last_error = message
        study.lease_owner = None
        # a pending study's lease time is its "not before": claim_study skips it until then
        study.lease_expires_at = None if final else now + timedelta(seconds=delay_s)
        study.updated_at = now
        _event(session, "backfill_study", "error" if final else "retry", now, study_uid=study.study_uid,
               reason=reason, peer_ae=peer_ae,
               message=f"attempt {study.attempts} of {max_attempts}: {message}")
        if final:
            _finish_run_if_done(session, study.run_id, now)
        return BackfillState(study.state)


def _finish_run_if_done(session: Session, run_id: int, now: datetime) -> None:
    session.flush()
    run = session.get(BackfillRun, run_id, with_for_update=True)
    if run is None or run.finished_at is not None or run.queried_through is None or run.queried_through < run.last_date:
        return
    left = session.scalar(select(func.count()).select_from(BackfillStudy).where(
        BackfillStudy.run_id == run_id, BackfillStudy.state.in_([BackfillState.PENDING, BackfillState.RUNNING])))
    if left == 0:
        run.finished_at = now
        _event(session, "backfill_finished", "ok", now, model_id=run.model_id, message=f"{run.source}: run {run.id}")


def finish_run_if_done(session_factory: sessionmaker[Session], run_id: int, now: datetime | None = None) -> bool:
    now = _now(now)
    with session_factory() as session, _write_transaction(session):
        _finish_run_if_done(session, run_id, now)
        run = session.get(BackfillRun, run_id)
        return run is not None and run.finished_at is not None


def queued_jobs(session: Session) -> int:
    """Jobs waiting for a worker (the backfill waits while there are too many)."""
    return int(session.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.QUEUED)) or 0)


def screened_instances(session: Session, series_uid: str, model_id: str) -> int:
    """Instances of the series this node has, with a finished job for ``model_id``."""
    return int(session.scalar(
        select(func.count(func.distinct(Instance.id))).select_from(Instance).join(Job, Job.instance_id == Instance.id)
        .where(Instance.series_instance_uid == series_uid, Job.model_id == model_id,
               Job.state.in_(_FINAL_JOB_STATES))) or 0)


def runs(session: Session) -> list[int]:
    return list(session.scalars(select(BackfillRun.id).order_by(BackfillRun.id)))


def progress(session: Session, run_id: int) -> RunProgress:
    run = session.get(BackfillRun, run_id)
    if run is None:
        raise KeyError(f"no backfill run {run_id}")
    counts = dict(session.execute(select(BackfillStudy.state, func.count()).where(BackfillStudy.run_id == run_id)
                                  .group_by(BackfillStudy.state)).all())
    skipped = dict(session.execute(
        select(BackfillStudy.reason_code, func.count())
        .where(BackfillStudy.run_id == run_id, BackfillStudy.state == BackfillState.SKIPPED)
        .group_by(BackfillStudy.reason_code)).all())
    images = int(session.scalar(select(func.coalesce(func.sum(BackfillStudy.images), 0))
                                .where(BackfillStudy.run_id == run_id)) or 0)
    done_studies = select(BackfillStudy.study_uid).where(BackfillStudy.run_id == run_id,
                                                         BackfillStudy.state == BackfillState.DONE)
    screened = int(session.scalar(
        select(func.count(func.distinct(Instance.id))).select_from(Instance).join(Job, and_(Job.instance_id == Instance.id,
                                                                  Job.model_id == run.model_id))
        .where(Instance.study_instance_uid.in_(done_studies), Job.state.in_(_FINAL_JOB_STATES))) or 0)
    return RunProgress(run_id=run.id, key=run.key, source=run.source, first_date=run.first_date,
                       last_date=run.last_date, model_id=run.model_id, queried_through=run.queried_through,
                       counts={str(k): int(v) for k, v in counts.items()},
                       skipped={str(k): int(v) for k, v in skipped.items()}, images=images, screened=screened,
                       started_at=run.created_at, finished_at=run.finished_at)


def release_study(session_factory: sessionmaker[Session], study_id: int, owner: str,
                  now: datetime | None = None) -> bool:
    """Give a claimed study back untouched (the backfill was stopped): pending, the attempt not counted."""
    now = _now(now)
    with session_factory() as session, _write_transaction(session):
        study = _held(session, study_id, owner)
        if study is None:
            return False
        study.state = BackfillState.PENDING
        study.attempts = max(0, study.attempts - 1)
        study.lease_owner = study.lease_expires_at = None
        study.updated_at = now
        return True


def renew_study(session_factory: sessionmaker[Session], study_id: int, owner: str, lease_seconds: float,
                now: datetime | None = None, *, moving: bool = False) -> bool:
    """Extend the lease while a study's series are being retrieved one after another;
    ``moving``: a C-MOVE for it starts now (recorded once, in ``moved_at``)."""
    now = _now(now)
    with session_factory() as session, _write_transaction(session):
        study = _held(session, study_id, owner)
        if study is None:
            return False
        study.lease_expires_at = now + timedelta(seconds=lease_seconds)
        if moving and study.moved_at is None:
            study.moved_at = now
        return True
