"""Worker processes: the pipeline in ``[worker] processes`` processes, one model copy each.

Under one GIL the stages of the pipeline that are Python (decoding's LUTs, the ROI crops, the
report objects, the database) run one at a time whatever the core count, so a worker is a
process, not a thread (bench/throughput.py measures 1 against N). Each process claims batches
from the database queue under a lease exactly as the threads did (screener.worker.Worker): the
queue already makes claims exclusive across processes and nodes, so the processes share
nothing but the database, the spool and the outbox, and a process killed mid-batch only leaves
leases that expire. Each gets ``cores // processes`` torch threads, so N processes do not
oversubscribe the CPU.

A process holds one end of a pipe from the service and stops when it closes, which happens on
kill -9 of the service too; it finishes the batch in hand first. One that dies is started
again by :meth:`WorkerPool.check` after a growing pause (screener.supervise). The processes
report nothing back: what /metrics shows of their stage times comes from the audit events
they write (:class:`StageTail`), which also counts the jobs of other nodes' workers.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from screener.config import Settings, build_decode_limits, build_eligibility_rules, build_inference
from screener.logs import configure_logging
from screener.store.models import Event
from screener.supervise import CONTEXT, RestartPolicy, default_processes, spawn, stop_children

__all__ = ["StageTail", "WorkerPool"]

LOGGER = logging.getLogger(__name__)

# A process is ready once its model is loaded; torch's import alone takes seconds.
START_TIMEOUT_S = 180.0
# What a job's end leaves in the audit trail (screener.store.queue): their result documents
# carry the stage times.
FINISHED_KINDS = ("done", "ineligible", "failed")


def torch_threads(processes: int) -> int:
    """Intra-op threads per worker process: the cores shared out, at least one each."""
    return max(1, default_processes() // processes)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to start (pickled to it)."""

    settings: Settings
    index: int
    threads: int
    log_level: int
    kinds: tuple[str, ...]  # the report objects to build: those some destination takes


def _child_main(spec: WorkerSpec, lifeline: Connection) -> None:
    """One worker process: claim and run batches until the lifeline closes or SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service decides when we stop
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    configure_logging(spec.log_level)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())

    def watch_parent() -> None:
        try:
            lifeline.recv()  # the service never sends: this returns only by raising EOFError
        except (EOFError, OSError):
            pass
        stopping.set()

    threading.Thread(target=watch_parent, name="lifeline", daemon=True).start()

    import torch

    from screener.pipeline.bundle import ModelBundle
    from screener.process import Processor
    from screener.store.db import make_engine, session_factory
    from screener.worker import Worker

    torch.set_num_threads(spec.threads)
    s = spec.settings
    engine = make_engine(s.database_url)
    try:
        bundle = ModelBundle.load(s.model.bundle or None)
        processor = Processor(bundle, s.data_dir / "outbox", device=s.model.device, batch_size=s.model.batch_size,
                              decode_workers=s.worker.decode_workers, rules=build_eligibility_rules(s.eligibility),
                              limits=build_decode_limits(s.decode), kinds=spec.kinds, write_json=False,
                              inference=build_inference(s.model))
        # Owner names are unique per process: the lease is checked by name.
        worker = Worker(f"{os.uname().nodename}:{os.getpid()}:{spec.index}", session_factory(engine), processor,
                        [d.destination() for d in s.destinations], s.worker.lease_seconds, s.worker.poll_seconds)
        lifeline.send(os.getpid())  # ready: the model is loaded
        worker.run_forever(stopping)  # finishes the batch in hand once stopping is set
    except OSError:
        pass  # the service is gone already
    finally:
        engine.dispose()


@dataclass(frozen=True)
class _Child:
    process: SpawnProcess
    lifeline: Connection  # our end: closing it stops the child
    started: float  # time.monotonic() at start


class WorkerPool:
    """``processes`` worker processes, started, watched and stopped together."""

    def __init__(self, settings: Settings, processes: int, kinds: tuple[str, ...],
                 log_level: int = logging.INFO) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"workers: must be an integer >= 1, got {processes!r}")
        self.settings = settings
        self.processes = processes
        self.kinds = kinds
        self.log_level = log_level
        self.threads = torch_threads(processes)
        self._children: list[_Child] = []
        self._restarts = RestartPolicy(processes, "worker process")
        self._lock = threading.Lock()  # check() runs in the scheduler's thread, stop() in ours
        self._stopping = False

    def start(self) -> None:
        """Start every process and wait until each has loaded its model."""
        try:
            self._children = [self._spawn(n) for n in range(self.processes)]
            for child in self._children:
                self._wait_ready(child)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, n: int) -> _Child:
        ours, theirs = CONTEXT.Pipe(duplex=True)
        spec = WorkerSpec(self.settings, n, self.threads, self.log_level, self.kinds)
        process = spawn(_child_main, (spec, theirs), f"worker-{n}")
        theirs.close()  # only the child may hold it, or the child would never see our end close
        return _Child(process, ours, time.monotonic())

    @staticmethod
    def _wait_ready(child: _Child) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not child.lifeline.poll(0.2):
            if not child.process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"worker process {child.process.name} did not start "
                                   f"(exit code {child.process.exitcode}); see its log lines above")
        try:
            child.lifeline.recv()
        except EOFError:
            raise RuntimeError(f"worker process {child.process.name} exited while starting "
                               f"(exit code {child.process.exitcode}); see its log lines above") from None

    def pids(self) -> list[int]:
        return [child.process.pid for child in self._children if child.process.pid is not None]

    def running(self) -> tuple[int, int]:
        """(configured, running) worker processes."""
        return self.processes, sum(child.process.is_alive() for child in self._children)

    def check(self) -> int:
        """Start again any process that died (after its pause); returns how many were started.
        A replacement loads its model in the background: the pool does not wait for it."""
        restarted = 0
        with self._lock:
            if self._stopping:
                return 0
            for i, child in enumerate(self._children):
                if child.process.is_alive() or not self._restarts.due(i, child.process, child.started):
                    continue
                child.lifeline.close()
                self._children[i] = self._spawn(i)
                restarted += 1
        return restarted

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop every process: each finishes the batch in hand (up to ``timeout_s``; a batch cut
        short keeps its lease, which expires, and its jobs are claimed again)."""
        with self._lock:
            self._stopping = True
            children, self._children = self._children, []
        stop_children(children, timeout_s, "worker process")


class StageTail:
    """Feeds the stage times of jobs as they finish (their audit events) to ``observe``.

    Started at the newest event, so a restart does not count history twice; run every few
    seconds from the scheduler."""

    def __init__(self, sessions: sessionmaker[Session], observe: Callable[[Mapping[str, float], str | None], None],
                 batch: int = 500) -> None:
        self._sessions = sessions
        self._observe = observe
        self._batch = batch
        with sessions() as session:
            self._last = session.scalar(select(Event.id).order_by(Event.id.desc()).limit(1)) or 0

    def run(self) -> int:
        """Observe what finished since the last run; returns how many jobs."""
        with self._sessions() as session:
            # up to the newest event now, finished job or not, so the next run starts after it
            newest = session.scalar(select(Event.id).order_by(Event.id.desc()).limit(1)) or self._last
            rows = session.execute(
                select(Event.id, Event.model_id, Event.result_json)
                .where(Event.id > self._last, Event.id <= newest, Event.kind.in_(FINISHED_KINDS),
                       Event.job_id.is_not(None))
                .order_by(Event.id).limit(self._batch)).all()
        for _, model_id, document in rows:
            seconds = (document or {}).get("seconds") if isinstance(document, dict) else None
            if isinstance(seconds, dict):
                self._observe({k: float(v) for k, v in seconds.items() if isinstance(v, int | float)}, model_id)
        self._last = rows[-1][0] if len(rows) == self._batch else max(self._last, newest)
        return len(rows)
