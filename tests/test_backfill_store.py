"""The backfill's progress in the database (screener.store.backfill), on SQLite: runs joined by
key, studies listed once, claims under a lease, a dead holder's claim taken back, retries and
failure, a stop that gives a study back untouched, and the run finishing."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from screener.codes import ReasonCode
from screener.store.backfill import (
    NewStudy,
    claim_study,
    finish_study,
    list_studies,
    open_run,
    progress,
    release_study,
    renew_study,
    retry_study,
    set_queried_through,
)
from screener.store.models import BackfillState, BackfillStudy, Event

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
DAY = date(2024, 1, 1)


def _run(factory: sessionmaker[Session], studies: int = 3) -> int:
    run_id, created = open_run(factory, key="k", source="PACS@h:104", first_date=DAY, last_date=DAY, min_age=50.0,
                               max_age=None, model_id="m", now=T0)
    assert created
    list_studies(factory, run_id, [NewStudy(f"1.2.{i}", DAY) for i in range(studies)], now=T0)
    return run_id


def _states(factory: sessionmaker[Session]) -> dict[str, tuple[str, int]]:
    with factory() as s:
        return {r.study_uid: (r.state, r.attempts) for r in s.scalars(select(BackfillStudy))}


def test_the_same_key_joins_the_run_and_a_study_is_listed_once(factory: sessionmaker[Session]) -> None:
    run_id = _run(factory)
    again, created = open_run(factory, key="k", source="PACS@h:104", first_date=DAY, last_date=DAY, min_age=50.0,
                              max_age=None, model_id="m")
    assert (again, created) == (run_id, False)
    young = NewStudy("1.2.9", DAY, BackfillState.SKIPPED, ReasonCode.BACKFILL_OUT_OF_AGE_BAND)
    assert list_studies(factory, run_id, [NewStudy("1.2.0", DAY), young]) == 1  # 1.2.0 was listed already
    with factory() as s:
        p = progress(s, run_id)
    assert p.counts == {"pending": 3, "skipped": 1} and p.skipped == {"out-of-age-band": 1} and p.left == 3


def test_claims_are_leased_and_an_expired_lease_is_taken_back(factory: sessionmaker[Session]) -> None:
    run_id = _run(factory, studies=1)
    study = claim_study(factory, run_id, "other-host/1:1:a:0", 60, 3, now=T0)
    assert study is not None and study.attempts == 1
    assert claim_study(factory, run_id, "here/1:2:b:0", 60, 3, now=T0 + timedelta(seconds=30)) is None
    assert study.moved_at is None
    assert renew_study(factory, study.id, "other-host/1:1:a:0", 60, now=T0 + timedelta(seconds=30))
    assert claim_study(factory, run_id, "here/1:2:b:0", 60, 3, now=T0 + timedelta(seconds=70)) is None  # renewed
    moved = T0 + timedelta(seconds=40)  # a C-MOVE starts: recorded once, for the attempts after this one
    assert renew_study(factory, study.id, "other-host/1:1:a:0", 30, now=moved, moving=True)
    assert renew_study(factory, study.id, "other-host/1:1:a:0", 30, now=moved + timedelta(seconds=5), moving=True)
    again = claim_study(factory, run_id, "here/1:2:b:0", 60, 3, now=T0 + timedelta(seconds=95))
    assert again is not None and (again.id, again.attempts) == (study.id, 2)
    assert again.moved_at is not None and again.moved_at.replace(tzinfo=UTC) == moved
    # the first holder comes back too late: its outcome is not recorded
    assert not finish_study(factory, study.id, "other-host/1:1:a:0", BackfillState.DONE, images=1)
    assert finish_study(factory, study.id, "here/1:2:b:0", BackfillState.DONE, images=1)
    assert _states(factory) == {"1.2.0": ("done", 2)}


def test_a_holder_that_died_on_this_host_is_taken_back_at_once(factory: sessionmaker[Session]) -> None:
    run_id = _run(factory, studies=1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone_pid = int(dead.stdout)  # a process that has exited
    claim_study(factory, run_id, f"thishost/7:{gone_pid}:a:0", 600, 3, now=T0)
    alive = f"thishost/7:{os.getpid()}:b:0"
    assert claim_study(factory, run_id, f"otherhost/7:{gone_pid}:c:0", 600, 3, now=T0) is None  # not its host
    study = claim_study(factory, run_id, alive, 600, 3, now=T0 + timedelta(seconds=1))
    assert study is not None and study.lease_owner == alive


def test_retries_then_failure_and_the_run_finishes(factory: sessionmaker[Session]) -> None:
    run_id = _run(factory, studies=2)
    set_queried_through(factory, run_id, DAY)
    now = T0
    for attempt in (1, 2):
        study = claim_study(factory, run_id, "h/1:1:a:0", 60, 2, now=now)
        assert study is not None and study.study_uid == "1.2.0" and study.attempts == attempt
        state = retry_study(factory, study.id, "h/1:1:a:0", 30, "C-MOVE failed", 2, now=now)
        assert state == (BackfillState.PENDING if attempt == 1 else BackfillState.FAILED)
        now += timedelta(seconds=31)  # past the retry delay
    other = claim_study(factory, run_id, "h/1:1:a:0", 60, 2, now=now)
    assert other is not None and other.study_uid == "1.2.1"
    # stopped while waiting its turn: given back, the attempt not counted
    assert release_study(factory, other.id, "h/1:1:a:0", now=now)
    assert _states(factory)["1.2.1"] == ("pending", 0)
    other = claim_study(factory, run_id, "h/1:1:a:0", 60, 2, now=now)
    assert other is not None
    assert finish_study(factory, other.id, "h/1:1:a:0", BackfillState.DONE, images=3, now=now)
    with factory() as s:
        p = progress(s, run_id)
        kinds = [e.kind for e in s.scalars(select(Event).order_by(Event.id))]
    assert p.counts == {"done": 1, "failed": 1} and p.images == 3 and p.finished_at is not None
    assert kinds[0] == "backfill_started" and kinds[-1] == "backfill_finished"
    assert kinds.count("backfill_study") == 3  # retry, failed, done
