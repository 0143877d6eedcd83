"""`screener backfill` against a real Orthanc holding generated chest films as the PACS: C-FIND,
C-MOVE to the node's own SCP, screening through the normal queue, a kill -9 and a resume that
does nothing twice, the throttle and the quiet hours, the deduplication by model, and several
runners sharing one backfill on PostgreSQL."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from datetime import UTC, datetime
from datetime import time as clock_time
from pathlib import Path

import pytest

from screener.backfill import AgeBand, QuietHours, Throttle, parse_quiet_hours
from tests.support.archive import Archive, backfill_stack, make_archive, run_backfill
from tests.support.common import wait_for
from tests.support.orthanc import Orthanc
from tests.support.serve import Node

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk]


# ---------------------------------------------------------------- the throttle's parts, alone


def test_quiet_hours_wrap_midnight_and_say_how_long_is_left() -> None:
    day = parse_quiet_hours("07:00-19:00")
    assert day.contains(clock_time(7, 0)) and day.contains(clock_time(18, 59)) and not day.contains(clock_time(19, 0))
    night = parse_quiet_hours("22:00-06:00")
    assert night.contains(clock_time(23, 30)) and night.contains(clock_time(5, 0)) and not night.contains(clock_time(12))
    assert night.seconds_left(datetime(2024, 1, 1, 23, 0, tzinfo=UTC)) == 7 * 3600
    assert night.seconds_left(datetime(2024, 1, 1, 12, 0, tzinfo=UTC)) == 0
    assert QuietHours(clock_time(1), clock_time(2)).seconds_left(datetime(2024, 1, 1, 1, 30, tzinfo=UTC)) == 1800
    for bad in ("7-19", "07:00", "07:00-07:00", "25:00-26:00"):
        with pytest.raises(ValueError):
            parse_quiet_hours(bad)


def test_throttle_gives_each_retrieval_its_slot() -> None:
    now = [100.0]
    throttle = Throttle(per_minute=60, clock=lambda: now[0])
    assert throttle.delay(1) == 0  # the first at once
    assert throttle.delay(3) == 1.0  # after the first image's second
    assert throttle.delay(1) == 4.0  # after those three
    now[0] = 200.0
    assert throttle.delay(1) == 0  # idle time is not saved up as a burst
    assert Throttle(per_minute=0).delay(1000) == 0  # no limit


def test_age_band() -> None:
    band = AgeBand(50, 80, include_unknown=False)
    assert band.contains(50) and band.contains(80) and not band.contains(49.9) and not band.contains(81)
    assert not band.contains(None) and AgeBand(50, None, include_unknown=True).contains(None)


# ---------------------------------------------------------------- against a real Orthanc

RANGE = ("--from", "2024-01-01", "--to", "2024-01-31")


def _stack(tmp_path: Path, archive: Archive, workers: int = 1, **backfill: object) -> tuple[Orthanc, Node]:
    # retries after 1 s and 10-day query windows: a test's studies span a month
    return backfill_stack(tmp_path, archive, workers, retry_after_s=1.0, query_days=10, **backfill)


def _finish(proc: subprocess.Popen[str], timeout: float) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    return make_archive(tmp_path / "films", 200, young=10, outside=10, knees=10)


def test_backfill_screens_the_archive_resumes_after_kill_9_and_does_nothing_twice(
        tmp_path: Path, archive: Archive) -> None:
    orthanc, node = _stack(tmp_path, archive, workers=2, associations=2, images_per_minute=0.0, max_queued_jobs=20)
    try:
        node.start()
        first = run_backfill(node, "run", *RANGE, "--quiet")
        def a_third_done() -> bool:
            if first.poll() is not None:
                pytest.fail(f"the backfill exited with {first.returncode}: {first.stdout.read() if first.stdout else ''}")
            return node.query("select count(*) from backfill_studies where state = 'done'")[0][0] >= 70

        wait_for("a third of the studies retrieved", a_third_done, 600, 0.5)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        in_hand = {uid for (uid,) in node.query("select study_uid from backfill_studies where state = 'running'")}
        assert len(in_hand) <= 2  # associations = 2
        out = _finish(run_backfill(node, "run", *RANGE, "--quiet"), 900)
        assert "resumed" in out
        wait_for("every retrieved film screened", lambda: node.query(
            "select count(*) from jobs where state in ('done', 'ineligible', 'failed')") == [(200,)], 600, 1.0)
        received = {uid for (uid,) in node.query("select sop_instance_uid from instances")}
        assert received == archive.chest_in_band  # no knee series, no young patient, no study outside the range
        assert node.query("select state, count(*) from jobs group by state") == [("done", 200)]
        assert node.query("select count(distinct instance_id) from jobs") == [(200,)]  # one job per film
        # Sent twice at most: what was in hand when the backfill was killed, deduplicated on arrival.
        again = node.query("select study_uid from events where kind = 'duplicate'")
        assert {uid for (uid,) in again} <= in_hand
        rows = node.query("select state, reason_code, count(*) from backfill_studies group by 1, 2")
        assert sorted(rows) == [("done", None, 200), ("skipped", "out-of-age-band", 10)]
        assert node.query("select count(*) from backfill_studies where state = 'done' and moved_at is null") == [(0,)]
        # a study in hand at the kill was claimed again (one more attempt); the others once
        [(again_claimed,)] = node.query("select count(*) from backfill_studies where attempts > 1")
        assert again_claimed <= len(in_hand) + 2  # + a transient C-MOVE retry, should one happen
        status = _finish(run_backfill(node, "status"), 60)
        assert "done 200" in status and "out-of-age-band 10" in status and "screened 200" in status, status
        assert node.query("select count(*) from events where kind = 'backfill_finished'") == [(1,)]
        # The same model again over part of the range (a new run): nothing is retrieved twice.
        before = node.query("select count(*) from events where kind in ('received', 'duplicate')")
        out = _finish(run_backfill(node, "run", "--from", "2024-01-15", "--to", "2024-01-31", "--quiet"), 300)
        assert node.query("select count(*) from events where kind in ('received', 'duplicate')") == before
        [(skipped,)] = node.query("select count(*) from backfill_studies where run_id = 2 and reason_code = 'already-screened'")
        assert skipped > 50 and "already-screened" in out, out
        # A runner killed after its C-MOVE completed but before it recorded the outcome (the race
        # the kill above may or may not hit): its study is claimed again, found screened, and is
        # the run's own work (done). One that no attempt of the run ever moved but that is found
        # screened (routed to the node by other means) is already-screened, not done.
        [(moved_id, moved_uid), (other_id, _)] = node.query(
            "select id, study_uid from backfill_studies where run_id = 1 and state = 'done' order by id limit 2")
        with sqlite3.connect(node.data / "screener.db", timeout=30) as db:
            db.execute("update backfill_studies set state = 'pending', attempts = 1 where id = ?", (moved_id,))
            db.execute("update backfill_studies set state = 'pending', attempts = 1, moved_at = null where id = ?",
                       (other_id,))
        _finish(run_backfill(node, "run", *RANGE, "--quiet"), 300)
        assert node.query("select count(*) from events where kind in ('received', 'duplicate')") == before
        assert sorted(node.query("select state, reason_code, count(*) from backfill_studies where run_id = 1 "
                                 "group by 1, 2")) == [("done", None, 199), ("skipped", "already-screened", 1),
                                                       ("skipped", "out-of-age-band", 10)]
        assert node.query(f"select attempts, images, state from backfill_studies where id in ({moved_id}, {other_id}) "
                          "order by id") == [(2, 1, "done"), (2, 0, "skipped")]
        [(message,)] = node.query("select message from events where kind = 'backfill_study' "
                                  f"and study_uid = '{moved_uid}' order by id desc limit 1")
        assert "earlier attempt of this run" in message, message
    finally:
        node.stop()
        orthanc.stop()


def test_backfill_keeps_its_throttle_and_its_quiet_hours(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "films", 12)
    orthanc, node = _stack(tmp_path, archive, associations=2, images_per_minute=60.0, max_queued_jobs=100)
    config = node.config.read_text()
    try:
        node.start()
        # A move destination the PACS does not know (Orthanc answers 0xC000): the run stops after
        # a few retrievals with the reason, and no study is failed for it (the same command resumes once the PACS is fixed).
        node.config.write_text(config.replace("[backfill]\n", "[backfill]\nmove_destination = \"NOSUCHAE\"\n"))
        proc = run_backfill(node, "run", *RANGE, "--quiet")
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "retrievals in a row failed" in out and "'NOSUCHAE'" in out, out
        assert node.query("select count(*) from backfill_studies where state in ('failed', 'running')") == [(0,)]
        # Quiet hours around now: nothing is retrieved; stopped with SIGTERM, it says how to resume.
        now = datetime.now().astimezone()
        quiet = f"{(now.hour - 1) % 24:02d}:00-{(now.hour + 2) % 24:02d}:00"
        node.config.write_text(config.replace("[backfill]\n", f"[backfill]\nquiet_hours = \"{quiet}\"\n"))
        log = tmp_path / "quiet.log"
        proc = run_backfill(node, "run", *RANGE, "--quiet", log=log)
        wait_for("the run to start", lambda: "backfill run 1 (resumed)" in log.read_text(), 120, 0.2)
        time.sleep(3)  # waiting out the quiet hours
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        out = log.read_text()
        assert proc.returncode == 0, out
        assert node.query("select count(*) from instances") == [(0,)] and "run the same command again" in out, out
        # Outside quiet hours: 60 images a minute, at most 2 retrievals at once.
        node.config.write_text(config)
        proc = run_backfill(node, "run", *RANGE, "--quiet")
        most = 0
        while proc.poll() is None:
            most = max(most, node.query("select count(*) from backfill_studies where state = 'running'")[0][0])
            time.sleep(0.1)
        _finish(proc, 10)
        assert 1 <= most <= 2
        [(first, last)] = node.query("select min(time), max(time) from events where kind = 'received'")
        span = (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()
        assert node.query("select count(*) from instances") == [(12,)]
        assert span >= 11 * 1.0 * 0.9, span  # the 12th image's slot starts 11 s after the first
    finally:
        node.stop()
        orthanc.stop()


@pytest.mark.postgres
def test_two_runners_share_one_backfill_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    archive = make_archive(tmp_path / "films", 24)
    # 120 images a minute each: neither runner can take all 24 studies before the other starts
    orthanc, node = _stack(tmp_path, archive, associations=2, images_per_minute=120.0, max_queued_jobs=100)
    node.config.write_text(node.config.read_text().replace('data_dir = "data"\n',
                                                            f'data_dir = "data"\ndatabase_url = "{postgres_url}"\n'))
    try:
        node.start()
        # Two runners started together, as two nodes would be (each moves to the node's AE here).
        procs = [run_backfill(node, "run", *RANGE, "--quiet") for _ in range(2)]
        outs = [_finish(proc, 600) for proc in procs]
        from sqlalchemy import create_engine, text

        engine = create_engine(postgres_url)
        with engine.connect() as c:
            assert c.execute(text("select count(*) from backfill_runs")).scalar() == 1
            rows = c.execute(text("select state, attempts from backfill_studies")).all()
            assert sorted(rows) == [("done", 1)] * 24, rows  # each study claimed once
            assert c.execute(text("select count(*) from events where kind = 'duplicate'")).scalar() == 0
            assert c.execute(text("select count(*) from instances")).scalar() == 24
            owners = {m.split(" by ")[1].rsplit(":", 1)[0] for (m,) in c.execute(text(
                "select message from events where kind = 'backfill_study' and outcome = 'ok'"))}
        engine.dispose()
        assert len(owners) == 2, (owners, outs)  # both runners retrieved studies
    finally:
        node.stop()
        orthanc.stop()
