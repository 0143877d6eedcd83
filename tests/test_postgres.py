"""The store, the SQL views and the audit queries on a real PostgreSQL server (tests/support/pg.py):
the multi-node path, where several nodes claim from one queue with FOR UPDATE SKIP LOCKED."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from screener import audit
from screener.store.db import alembic_config, create_schema, make_engine, session_factory
from screener.store.models import Base, Delivery, Event, Instance, Job, JobState
from screener.store.queue import (
    InvalidTransition,
    LeaseLost,
    claim_jobs,
    complete_job,
    due_deliveries,
    fail_job,
    mark_failed,
    mark_sent,
    record_received,
)
from tests.support.audit import VIEWS, minutes, outcome, populate
from tests.support.store import DESTS, MODEL, REPORTED, SALT, T0, received

pytestmark = [pytest.mark.postgres]


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    """A freshly migrated, empty database (the server is shared by the session)."""
    engine = make_engine(postgres_url)
    with engine.begin() as c:
        c.exec_driver_sql("DROP SCHEMA public CASCADE")
        c.exec_driver_sql("CREATE SCHEMA public")
    create_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


def queue(factory: sessionmaker[Session], n: int, **kw: object) -> Job:
    with factory() as s:
        _, job, duplicate = record_received(s, received(n), MODEL, SALT, now=T0, **kw)  # type: ignore[arg-type]
    assert job is not None and not duplicate
    return job


def job_row(factory: sessionmaker[Session], job_id: int) -> Job:
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def event_kinds(factory: sessionmaker[Session], job_id: int) -> list[str]:
    with factory() as s:
        return list(s.scalars(select(Event.kind).where(Event.job_id == job_id).order_by(Event.id)))


# ---------------------------------------------------------------- schema


def test_migrations_build_the_model_schema_and_views_on_postgresql(engine: Engine) -> None:
    assert engine.dialect.name == "postgresql"
    with engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata)
        assert diff == []
        assert c.scalar(text("SELECT version_num FROM alembic_version")) == \
            ScriptDirectory.from_config(alembic_config()).get_current_head()
        views = set(c.scalars(text("SELECT table_name FROM information_schema.views WHERE table_schema = 'public'")))
        assert views == set(VIEWS)
        assert c.scalar(text("SHOW server_version_num")) >= "120000"
    create_schema(engine)  # idempotent


def test_migrations_downgrade_and_upgrade_again_on_postgresql(engine: Engine) -> None:
    """Every revision's downgrade runs on PostgreSQL (views dropped before the tables they read,
    columns added later dropped again), and the head is rebuilt to the model schema."""
    from alembic import command

    config = alembic_config()
    with engine.begin() as c:
        config.attributes["connection"] = c
        command.downgrade(config, "0005")
    with engine.connect() as c:
        columns = set(c.scalars(text("SELECT column_name FROM information_schema.columns "
                                     "WHERE table_name = 'backfill_studies'")))
        assert "moved_at" not in columns and "attempts" in columns
        history = set(c.scalars(text("SELECT column_name FROM information_schema.columns "
                                     "WHERE table_name = 'v_instance_history'")))
        assert "bmd_precision" not in history and "who_category" in history
    with engine.begin() as c:
        config.attributes["connection"] = c
        command.downgrade(config, "0001")
    create_schema(engine)
    with engine.connect() as c:
        assert compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata) == []
        history = set(c.scalars(text("SELECT column_name FROM information_schema.columns "
                                     "WHERE table_name = 'v_instance_history'")))
        assert "bmd_precision" in history


def test_schema_comparison_would_notice_a_missing_index(engine: Engine) -> None:
    with engine.begin() as c:
        c.exec_driver_sql("DROP INDEX ix_jobs_state_lease_expires_at")
    with engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c), Base.metadata)
    assert [d[0] for d in diff] == ["add_index"]


def test_constraints_and_aware_times_on_postgresql(factory: sessionmaker[Session]) -> None:
    job = queue(factory, 1)
    with factory() as s, pytest.raises(IntegrityError):
        s.execute(text("UPDATE jobs SET state = 'bogus' WHERE id = :j"), {"j": job.id})
    with factory() as s, pytest.raises(IntegrityError):
        s.execute(text("UPDATE jobs SET instance_id = 999 WHERE id = :j"), {"j": job.id})
    with factory() as s:
        instance = s.scalars(select(Instance)).one()
        assert instance.received_at == T0 and instance.received_at.tzinfo is not None


# ---------------------------------------------------------------- queue round trip


def test_queue_round_trip(factory: sessionmaker[Session]) -> None:
    job = queue(factory, 1)
    with factory() as s:
        _, again, duplicate = record_received(s, received(1), MODEL, SALT, now=T0)
    assert again is None and duplicate
    other = queue(factory, 2, max_attempts=2)

    claimed = claim_jobs(factory, "w1", 10, 60, now=T0)
    assert [j.id for j in claimed] == [job.id, other.id]
    assert claimed[0].instance.sop_instance_uid == "1.2.3.4.1"  # loaded, usable detached
    assert all(j.state == JobState.RUNNING and j.lease_expires_at == T0 + timedelta(seconds=60) for j in claimed)
    assert claim_jobs(factory, "w2", 10, 60, now=T0) == []

    with factory() as s:
        done = complete_job(s, job.id, "w1", "done",
                            outcome(0.62, -3.1, "osteoporosis", {"sr": "2.25.1", "gsps": "2.25.2"}), DESTS,
                            now=T0 + timedelta(seconds=5))
    assert done.state == JobState.DONE and done.lease_owner is None
    with factory() as s:
        with pytest.raises(LeaseLost):
            complete_job(s, job.id, "w1", "done", REPORTED, [], now=T0)
        with pytest.raises(InvalidTransition):
            complete_job(s, other.id, "w1", "failed", REPORTED, [], now=T0)

    with factory() as s:
        retried = fail_job(s, other.id, "w1", "internal-error", "timeout", retry=True, now=T0 + timedelta(seconds=6))
    assert retried.state == JobState.QUEUED and retried.attempts == 1
    assert [j.id for j in claim_jobs(factory, "w2", 10, 60, now=T0 + timedelta(seconds=7))] == [other.id]
    with factory() as s:
        failed = fail_job(s, other.id, "w2", "internal-error", "timeout", retry=True, now=T0 + timedelta(seconds=8))
    assert failed.state == JobState.FAILED and failed.attempts == 2 and failed.last_error == "internal-error: timeout"

    with factory() as s:
        due = due_deliveries(s, T0 + timedelta(seconds=5))
        assert [(d.destination, d.kind, d.sop_instance_uid) for d in due] == [
            ("PACS", "sr", "2.25.1"), ("PACS", "gsps", "2.25.2"), ("ARCHIVE", "sr", "2.25.1")]
        assert due[0].job.instance.sop_instance_uid == "1.2.3.4.1"
        ids = [d.id for d in due]  # the refused mark_sent below rolls back, which expires the rows
        assert due_deliveries(s, T0) == []
        sent = mark_sent(s, ids[0], now=T0 + timedelta(seconds=10))
        assert sent.state == "sent" and sent.attempts == 1
        with pytest.raises(InvalidTransition):
            mark_sent(s, ids[0], now=T0)
        retry = mark_failed(s, ids[1], "refused", backoff_base_s=10, backoff_cap_s=60, max_attempts=2,
                            now=T0 + timedelta(seconds=10))
        assert retry.state == "pending" and retry.next_attempt_at == T0 + timedelta(seconds=20)
        assert [d.id for d in due_deliveries(s, T0 + timedelta(seconds=15))] == [ids[2]]
        dead = mark_failed(s, ids[1], "refused", backoff_base_s=10, backoff_cap_s=60, max_attempts=2,
                           now=T0 + timedelta(seconds=20))
        assert dead.state == "dead" and dead.next_attempt_at is None

    assert event_kinds(factory, job.id) == ["received", "claimed", "done", "sent", "delivery_retry", "dead"]
    assert event_kinds(factory, other.id) == ["received", "claimed", "retry", "claimed", "failed"]
    with factory() as s:
        stored = s.get(Job, job.id)
        assert stored is not None and stored.result_json["result"]["who_category"] == "osteoporosis"
        assert s.scalar(select(func.count()).select_from(Delivery)) == 3


# ---------------------------------------------------------------- several nodes


def test_claim_skips_rows_locked_by_another_node_without_waiting(engine: Engine, postgres_url: str) -> None:
    factory = session_factory(engine)
    first, second = queue(factory, 1), queue(factory, 2)
    # Node B's claims give up after 5 s instead of hanging if they ever wait for node A's lock.
    node_b = make_engine(postgres_url, connect_args={"options": "-c lock_timeout=5000"})
    try:
        with engine.connect() as node_a:
            node_a.execute(text("SELECT id FROM jobs WHERE id = :j FOR UPDATE"), {"j": first.id})
            claimed = claim_jobs(session_factory(node_b), "node-b", 10, 60, now=T0)
            assert [j.id for j in claimed] == [second.id]
            node_a.rollback()
        assert [j.id for j in claim_jobs(session_factory(node_b), "node-b", 10, 60, now=T0)] == [first.id]
    finally:
        node_b.dispose()


@pytest.mark.parametrize("nodes", [4])
def test_concurrent_claims_from_several_nodes_never_share_a_job(
        engine: Engine, postgres_url: str, nodes: int) -> None:
    factory = session_factory(engine)
    ids = {queue(factory, n).id for n in range(1, 121)}
    start = threading.Barrier(nodes)
    claimed: dict[str, list[int]] = {f"node-{i}": [] for i in range(nodes)}
    errors: list[BaseException] = []

    def node(owner: str) -> None:
        # A separate engine per node: its own connection pool, as on another machine.
        own = make_engine(postgres_url, pool_size=1, max_overflow=0,
                          connect_args={"options": "-c lock_timeout=30000"})
        try:
            own_factory = session_factory(own)
            start.wait(timeout=30)
            while batch := claim_jobs(own_factory, owner, limit=3, lease_seconds=600):
                claimed[owner].extend(job.id for job in batch)
        except BaseException as error:  # surfaced below; a thread's exception is otherwise lost
            errors.append(error)
        finally:
            own.dispose()

    threads = [threading.Thread(target=node, args=(owner,)) for owner in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    all_claims = [job_id for claims in claimed.values() for job_id in claims]
    assert len(all_claims) == len(set(all_claims)) == len(ids) and set(all_claims) == ids
    with factory() as s:
        assert s.scalar(select(func.count()).select_from(Event).where(Event.kind == "claimed")) == len(ids)
        owners = dict(s.execute(select(Job.id, Job.lease_owner)).all())
    assert all(owners[job_id] == owner for owner, claims in claimed.items() for job_id in claims)
    assert all(job_row(factory, job_id).attempts == 1 for job_id in list(ids)[:5])


def test_expired_lease_is_reclaimed_by_another_node(factory: sessionmaker[Session]) -> None:
    job = queue(factory, 1)
    assert [j.id for j in claim_jobs(factory, "node-a", 1, 60, now=T0)] == [job.id]
    assert claim_jobs(factory, "node-b", 1, 60, now=T0 + timedelta(seconds=59)) == []
    reclaimed = claim_jobs(factory, "node-b", 1, 60, now=T0 + timedelta(seconds=60))
    assert [j.id for j in reclaimed] == [job.id] and reclaimed[0].attempts == 2
    with factory() as s, pytest.raises(LeaseLost):
        complete_job(s, job.id, "node-a", "done", REPORTED, [], now=T0 + timedelta(seconds=61))
    with factory() as s:
        complete_job(s, job.id, "node-b", "done", REPORTED, [], now=T0 + timedelta(seconds=62))
    with factory() as s:
        message = s.scalars(select(Event.message).where(Event.kind == "claimed").order_by(Event.id)).all()[-1]
    assert "reclaimed after the lease of node-a expired" in message


def test_lease_expiring_on_the_last_attempt_fails_the_job(factory: sessionmaker[Session]) -> None:
    job = queue(factory, 1, max_attempts=1)
    claim_jobs(factory, "node-a", 1, 60, now=T0)
    assert claim_jobs(factory, "node-b", 1, 60, now=T0 + timedelta(minutes=5)) == []
    row = job_row(factory, job.id)
    assert row.state == JobState.FAILED and row.lease_owner is None
    with factory() as s:
        failed = s.scalars(select(Event).where(Event.kind == "failed")).one()
    assert failed.reason_code == "lease-expired"


# ---------------------------------------------------------------- views and audit


@pytest.fixture
def scenario(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    return populate(factory)


def rows(engine: Engine, sql: str) -> list[dict]:
    with engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(text(sql))]


def test_views_return_rows_on_postgresql(engine: Engine, scenario: sessionmaker[Session]) -> None:
    history = rows(engine, "SELECT * FROM v_instance_history ORDER BY instance_id")
    assert [(r["accession_number"], r["job_state"], r["who_category"]) for r in history] == [
        ("ACC1", "done", "osteoporosis"), ("ACC2", "done", "normal"), ("ACC3", "ineligible", None),
        ("ACC4", "failed", None), ("ACC5", "done", "osteoporosis")]
    first = history[0]
    assert first["bmd_l1_l4"] == pytest.approx(0.62) and first["bmd_l2"] == pytest.approx(0.63)
    assert first["tscore_l1_l4"] == pytest.approx(-3.1)
    assert (first["deliveries_pending"], first["deliveries_sent"], first["deliveries_dead"]) == (0, 2, 1)
    assert history[2]["result_code"] == "body-part" and history[2]["bmd_l1"] is None
    assert isinstance(first["received_at"], datetime) and first["received_at"] == minutes(0)
    assert [r["bmd_precision"] for r in history] == ["fp32", "bf16", None, None, None]  # ACC5: from before it was recorded

    positives = rows(engine, "SELECT * FROM v_positive_screens ORDER BY completed_at")
    assert [(r["accession_number"], r["who_category"]) for r in positives] == [
        ("ACC1", "osteoporosis"), ("ACC5", "osteoporosis")]
    assert positives[0]["completed_at"] == minutes(2) and positives[1]["tscore_l1_l4"] == pytest.approx(-2.6)

    failures = rows(engine, "SELECT * FROM v_failures ORDER BY time, event_id")
    assert [(r["kind"], r["reason_code"], r["delivery_kind"]) for r in failures] == [
        ("dead", "delivery-failed", "gsps"), ("ineligible", "body-part", None), ("failed", "corrupt-pixel-data", None)]
    assert failures[1]["message"] == "BodyPartExamined is KNEE"

    backlog = rows(engine, "SELECT * FROM v_delivery_backlog")
    assert [(r["destination"], r["pending"], r["retrying"]) for r in backlog] == [("PACS", 1, 0)]
    assert backlog[0]["oldest_queued_at"] == minutes(14) and backlog[0]["oldest_age_s"] > 0


def test_audit_queries_on_postgresql(engine: Engine, scenario: sessionmaker[Session],
                                     tmp_path: Path) -> None:
    with scenario() as s:
        history = audit.history(s, accession="ACC1")
        failures = audit.failures(s, T0)
        backlog = audit.backlog(s, now=minutes(60))
        hours = audit.throughput(s, T0, "hour")
        days = audit.throughput(s, T0, "day")
        positives = audit.positives(s, T0, T0 + timedelta(days=2))

    assert [r["kind"] for r in history] == ["received", "claimed", "done", "sent", "dead", "sent"]
    assert history[3]["destination"] == "PACS" and history[0]["time"] == minutes(0)
    assert [(r["kind"], r["reason_code"]) for r in failures] == [
        ("dead", "delivery-failed"), ("ineligible", "body-part"), ("failed", "corrupt-pixel-data")]
    assert backlog == [{"destination": "PACS", "pending": 1, "retrying": 0, "oldest_queued_at": minutes(14),
                        "oldest_age_s": 46 * 60.0, "next_attempt_at": minutes(14)}]
    assert [(r["bucket"], r["received"], r["done"], r["ineligible"], r["failed"], r["sr_sent"]) for r in days] == [
        ("2024-06-01", 4, 2, 1, 1, 2), ("2024-06-02", 1, 1, 0, 0, 1)]
    assert hours[0]["bucket"] == "2024-06-01T12:00Z" and hours[0]["done_p50_s"] == pytest.approx(180.0)
    assert [(r["accession_number"], r["who_category"], r["tscore_l1_l4"]) for r in positives] == [
        ("ACC1", "osteoporosis", -3.1), ("ACC5", "osteoporosis", -2.6)]

    # The same story on SQLite gives the same answers: the audit does not depend on the backend.
    sqlite = make_engine(f"sqlite:///{tmp_path / 'same.db'}")
    try:
        create_schema(sqlite)
        twin = populate(session_factory(sqlite))
        with twin() as s:
            assert audit.history(s, accession="ACC1") == history
            assert audit.failures(s, T0) == failures
            assert audit.backlog(s, now=minutes(60)) == backlog
            assert audit.throughput(s, T0, "hour") == hours
            assert audit.throughput(s, T0, "day") == days
            assert audit.positives(s, T0, T0 + timedelta(days=2)) == positives
    finally:
        sqlite.dispose()

