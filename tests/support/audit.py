"""The audit scenario shared by tests/test_audit.py (SQLite) and tests/test_postgres.py (PostgreSQL)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from screener.store.queue import (
    ReceivedInstance,
    claim_jobs,
    complete_job,
    fail_job,
    mark_failed,
    mark_sent,
    record_received,
)
from screener.result import JobResult, Measurement
from tests.support.store import MODEL, SALT, T0, job_result

VIEWS = ("v_instance_history", "v_failures", "v_delivery_backlog", "v_positive_screens")


def minutes(m: float) -> datetime:
    return T0 + timedelta(minutes=m)


def outcome(bmd: float, tscore: float | None, category: str | None, objects: dict[str, str] | None = None,
            precision: str | None = "fp32") -> JobResult:
    """The result the worker stores for a reported image (``precision`` None: one stored
    before the precision was recorded)."""
    sites = ("L1", "L2", "L3", "L4")
    measurement = Measurement(
        model_id=MODEL, demo=True, bmd_g_cm2={**{s: bmd + 0.01 * i for i, s in enumerate(sites)}, "L1-L4": bmd},
        tscore=None if tscore is None else {**{s: tscore for s in sites}, "L1-L4": tscore},
        who_category=category, tscore_note="", precision=precision)
    return job_result(objects, measurement=measurement, reason="eligible")


def ineligible(code: str, reason: str) -> JobResult:
    return job_result(status="ineligible", code=code, reason=reason)


def received(n: int, accession: str, study: str) -> ReceivedInstance:
    return ReceivedInstance(
        sop_instance_uid=f"1.2.3.4.{n}", study_instance_uid=study, series_instance_uid=f"{study}.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
        spool_path=f"/spool/{n}.dcm", size_bytes=1000, accession_number=accession,
        patient_id=f"PID-{n}", calling_ae="MODALITY", peer_address="10.0.0.1:104",
    )


def receive_and_claim(factory: sessionmaker[Session], n: int, accession: str, study: str, at: datetime) -> int:
    with factory() as s:
        _, job, duplicate = record_received(s, received(n, accession, study), MODEL, SALT, now=at)
    assert job is not None and not duplicate
    claimed = claim_jobs(factory, "w1", limit=1, lease_seconds=300, now=at + timedelta(seconds=30))
    assert [j.id for j in claimed] == [job.id]
    return job.id


def deliveries_of(factory: sessionmaker[Session], job_id: int) -> dict[tuple[str, str], int]:
    with factory() as s:
        rows = s.execute(text("SELECT destination, kind, id FROM deliveries WHERE job_id = :j"), {"j": job_id})
        return {(d, k): i for d, k, i in rows}


def populate(factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """Five instances: positive screen with one dead GSPS; normal with its SR pending; ineligible;
    failed; next day a second positive screen. Shared with tests/test_postgres.py."""
    j1 = receive_and_claim(factory, 1, "ACC1", "1.2.3.100", minutes(0))
    with factory() as s:
        complete_job(s, j1, "w1", "done", outcome(0.62, -3.1, "osteoporosis", {"sr": "2.25.11", "gsps": "2.25.12"}),
                     [("PACS", ("sr", "gsps")), ("ARCHIVE", ("sr",))], now=minutes(2))
    d1 = deliveries_of(factory, j1)
    with factory() as s:
        mark_sent(s, d1[("PACS", "sr")], now=minutes(3))
    with factory() as s:
        mark_failed(s, d1[("PACS", "gsps")], "association rejected", backoff_base_s=10, backoff_cap_s=60,
                    max_attempts=1, now=minutes(4))
    with factory() as s:
        mark_sent(s, d1[("ARCHIVE", "sr")], now=minutes(5))

    j2 = receive_and_claim(factory, 2, "ACC2", "1.2.3.200", minutes(10))
    with factory() as s:
        complete_job(s, j2, "w1", "done", outcome(1.05, 0.2, "normal", {"sr": "2.25.21"}, precision="bf16"), [("PACS", ("sr",))], now=minutes(14))

    j3 = receive_and_claim(factory, 3, "ACC3", "1.2.3.300", minutes(20))
    with factory() as s:
        complete_job(s, j3, "w1", "ineligible", ineligible("body-part", "BodyPartExamined is KNEE"), [],
                     now=minutes(21))

    j4 = receive_and_claim(factory, 4, "ACC4", "1.2.3.400", minutes(30))
    with factory() as s:
        fail_job(s, j4, "w1", "corrupt-pixel-data", "decoder crashed", retry=False, now=minutes(31))

    day2 = T0 + timedelta(days=1)
    j5 = receive_and_claim(factory, 5, "ACC5", "1.2.3.500", day2)
    with factory() as s:
        complete_job(s, j5, "w1", "done", outcome(0.70, -2.6, "osteoporosis", {"sr": "2.25.51"}, precision=None), [("PACS", ("sr",))],
                     now=day2 + timedelta(minutes=1))
    with factory() as s:
        mark_sent(s, deliveries_of(factory, j5)[("PACS", "sr")], now=day2 + timedelta(minutes=2))
    return factory
