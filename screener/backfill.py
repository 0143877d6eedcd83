"""Backfill: screen the chest radiographs a PACS already holds, not only new ones.

`screener backfill run --from DATE --to DATE` queries the PACS ([backfill] source) with C-FIND
for studies holding CR or DX images in the date range, week by week, keeps those whose patient
is in the age band, and retrieves their chest series by C-MOVE to this node's own SCP, where
they are received, queued and screened like any routed film, and their results delivered to
the destinations as usual. The node (`screener serve`) must be running to receive them.

Gentle to the PACS: at most ``associations`` C-MOVEs at once, at most ``images_per_minute``,
nothing in the ``quiet_hours``, and no retrieval while more than ``max_queued_jobs`` jobs wait
for a worker (the queue sets the pace, not the PACS). Resumable and shared: every study's
state is in the database (screener.store.backfill); running the same command again resumes,
and nodes sharing one PostgreSQL database split the studies between them. A series already
screened with the same model is not retrieved again.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from datetime import time as clock_time

import structlog
from sqlalchemy.orm import Session, sessionmaker

from screener.codes import ReasonCode
from screener.node.retrieve import (
    MoveRefused,
    Peer,
    QueryError,
    SeriesHit,
    StudyHit,
    find_series,
    find_studies,
    move_series,
)
from screener.safe_text import scrub
from screener.store.backfill import (
    NewStudy,
    RunProgress,
    claim_study,
    finish_run_if_done,
    finish_study,
    list_studies,
    open_run,
    progress,
    queued_jobs,
    release_study,
    renew_study,
    retry_study,
    screened_instances,
    set_queried_through,
)
from screener.store.models import BackfillState

__all__ = ["AgeBand", "Backfill", "Limits", "Plan", "QuietHours", "Throttle", "parse_quiet_hours"]

log = structlog.get_logger(__name__)


def _host() -> str:
    """This host as a claim names it: the host name and the pid namespace, since containers on
    one host may share its name but not their process ids (a pid is only "gone" in its own)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}/{namespace}"


@dataclass(frozen=True)
class QuietHours:
    """Local hours with no retrieval; ``start`` after ``end`` wraps midnight (e.g. 22:00-06:00)."""

    start: clock_time
    end: clock_time

    def contains(self, moment: clock_time) -> bool:
        if self.start <= self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end

    def seconds_left(self, now: datetime) -> float:
        """Seconds until the quiet hours end (0 outside them)."""
        if not self.contains(now.time()):
            return 0.0
        end = datetime.combine(now.date(), self.end, now.tzinfo)
        if end <= now:
            end += timedelta(days=1)
        return (end - now).total_seconds()


def parse_quiet_hours(text: str) -> QuietHours:
    """"HH:MM-HH:MM" in local time."""
    try:
        start, end = (clock_time.fromisoformat(part.strip()) for part in text.split("-"))
    except ValueError:
        raise ValueError("use \"HH:MM-HH:MM\" in local time, e.g. \"07:00-19:00\" (no retrieval during the day)") from None
    if start == end:
        raise ValueError("the start and end are the same; leave it empty for no quiet hours")
    return QuietHours(start, end)


@dataclass(frozen=True)
class AgeBand:
    min_age: float | None
    max_age: float | None
    include_unknown: bool  # the eligibility's missing_age policy

    def contains(self, age: float | None) -> bool:
        if age is None:
            return self.include_unknown
        return (self.min_age is None or age >= self.min_age) and (self.max_age is None or age <= self.max_age)


class Throttle:
    """At most ``per_minute`` images on average: each retrieval of n images takes its slot of
    n * 60 / per_minute seconds, the first at once. Shared by the associations."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._step = 60.0 / per_minute if per_minute > 0 else 0.0
        self._clock = clock
        self._next = clock()
        self._lock = threading.Lock()

    def delay(self, images: int) -> float:
        """Take a slot for ``images``; returns the seconds to wait before starting."""
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + images * self._step
            return start - now


@dataclass(frozen=True)
class Limits:
    """How hard the backfill may press on the PACS and the queue ([backfill] in the config)."""

    associations: int = 1
    images_per_minute: float = 60.0
    quiet_hours: QuietHours | None = None
    max_queued_jobs: int = 50
    query_days: int = 7
    lease_seconds: float = 600.0
    max_attempts: int = 3
    retry_after_s: float = 60.0


@dataclass(frozen=True)
class Plan:
    """What to retrieve: the source, the date range, the age band, the model that will screen."""

    peer: Peer
    destination_ae: str
    first: date
    last: date
    band: AgeBand
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    model_id: str

    @property
    def key(self) -> str:
        return (f"{self.peer.label}|{self.first}|{self.last}|{self.band.min_age}|{self.band.max_age}|"
                f"{','.join(self.modalities)}|{self.model_id}")


class Backfill:
    def __init__(self, plan: Plan, limits: Limits, sessions: sessionmaker[Session],
                 wall_clock: Callable[[], datetime] = lambda: datetime.now().astimezone()) -> None:
        self.plan = plan
        self.limits = limits
        self._sessions = sessions
        self._throttle = Throttle(limits.images_per_minute)
        self._wall_clock = wall_clock
        # "<host>:<pid>:<token>": a claim of a process that died on this host is taken back at once
        # (screener.store.backfill._holder_is_gone); the token keeps two runners in one process apart.
        self._owner = f"{_host()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.fatal: list[Exception] = []  # errors that stopped the run (the PACS refuses to send to us)
        self._lock = threading.Lock()
        self._failures_in_a_row = 0
        self.run_id, self.created = open_run(
            sessions, key=plan.key, source=plan.peer.label, first_date=plan.first, last_date=plan.last,
            min_age=plan.band.min_age, max_age=plan.band.max_age, model_id=plan.model_id)

    # ------------------------------------------------------------ query

    def query(self, stop: threading.Event) -> None:
        """List the range's studies, ``query_days`` at a time, from where an earlier run stopped."""
        through = self.progress().queried_through
        day = self.plan.first if through is None else through + timedelta(days=1)
        while day <= self.plan.last and not stop.is_set():
            end = min(day + timedelta(days=self.limits.query_days - 1), self.plan.last)
            hits = find_studies(self.plan.peer, day, end, self.plan.modalities)
            new = list_studies(self._sessions, self.run_id, [self._listed(hit) for hit in hits])
            set_queried_through(self._sessions, self.run_id, end)
            log.info("backfill_queried", run=self.run_id, first=str(day), last=str(end), found=len(hits), new=new)
            day = end + timedelta(days=1)

    def _listed(self, hit: StudyHit) -> NewStudy:
        if not self.plan.band.contains(hit.age_years):
            return NewStudy(hit.study_uid, hit.study_date, BackfillState.SKIPPED, ReasonCode.BACKFILL_OUT_OF_AGE_BAND)
        return NewStudy(hit.study_uid, hit.study_date)

    # ------------------------------------------------------------ retrieve

    def retrieve(self, stop: threading.Event) -> None:
        """Retrieve every pending study with ``associations`` threads; returns when none is left
        (or ``stop`` is set: the studies in hand are finished first)."""
        threads = [threading.Thread(target=self._retrieve_loop, args=(stop, f"{self._owner}:{n}"),
                                    name=f"backfill-{n}", daemon=True) for n in range(self.limits.associations)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        finish_run_if_done(self._sessions, self.run_id)

    def _retrieve_loop(self, stop: threading.Event, owner: str) -> None:
        while not stop.is_set():
            try:
                if not self._may_start(stop):
                    continue
                study = claim_study(self._sessions, self.run_id, owner, self.limits.lease_seconds,
                                    self.limits.max_attempts)
                if study is None:
                    if self.progress().left == 0:
                        return
                    stop.wait(2.0)  # held by other associations or nodes, or waiting for a retry
                    continue
                self._one_study(study.id, study.study_uid, owner, stop, moved_before=study.moved_at is not None)
            except MoveRefused as refused:  # the PACS will not send to us at all: stop the run
                self.fatal.append(refused)
                stop.set()
            except Exception:  # the database briefly unavailable: the thread carries on
                log.exception("backfill_error", owner=owner)
                stop.wait(5.0)

    def _may_start(self, stop: threading.Event) -> bool:
        """Wait out the quiet hours and a full queue; False when the caller should look again."""
        if self.limits.quiet_hours is not None:
            left = self.limits.quiet_hours.seconds_left(self._wall_clock())
            if left > 0:
                stop.wait(min(left, 60.0))
                return False
        with self._sessions() as session:
            queued = queued_jobs(session)
        if queued > self.limits.max_queued_jobs:
            stop.wait(2.0)
            return False
        return True

    def _chest(self, series: SeriesHit) -> bool:
        return series.modality in self.plan.modalities and (not series.body_part or series.body_part in self.plan.body_parts)

    def _one_study(self, study_id: int, study_uid: str, owner: str, stop: threading.Event, *,
                   moved_before: bool = False) -> None:
        peer = self.plan.peer
        retrieved = 0
        reason = ReasonCode.BACKFILL_QUERY_FAILED
        try:
            chest = [s for s in find_series(peer, study_uid) if self._chest(s)]
            if not chest:
                self._finish(study_id, owner, BackfillState.SKIPPED, reason=ReasonCode.BACKFILL_NO_CHEST_SERIES,
                             message="no CR/DX chest series")
                return
            reason = ReasonCode.BACKFILL_MOVE_FAILED
            already = screened = 0
            for series in chest:
                with self._sessions() as session:
                    have = screened_instances(session, series.series_uid, self.plan.model_id)
                if series.instances is not None and have >= series.instances:
                    already += 1
                    screened += have
                    continue
                wait = self._throttle.delay(series.instances or 1)
                if wait > 0:
                    # the lease must outlast the wait for its turn as well as the retrieval
                    if not renew_study(self._sessions, study_id, owner, self.limits.lease_seconds + wait):
                        log.warning("backfill_lease_lost", study_id=study_id, owner=owner)
                        return
                    if stop.wait(wait):
                        # stopped while waiting its turn: pending again, as if never claimed
                        release_study(self._sessions, study_id, owner)
                        return
                # the retrieval's own lease, and the record that this run started moving the study
                if not renew_study(self._sessions, study_id, owner, self.limits.lease_seconds, moving=True):
                    log.warning("backfill_lease_lost", study_id=study_id, owner=owner)
                    return
                result = move_series(peer, self.plan.destination_ae, study_uid, series.series_uid)
                retrieved += result.completed + result.warning
                if not result.ok:
                    raise QueryError(f"C-MOVE of a series ended with status 0x{result.status:04X} "
                                     f"({result.completed} completed, {result.failed} failed)")
            if already == len(chest) and moved_before:
                # An earlier attempt of this run started retrieving it and was stopped (a kill, a
                # lost lease) before it could say so: the run's own work, not something screened
                # by other means (a study it never moved is already-screened, below).
                self._finish(study_id, owner, BackfillState.DONE, images=screened,
                             message=f"retrieved by an earlier attempt of this run; {screened} image(s) screened")
            elif already == len(chest):
                self._finish(study_id, owner, BackfillState.SKIPPED, reason=ReasonCode.BACKFILL_ALREADY_SCREENED,
                             message=f"every chest series already screened with {self.plan.model_id}")
            else:
                self._finish(study_id, owner, BackfillState.DONE, images=retrieved,
                             message=f"{retrieved} image(s) retrieved by {owner}")
            with self._lock:
                self._failures_in_a_row = 0
        except MoveRefused:
            release_study(self._sessions, study_id, owner)
            raise
        except Exception as error:  # the PACS failed or the answer made no sense: retried later
            message = f"{type(error).__name__}: {scrub(error)}"
            with self._lock:
                self._failures_in_a_row += 1
                tripped = self._failures_in_a_row >= 2 * self.limits.associations
            if tripped:
                # Every retrieval fails (a PACS that does not know the move destination answers
                # 0xA801 or, like Orthanc, 0xC000; a PACS gone down): stop rather than fail the
                # whole archive study by study. This study is given back untouched.
                release_study(self._sessions, study_id, owner)
                raise MoveRefused(
                    f"{self._failures_in_a_row} retrievals in a row failed (last: {message}); check that the PACS "
                    f"knows the move destination {self.plan.destination_ae!r} (host and port of this node) and "
                    f"lets {peer.calling_ae!r} query and retrieve") from error
            state = retry_study(self._sessions, study_id, owner, self.limits.retry_after_s, message,
                                self.limits.max_attempts, reason=reason, peer_ae=peer.ae_title)
            log.warning("backfill_study_failed", study_id=study_id, error=message, state=state)

    def _finish(self, study_id: int, owner: str, state: BackfillState, *, reason: ReasonCode | None = None,
                images: int = 0, message: str) -> None:
        if not finish_study(self._sessions, study_id, owner, state, images=images, reason=reason, message=message,
                            model_id=self.plan.model_id, peer_ae=self.plan.peer.ae_title):
            # its lease ran out and another runner has it: theirs is the outcome on record
            log.warning("backfill_lease_lost", study_id=study_id, owner=owner, state=state.value)

    def progress(self) -> RunProgress:
        with self._sessions() as session:
            return progress(session, self.run_id)
