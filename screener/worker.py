"""Worker: claim queued jobs, run the pipeline on their spooled files, record each outcome.

One worker is one thread with its own :class:`~screener.process.Processor` (its own model copy).
A batch is claimed under a lease, renewed while it runs; each job then ends in one transaction
with its audit event and, when reported, one outbox row per destination and object kind. A
worker killed mid-batch leaves its leases to expire, and the jobs are claimed again
(screener.store.queue.claim_jobs).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import structlog
from sqlalchemy.orm import Session, sessionmaker

from screener.codes import ReasonCode
from screener.metrics import NodeMetrics
from screener.node.dispatch import Destination
from screener.process import Outcome, Processor
from screener.result import JobResult, JobStatus
from screener.safe_text import scrub
from screener.store.models import Job, JobState
from screener.store.queue import LeaseLost, claim_jobs, complete_job, fail_job, renew_leases

__all__ = ["Worker"]

log = structlog.get_logger(__name__)


class Worker:
    def __init__(self, owner: str, session_factory: sessionmaker[Session], processor: Processor,
                 destinations: Sequence[Destination], lease_seconds: float, poll_seconds: float = 1.0,
                 metrics: NodeMetrics | None = None) -> None:
        self.owner = owner
        self._metrics = metrics
        self._sessions = session_factory
        self._processor = processor
        self._destinations = [(d.name, d.kinds()) for d in destinations]
        self._lease_seconds = lease_seconds
        self._poll_seconds = poll_seconds

    def run_once(self) -> int:
        """Claim one batch and finish it; returns the number of jobs claimed."""
        jobs = claim_jobs(self._sessions, self.owner, self._processor.batch_size, self._lease_seconds)
        if not jobs:
            return 0
        try:
            with self._renewing([job.id for job in jobs]):
                outcomes = list(self._processor.run([Path(job.instance.spool_path) for job in jobs]))
        except Exception as error:  # the Processor handles per-file errors; this is a broken batch
            log.exception("batch_failed", owner=self.owner, jobs=[j.id for j in jobs])
            message = f"{type(error).__name__}: {scrub(error)}"  # `error` is unbound after the except block
            for job in jobs:
                self._finish(job, lambda s, j=job: fail_job(s, j.id, self.owner, ReasonCode.BATCH_FAILED, message, True))
            return len(jobs)
        for job, outcome in zip(jobs, outcomes, strict=True):
            self._record(job, outcome)
        return len(jobs)

    @contextmanager
    def _renewing(self, job_ids: list[int]) -> Iterator[None]:
        """Renew the batch's leases every third of a lease while the body runs: a batch that
        takes longer than one lease (a slow CPU, the paper's VGG16) is still this worker's."""
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(self._lease_seconds / 3):
                try:
                    renew_leases(self._sessions, self.owner, job_ids, self._lease_seconds)
                except Exception:  # database briefly unavailable: the next beat tries again
                    log.warning("lease_renewal_failed", owner=self.owner, jobs=job_ids)

        beat = threading.Thread(target=heartbeat, name=f"lease-{self.owner}", daemon=True)
        beat.start()
        try:
            yield
        finally:
            done.set()
            beat.join(timeout=10.0)  # a renewal stuck on the database must not hold the batch's results

    def run_forever(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set; the batch in hand is finished first."""
        while not stop.is_set():
            try:
                claimed = self.run_once()
            except Exception:  # database briefly unavailable: log, wait, try again
                log.exception("worker_error", owner=self.owner)
                claimed = 0
            if not claimed:
                stop.wait(self._poll_seconds)

    def _record(self, job: Job, outcome: Outcome) -> None:
        result: JobResult = outcome.result()
        fields = dict(job_id=job.id, sop_instance_uid=job.instance.sop_instance_uid, status=result.status.value,
                      code=result.code.value, seconds=round(result.seconds.get("total", 0.0), 3))
        if result.status is JobStatus.REPORTED:
            # only what was written: a result image or PDF that could not be made is not queued
            destinations = [(name, tuple(k for k in kinds if k in result.outputs)) for name, kinds in self._destinations]
            self._finish(job, lambda s: complete_job(s, job.id, self.owner, JobState.DONE, result, destinations))
        elif result.status is JobStatus.INELIGIBLE:
            self._finish(job, lambda s: complete_job(s, job.id, self.owner, JobState.INELIGIBLE, result, []))
        else:
            self._finish(job, lambda s: fail_job(s, job.id, self.owner, result.code, result.reason, result.retryable,
                                                 result=result))
        if self._metrics is not None:
            self._metrics.observe_stages(result.seconds, job.model_id)
        log.info("job_finished", **fields)

    def _finish(self, job: Job, write) -> None:  # type: ignore[no-untyped-def]
        try:
            with self._sessions() as session:
                write(session)
        except LeaseLost as lost:
            # Took longer than the lease and someone else has the job now: theirs is the result.
            log.warning("lease_lost", job_id=job.id, error=str(lost))
