"""Store: schema from migrations, job queue with leases, delivery outbox, audit events."""

from __future__ import annotations

from alembic.script import ScriptDirectory

import threading
from collections import Counter
from datetime import datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from screener.store.db import alembic_config, create_schema
from screener.store.models import Base, Delivery, Event, Instance, Job, hash_patient_id
from screener.store.queue import (
    InvalidTransition,
    LeaseLost,
    backoff_seconds,
    claim_jobs,
    complete_job,
    due_deliveries,
    fail_job,
    mark_failed,
    mark_sent,
    record_received,
    renew_leases,
)
from tests.support.store import DESTS, INELIGIBLE, MODEL, REPORTED, SALT, T0, job_result, received


def queue(factory: sessionmaker[Session], n: int = 1, model_id: str = MODEL, **kw: object) -> Job:
    with factory() as s:
        _, job, duplicate = record_received(s, received(n), model_id, SALT, now=T0, **kw)  # type: ignore[arg-type]
    assert job is not None and not duplicate
    return job


def events(factory: sessionmaker[Session], **where: object) -> list[Event]:
    with factory() as s:
        return list(s.scalars(select(Event).filter_by(**where).order_by(Event.id)))


def job_row(factory: sessionmaker[Session], job_id: int) -> Job:
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def count(factory: sessionmaker[Session], model: type[Base]) -> int:
    with factory() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def fail_event_insert(engine: Engine, kind: str) -> None:
    """Make the database refuse the audit row of one kind, as a full disk or a bug would."""
    with engine.begin() as c:
        c.exec_driver_sql(
            f"CREATE TRIGGER refuse_{kind} BEFORE INSERT ON events WHEN NEW.kind = '{kind}' "
            "BEGIN SELECT RAISE(ABORT, 'audit insert refused'); END"
        )


# ---------------------------------------------------------------- schema and engine


def test_migrated_schema_matches_models(engine: Engine) -> None:
    with engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_schema_comparison_would_notice_a_missing_index(engine: Engine) -> None:
    with engine.begin() as c:
        c.exec_driver_sql("DROP INDEX ix_jobs_state_lease_expires_at")
    with engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c), Base.metadata)
    assert [d[0] for d in diff] == ["add_index"]


def test_create_schema_is_idempotent(engine: Engine) -> None:
    create_schema(engine)
    with engine.connect() as c:
        assert c.scalar(text("SELECT version_num FROM alembic_version")) == ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_sqlite_pragmas(engine: Engine) -> None:
    with engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_foreign_keys_and_check_constraints_are_enforced(factory: sessionmaker[Session]) -> None:
    with factory() as s, pytest.raises(IntegrityError):
        s.add(Job(instance_id=999, model_id=MODEL, state="queued", attempts=0, max_attempts=1,
                  created_at=T0, updated_at=T0))
        s.commit()
    job = queue(factory)
    with factory() as s, pytest.raises(IntegrityError):
        s.get(Job, job.id).state = "bogus"  # type: ignore[union-attr]
        s.commit()


def test_times_are_timezone_aware_utc_and_naive_times_refused(factory: sessionmaker[Session]) -> None:
    job = queue(factory)
    assert job_row(factory, job.id).created_at == T0
    assert job_row(factory, job.id).created_at.tzinfo is not None
    with factory() as s, pytest.raises(ValueError, match="naive"):
        record_received(s, received(2), MODEL, SALT, now=datetime(2024, 1, 1))


# ---------------------------------------------------------------- receive


def test_record_received_stores_instance_job_and_event(factory: sessionmaker[Session]) -> None:
    with factory() as s:
        instance, job, duplicate = record_received(s, received(), MODEL, SALT, now=T0)
    assert not duplicate and job is not None
    assert (job.state, job.attempts, job.model_id, job.instance_id) == ("queued", 0, MODEL, instance.id)
    assert instance.patient_id_hash == hash_patient_id("PID-42", SALT) != "PID-42"
    assert instance.received_at == T0
    [event] = events(factory)
    assert (event.kind, event.job_id, event.peer_ae, event.sop_instance_uid) == ("received", job.id, "PACS", "1.2.3.4.1")
    assert event.accession_number == "ACC1" and event.model_id == MODEL


def test_patient_id_hash_depends_on_salt_and_needs_one() -> None:
    assert hash_patient_id("PID-42", b"a") != hash_patient_id("PID-42", b"b")
    assert hash_patient_id("PID-42", b"a") == hash_patient_id("PID-42", b"a")
    assert hash_patient_id(None, b"a") is None
    with pytest.raises(ValueError, match="salt"):
        hash_patient_id("PID-42", b"")


def test_duplicate_sop_instance_not_queued_twice_for_same_model(factory: sessionmaker[Session]) -> None:
    first = queue(factory)
    with factory() as s:
        instance, job, duplicate = record_received(s, received(calling_ae="OTHER"), MODEL, SALT, now=T0)
    assert duplicate and job is None and instance.id == first.instance_id
    assert count(factory, Job) == 1 and count(factory, Instance) == 1
    assert [(e.kind, e.peer_ae) for e in events(factory)] == [("received", "PACS"), ("duplicate", "OTHER")]


def test_duplicate_sop_instance_is_queued_for_a_new_model_version(factory: sessionmaker[Session]) -> None:
    first = queue(factory)
    with factory() as s:
        instance, job, duplicate = record_received(s, received(), "demo-2.0", SALT, now=T0)
    assert not duplicate and job is not None and job.model_id == "demo-2.0"
    assert instance.id == first.instance_id
    assert count(factory, Job) == 2 and count(factory, Instance) == 1


def test_queue_functions_refuse_a_session_with_an_open_transaction(factory: sessionmaker[Session]) -> None:
    with factory() as s:
        s.scalars(select(Job)).all()  # autobegins a read transaction
        with pytest.raises(RuntimeError, match="own their transaction"):
            record_received(s, received(), MODEL, SALT, now=T0)


# ---------------------------------------------------------------- claim


def test_claim_sets_lease_and_writes_event(factory: sessionmaker[Session]) -> None:
    jobs = [queue(factory, n) for n in range(1, 4)]
    claimed = claim_jobs(factory, "w1", limit=2, lease_seconds=60, now=T0)
    assert [j.id for j in claimed] == [jobs[0].id, jobs[1].id]  # oldest first, limit respected
    for job in claimed:
        assert (job.state, job.lease_owner, job.attempts) == ("running", "w1", 1)
        assert job.lease_expires_at == T0 + timedelta(seconds=60)
        assert job.instance.spool_path.endswith(".dcm")  # loaded, usable detached
    assert [e.job_id for e in events(factory, kind="claimed")] == [jobs[0].id, jobs[1].id]
    assert [j.id for j in claim_jobs(factory, "w2", 10, 60, now=T0)] == [jobs[2].id]
    assert claim_jobs(factory, "w3", 10, 60, now=T0) == []


def test_concurrent_claims_from_two_threads_never_share_a_job(factory: sessionmaker[Session]) -> None:
    ids = {queue(factory, n).id for n in range(1, 41)}
    start = threading.Barrier(2)
    claimed: dict[str, list[int]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def worker(owner: str) -> None:
        try:
            start.wait()
            while batch := claim_jobs(factory, owner, limit=2, lease_seconds=600):
                claimed[owner].extend(job.id for job in batch)
        except BaseException as error:  # surfaced below; a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(owner,)) for owner in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    all_claims = claimed["a"] + claimed["b"]
    assert len(all_claims) == len(set(all_claims)) == 40 and set(all_claims) == ids
    assert len(events(factory, kind="claimed")) == 40


def test_expired_lease_is_reclaimed_and_old_owner_loses_it(factory: sessionmaker[Session]) -> None:
    job = queue(factory)
    claim_jobs(factory, "w1", 1, lease_seconds=60, now=T0)
    assert claim_jobs(factory, "w2", 1, 60, now=T0 + timedelta(seconds=59)) == []  # still leased
    [again] = claim_jobs(factory, "w2", 1, 60, now=T0 + timedelta(seconds=61))
    assert (again.id, again.lease_owner, again.attempts) == (job.id, "w2", 2)
    assert "reclaimed after the lease of w1 expired" in (events(factory, kind="claimed")[-1].message or "")
    with factory() as s, pytest.raises(LeaseLost):
        complete_job(s, job.id, "w1", "done", REPORTED, DESTS, now=T0 + timedelta(seconds=62))
    with factory() as s, pytest.raises(LeaseLost):
        fail_job(s, job.id, "w1", "internal-error", "boom", retry=True, now=T0 + timedelta(seconds=62))
    assert job_row(factory, job.id).lease_owner == "w2"


def test_renewed_lease_is_not_reclaimed_and_only_the_holder_renews(factory: sessionmaker[Session]) -> None:
    job = queue(factory)
    claim_jobs(factory, "w1", 1, lease_seconds=60, now=T0)
    assert renew_leases(factory, "w2", [job.id], 60, now=T0 + timedelta(seconds=50)) == 0  # not w2's
    assert renew_leases(factory, "w1", [job.id], 60, now=T0 + timedelta(seconds=50)) == 1
    assert claim_jobs(factory, "w2", 1, 60, now=T0 + timedelta(seconds=100)) == []  # held until T0+110
    assert job_row(factory, job.id).lease_expires_at == T0 + timedelta(seconds=110)
    with factory() as s:
        complete_job(s, job.id, "w1", "done", REPORTED, DESTS, now=T0 + timedelta(seconds=105))
    assert renew_leases(factory, "w1", [job.id], 60, now=T0 + timedelta(seconds=106)) == 0  # finished


def test_lease_expiring_on_the_last_attempt_fails_the_job(factory: sessionmaker[Session]) -> None:
    job = queue(factory, max_attempts=2)
    claim_jobs(factory, "w1", 1, 60, now=T0)
    claim_jobs(factory, "w2", 1, 60, now=T0 + timedelta(seconds=61))
    assert claim_jobs(factory, "w3", 1, 60, now=T0 + timedelta(seconds=122)) == []
    row = job_row(factory, job.id)
    assert (row.state, row.last_error, row.attempts, row.lease_owner) == ("failed", "lease expired 2 times", 2, None)
    [failed] = events(factory, kind="failed")
    assert failed.job_id == job.id and failed.reason_code == "lease-expired"
    assert claim_jobs(factory, "w3", 1, 60, now=T0 + timedelta(days=1)) == []  # not retried forever


def test_claim_validates_arguments(factory: sessionmaker[Session]) -> None:
    with pytest.raises(ValueError, match="limit"):
        claim_jobs(factory, "w", 0, 60)
    with pytest.raises(ValueError, match="lease_seconds"):
        claim_jobs(factory, "w", 1, 0)


# ---------------------------------------------------------------- complete and fail


def test_complete_job_done_creates_deliveries_and_event(factory: sessionmaker[Session]) -> None:
    job = queue(factory)
    claim_jobs(factory, "w1", 1, 60, now=T0)
    result = REPORTED
    with factory() as s:
        done = complete_job(s, job.id, "w1", "done", result, DESTS, now=T0 + timedelta(seconds=5))
    assert (done.state, done.lease_owner, done.result_json) == ("done", None, result.to_json())
    with factory() as s:
        rows = s.scalars(select(Delivery).order_by(Delivery.id)).all()
    assert [(d.destination, d.kind, d.state, d.sop_instance_uid) for d in rows] == [
        ("PACS", "sr", "pending", "2.25.1"), ("PACS", "gsps", "pending", "2.25.2"), ("ARCHIVE", "sr", "pending", "2.25.1"),
    ]
    assert all(d.next_attempt_at == T0 + timedelta(seconds=5) and d.attempts == 0 for d in rows)
    [event] = events(factory, kind="done")
    assert event.result_json == result.to_json() and event.job_id == job.id


def test_complete_job_refuses_a_destination_kind_the_result_lacks(factory: sessionmaker[Session]) -> None:
    job = queue(factory)
    claim_jobs(factory, "w1", 1, 60, now=T0)
    with factory() as s, pytest.raises(ValueError, match="gsps"):
        complete_job(s, job.id, "w1", "done", job_result({"sr": "2.25.1"}), DESTS, now=T0)
    assert job_row(factory, job.id).state == "running" and count(factory, Delivery) == 0


def test_complete_job_ineligible_without_deliveries(factory: sessionmaker[Session]) -> None:
    job = queue(factory)
    claim_jobs(factory, "w1", 1, 60, now=T0)
    with factory() as s:
        complete_job(s, job.id, "w1", "ineligible", INELIGIBLE, [], now=T0)
    assert job_row(factory, job.id).state == "ineligible"
    assert count(factory, Delivery) == 0
    assert [e.reason_code for e in events(factory, kind="ineligible")] == ["view-not-frontal"]


def test_complete_job_refuses_other_states_and_unknown_jobs(factory: sessionmaker[Session]) -> None:
    job = queue(factory)
    with factory() as s, pytest.raises(InvalidTransition, match="state"):
        complete_job(s, job.id, "w1", "failed", REPORTED, [])
    with factory() as s, pytest.raises(LeaseLost):  # queued, never claimed by w1
        complete_job(s, job.id, "w1", "done", REPORTED, [])
    with factory() as s, pytest.raises(KeyError, match="job_id"):
        complete_job(s, 999, "w1", "done", REPORTED, [])


def test_expired_but_unclaimed_lease_can_still_complete(factory: sessionmaker[Session]) -> None:
    job = queue(factory)
    claim_jobs(factory, "w1", 1, 60, now=T0)
    with factory() as s:
        complete_job(s, job.id, "w1", "done", REPORTED, DESTS, now=T0 + timedelta(hours=1))
    assert claim_jobs(factory, "w2", 1, 60, now=T0 + timedelta(hours=2)) == []


def test_fail_job_retries_while_attempts_remain_then_fails(factory: sessionmaker[Session]) -> None:
    job = queue(factory, max_attempts=2)
    claim_jobs(factory, "w1", 1, 60, now=T0)
    with factory() as s:
        row = fail_job(s, job.id, "w1", "internal-error", "decoder crashed", retry=True, now=T0)
    assert (row.state, row.lease_owner, row.last_error) == ("queued", None, "internal-error: decoder crashed")
    claim_jobs(factory, "w1", 1, 60, now=T0)
    with factory() as s:
        row = fail_job(s, job.id, "w1", "internal-error", "decoder crashed again", retry=True, now=T0)
    assert (row.state, row.attempts) == ("failed", 2)
    assert [e.kind for e in events(factory, job_id=job.id)] == ["received", "claimed", "retry", "claimed", "failed"]


def test_fail_job_without_retry_fails_at_once(factory: sessionmaker[Session]) -> None:
    job = queue(factory, max_attempts=5)
    claim_jobs(factory, "w1", 1, 60, now=T0)
    with factory() as s:
        row = fail_job(s, job.id, "w1", "internal-error", "not a DICOM image", retry=False, now=T0)
    assert (row.state, row.attempts) == ("failed", 1)
    [failed] = events(factory, kind="failed")
    assert "not retryable" in (failed.message or "") and failed.reason_code == "internal-error"


# ---------------------------------------------------------------- deliveries


def _completed(factory: sessionmaker[Session], n: int = 1, now: datetime = T0) -> Job:
    job = queue(factory, n)
    claim_jobs(factory, "w1", 1, 60, now=now)
    with factory() as s:
        return complete_job(s, job.id, "w1", "done", REPORTED, [("PACS", ("sr",))], now=now)


def test_due_deliveries_only_pending_and_due(factory: sessionmaker[Session]) -> None:
    _completed(factory, 1, now=T0)
    _completed(factory, 2, now=T0 + timedelta(minutes=10))
    with factory() as s:
        assert [d.job.instance.sop_instance_uid for d in due_deliveries(s, T0 + timedelta(minutes=1))] == ["1.2.3.4.1"]
        due = due_deliveries(s, T0 + timedelta(minutes=20), limit=10)
        assert len(due) == 2
        mark_sent(s, due[0].id, now=T0)  # the read left no transaction open
        assert len(due_deliveries(s, T0 + timedelta(minutes=20))) == 1
        assert due_deliveries(s, T0 + timedelta(minutes=20), limit=1)[0].id == due[1].id


def test_mark_sent_once_with_event(factory: sessionmaker[Session]) -> None:
    _completed(factory)
    with factory() as s:
        delivery_id = due_deliveries(s, T0)[0].id  # plain int: a rollback expires ORM rows
        sent = mark_sent(s, delivery_id, now=T0)
        assert (sent.state, sent.attempts, sent.next_attempt_at) == ("sent", 1, None)
        with pytest.raises(InvalidTransition, match="not pending"):
            mark_sent(s, delivery_id, now=T0)
        with pytest.raises(KeyError, match="delivery_id"):
            mark_sent(s, 999, now=T0)
    [event] = events(factory, kind="sent")
    assert event.delivery_id == delivery_id and event.sop_instance_uid == "1.2.3.4.1"


def test_backoff_is_exponential_and_capped() -> None:
    assert [backoff_seconds(n, 10, 25) for n in (1, 2, 3, 4)] == [10, 20, 25, 25]
    assert backoff_seconds(10_000, 10, 3600) == 3600


def test_mark_failed_backs_off_then_dead(factory: sessionmaker[Session]) -> None:
    _completed(factory)
    with factory() as s:
        [delivery] = due_deliveries(s, T0)
    policy = dict(backoff_base_s=10, backoff_cap_s=25, max_attempts=4)
    expected_delays = [10, 20, 25]
    now = T0
    for attempt, delay in enumerate(expected_delays, start=1):
        with factory() as s:
            row = mark_failed(s, delivery.id, "association rejected", now=now, **policy)
        assert (row.state, row.attempts) == ("pending", attempt)
        assert row.next_attempt_at == now + timedelta(seconds=delay)
        with factory() as s:
            assert due_deliveries(s, now + timedelta(seconds=delay - 1)) == []  # not due before
        now += timedelta(seconds=delay)
    with factory() as s:
        row = mark_failed(s, delivery.id, "association rejected", now=now, **policy)
        assert (row.state, row.attempts, row.next_attempt_at) == ("dead", 4, None)
        assert due_deliveries(s, now + timedelta(days=1)) == []
        with pytest.raises(InvalidTransition):
            mark_failed(s, delivery.id, "again", now=now, **policy)
    assert len(events(factory, kind="delivery_retry")) == 3 and len(events(factory, kind="dead")) == 1


# ---------------------------------------------------------------- audit atomicity


def test_each_state_change_writes_exactly_one_event(factory: sessionmaker[Session]) -> None:
    job = _completed(factory)
    with factory() as s:
        mark_sent(s, due_deliveries(s, T0)[0].id, now=T0)
    assert [e.kind for e in events(factory, job_id=job.id)] == ["received", "claimed", "done", "sent"]


def test_refused_received_event_rolls_back_instance_and_job(engine: Engine, factory: sessionmaker[Session]) -> None:
    fail_event_insert(engine, "received")
    with factory() as s, pytest.raises(IntegrityError, match="audit insert refused"):
        record_received(s, received(), MODEL, SALT, now=T0)
    assert (count(factory, Instance), count(factory, Job), count(factory, Event)) == (0, 0, 0)


def test_refused_duplicate_event_rolls_back(engine: Engine, factory: sessionmaker[Session]) -> None:
    queue(factory)
    fail_event_insert(engine, "duplicate")
    with factory() as s, pytest.raises(IntegrityError):
        record_received(s, received(), MODEL, SALT, now=T0)
    assert count(factory, Event) == 1


def test_refused_claimed_event_leaves_job_queued(engine: Engine, factory: sessionmaker[Session]) -> None:
    job = queue(factory)
    fail_event_insert(engine, "claimed")
    with pytest.raises(IntegrityError):
        claim_jobs(factory, "w1", 1, 60, now=T0)
    row = job_row(factory, job.id)
    assert (row.state, row.attempts, row.lease_owner) == ("queued", 0, None)


def test_refused_lease_failure_event_leaves_job_running(engine: Engine, factory: sessionmaker[Session]) -> None:
    job = queue(factory, max_attempts=1)
    claim_jobs(factory, "w1", 1, 60, now=T0)
    fail_event_insert(engine, "failed")
    with pytest.raises(IntegrityError):
        claim_jobs(factory, "w2", 1, 60, now=T0 + timedelta(seconds=61))
    assert job_row(factory, job.id).state == "running"


def test_refused_done_event_leaves_job_running_without_deliveries(engine: Engine, factory: sessionmaker[Session]) -> None:
    job = queue(factory)
    claim_jobs(factory, "w1", 1, 60, now=T0)
    fail_event_insert(engine, "done")
    with factory() as s, pytest.raises(IntegrityError):
        complete_job(s, job.id, "w1", "done", REPORTED, DESTS, now=T0)
    row = job_row(factory, job.id)
    assert (row.state, row.lease_owner, row.result_json) == ("running", "w1", None)
    assert count(factory, Delivery) == 0
    with factory() as s:  # the same session object stays usable after the rollback
        assert s.get(Job, job.id).state == "running"  # type: ignore[union-attr]


@pytest.mark.parametrize(("kind", "retry"), [("retry", True), ("failed", False)])
def test_refused_fail_event_keeps_lease(engine: Engine, factory: sessionmaker[Session], kind: str, retry: bool) -> None:
    job = queue(factory)
    claim_jobs(factory, "w1", 1, 60, now=T0)
    fail_event_insert(engine, kind)
    with factory() as s, pytest.raises(IntegrityError):
        fail_job(s, job.id, "w1", "internal-error", "boom", retry=retry, now=T0)
    row = job_row(factory, job.id)
    assert (row.state, row.lease_owner, row.last_error) == ("running", "w1", None)


@pytest.mark.parametrize("kind", ["sent", "delivery_retry"])
def test_refused_delivery_event_keeps_delivery_pending(engine: Engine, factory: sessionmaker[Session], kind: str) -> None:
    _completed(factory)
    fail_event_insert(engine, kind)
    with factory() as s:
        delivery_id = due_deliveries(s, T0)[0].id
        with pytest.raises(IntegrityError):
            if kind == "sent":
                mark_sent(s, delivery_id, now=T0)
            else:
                mark_failed(s, delivery_id, "x", backoff_base_s=1, backoff_cap_s=1, max_attempts=5, now=T0)
    with factory() as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None and (row.state, row.attempts) == ("pending", 0)
    assert Counter(e.kind for e in events(factory))[kind] == 0
