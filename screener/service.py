"""`screener serve`: the SCP, the worker threads and the scheduler, wired from one Settings.

Start order follows the data flow backwards (database, workers, scheduler, then the SCP), so
nothing is acknowledged before something can process it. Stop order is the reverse of that:
stop accepting associations, let the workers finish the batch in hand, then the scheduler.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from screener.config import Settings, build_decode_limits, build_eligibility_rules
from screener.health import start_health_server
from screener.node import dispatch, receive, receivers
from screener.node.spool import sweep_incoming
from screener.store.db import SQLITE_BEGIN, create_schema, make_engine, session_factory
from screener.store.models import Delivery, Event, Instance, JobState, utcnow

__all__ = ["Service", "configure_logging", "database_url", "patient_salt", "purge_spool"]

log = structlog.get_logger(__name__)

_FINISHED = (JobState.DONE, JobState.INELIGIBLE, JobState.FAILED)


def configure_logging(level: int = logging.INFO) -> None:
    """JSON lines when stdout is a pipe or file (a journal, a collector); readable on a terminal.

    Log lines carry UIDs and hashed patient IDs only: nothing here logs a dataset's names.
    """
    renderer: Any = structlog.dev.ConsoleRenderer() if sys.stdout.isatty() else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.format_exc_info,
                    renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    # pynetdicom and the receive module log through the standard library: same stream, same shape.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=renderer, foreign_pre_chain=[structlog.processors.add_log_level,
                                               structlog.processors.TimeStamper(fmt="iso", utc=True)]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pynetdicom", "apscheduler", "highdicom"):  # per-association, per-run and per-SR chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)


def database_url(settings: Settings) -> str:
    return settings.storage.database_url or f"sqlite:///{settings.data_dir / 'screener.db'}"


def patient_salt(settings: Settings) -> bytes:
    """The configured salt, else one generated on first start and kept under data_dir."""
    if settings.storage.patient_id_salt:
        return settings.storage.patient_id_salt.encode()
    path = settings.data_dir / "patient_id_salt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: two nodes starting at once must not end with different salts
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
                fh.flush()
                os.fsync(fh.fileno())
        except FileExistsError:
            pass
    return path.read_text().strip().encode()


def purge_spool(sessions: sessionmaker[Session], retention_days: float) -> int:
    """Delete spooled images whose jobs are all finished and that are older than the retention."""
    cutoff = utcnow() - timedelta(days=retention_days)
    with sessions() as session:
        old = session.scalars(select(Instance).where(Instance.received_at < cutoff)).all()
        candidates = [i for i in old if Path(i.spool_path).exists()
                      and all(j.state in _FINISHED for j in i.jobs)]
        session.commit()
    for instance in candidates:
        Path(instance.spool_path).unlink(missing_ok=True)
        with sessions() as session:
            session.connection(execution_options={SQLITE_BEGIN: "IMMEDIATE"})
            session.add(Event(time=utcnow(), kind="purged", outcome="ok", sop_instance_uid=instance.sop_instance_uid,
                              study_uid=instance.study_instance_uid, accession_number=instance.accession_number,
                              message=f"spooled image deleted after {retention_days:g} days"))
            session.commit()
        log.info("spool_purged", sop_instance_uid=instance.sop_instance_uid)
    return len(candidates)


def delivery_object_path(delivery: Delivery) -> Path:
    """The SR / GSPS file of a delivery: the worker's outcome lists the files it wrote."""
    from screener.worker import output_for

    path = output_for((delivery.job.result_json or {}).get("outputs", []), delivery.kind)
    if path is None:
        raise FileNotFoundError(f"job {delivery.job_id} has no {delivery.kind} output")
    return path


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self._receivers: receivers.ReceiverPool | None = None
        self.engine: Any = None
        self._health: Any = None
        self._scheduler: BackgroundScheduler | None = None

    def start(self) -> None:
        from screener.pipeline.bundle import ModelBundle
        from screener.process import OUTPUT_SUFFIXES, Processor
        from screener.worker import Worker

        s = self.settings
        data = s.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(database_url(s))
        create_schema(self.engine)
        self.sessions = session_factory(self.engine)
        bundle = ModelBundle.load(s.model.bundle or None)
        destinations = [d.destination() for d in s.destinations]
        # Build what some destination takes; with none configured, everything (kept in the outbox).
        kinds = tuple({str(k) for d in destinations for k in d.kinds()}) if destinations else tuple(OUTPUT_SUFFIXES)
        for n in range(s.worker.workers):
            processor = Processor(bundle, data / "outbox", device=s.model.device, batch_size=s.model.batch_size,
                                  decode_workers=s.worker.decode_workers, rules=build_eligibility_rules(s.eligibility),
                                  limits=build_decode_limits(s.decode), kinds=kinds)
            # Owner names are unique per process and thread: the lease is checked by name.
            worker = Worker(f"{os.uname().nodename}:{os.getpid()}:{n}", self.sessions, processor, destinations,
                            s.worker.lease_seconds, s.worker.poll_seconds)
            thread = threading.Thread(target=worker.run_forever, args=(self.stop_event,), name=f"worker-{n}")
            thread.start()
            self._threads.append(thread)
        self._scheduler = BackgroundScheduler(timezone="UTC")
        dispatcher = dispatch.Dispatcher(
            self.sessions, {d.name: d for d in destinations},
            dispatch.DispatchSettings(calling_ae=s.dispatch.calling_ae, max_attempts=s.dispatch.max_attempts,
                                      backoff_base_s=s.dispatch.backoff_base_s, backoff_cap_s=s.dispatch.backoff_cap_s),
            delivery_object_path)
        dispatch.schedule(self._scheduler, dispatcher, s.dispatch.interval_s)
        self._scheduler.add_job(purge_spool, "interval", hours=1, args=[self.sessions, s.storage.retention_days],
                                id="retention", max_instances=1, coalesce=True)
        # Partial files of aborted transfers: once at start (a previous run's), then every 5 minutes.
        sweep_incoming(data / "spool", receive.STALE_INCOMING_S)
        self._scheduler.add_job(sweep_incoming, "interval", minutes=5, args=[data / "spool", receive.STALE_INCOMING_S],
                                id="incoming", max_instances=1, coalesce=True)
        self._scheduler.start()
        node = s.node
        self.receive_settings = receive.ReceiveSettings(
            spool_root=data / "spool", model_id=bundle.model_id, patient_salt=patient_salt(s), port=node.port,
            ae_title=node.ae_title, bind_address=node.bind_address, allowed_calling_aes=node.allowed_calling_aes,
            allowed_peers=node.allowed_peers, max_dataset_bytes=node.max_dataset_bytes,
            min_free_bytes=node.min_free_mb * 1024 * 1024)
        self._receivers = receivers.ReceiverPool(self.receive_settings, database_url(s), node.receive_processes,
                                                 logging.getLogger().level)
        port = self._receivers.start()
        # A receive process that dies is started again; the others and this one keep serving.
        self._scheduler.add_job(self._receivers.check, "interval", seconds=5, id="receivers",
                                max_instances=1, coalesce=True)
        if node.health_port:
            self._health = start_health_server(node.health_bind_address, node.health_port, self.sessions,
                                               self._receivers.running)
        log.info("serving", ae_title=node.ae_title, address=node.bind_address, port=port,
                 health=f"http://{node.health_bind_address}:{node.health_port}/health" if node.health_port else None,
                 receive_processes=node.receive_processes,
                 model_id=bundle.model_id, demo=bundle.demo, workers=s.worker.workers,
                 destinations=[d.name for d in destinations], data_dir=str(data))

    def stop(self, timeout_s: float = 60.0) -> None:
        log.info("stopping")
        if self._health is not None:
            self._health.shutdown()
            self._health.server_close()
            self._health = None
        if self._receivers is not None:
            self._receivers.stop()
            self._receivers = None
        self.stop_event.set()
        for thread in self._threads:
            # A batch still running after this keeps its lease; it expires and is claimed again.
            thread.join(timeout_s)
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
        if self.engine is not None:
            self.engine.dispose()
        log.info("stopped")

    def serve_forever(self) -> int:
        """Run until SIGTERM or SIGINT; returns the exit status."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())
        try:
            self.start()
        except BaseException:
            self.stop()  # workers and the scheduler may already run; leave nothing behind
            raise
        while not self.stop_event.wait(1.0):
            pass
        self.stop()
        return 0
