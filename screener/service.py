"""`screener serve`: the SCP, the worker threads and the scheduler, wired from one Settings.

Start order follows the data flow backwards (database, workers, scheduler, health endpoint,
then the SCP), so nothing is acknowledged before something can process it. Stop order is the reverse of that:
stop accepting associations, let the workers finish the batch in hand, then the scheduler.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from pathlib import Path
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import Session, sessionmaker

from screener.config import Settings
from screener.health import HealthChecks, start_health_server
from screener.metrics import NodeMetrics
from screener.node import dispatch, receive, receivers
from screener.node.spool import sweep_incoming
from screener.retention import purge_outbox, purge_spool, sweep_orphans
from screener.store.db import create_schema, make_engine, session_factory
from screener.store.models import Delivery
from screener.store.queue import job_result
from screener.workers import StageTail, WorkerPool

__all__ = ["Service", "delivery_object_path", "housekeeping", "patient_salt"]

log = structlog.get_logger(__name__)


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


def delivery_object_path(delivery: Delivery) -> Path:
    """The file of a delivery's object, from the job's result document."""
    result = job_result(delivery.job)
    output = result.output(delivery.kind) if result is not None else None
    if output is None:
        raise FileNotFoundError(f"job {delivery.job_id} has no {delivery.kind} output")
    if not Path(output.path).is_file():
        raise FileNotFoundError(f"job {delivery.job_id}: the {delivery.kind} file {output.path} is gone")
    return Path(output.path)


def housekeeping(sessions: sessionmaker[Session], spool: Path, outbox: Path, retention_days: float) -> None:
    """The hourly retention run: each sweep on its own, so one failing does not stop the rest."""
    for sweep in (lambda: purge_spool(sessions, retention_days), lambda: purge_outbox(sessions, outbox, retention_days),
                  lambda: sweep_orphans(sessions, spool)):
        try:
            sweep()
        except Exception:
            log.exception("retention_failed")


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop_event = threading.Event()
        self._workers: WorkerPool | None = None
        self._receivers: receivers.ReceiverPool | None = None
        self.engine: Any = None
        self._health: Any = None
        self._scheduler: BackgroundScheduler | None = None

    def start(self) -> None:
        from screener.pipeline.bundle import ModelBundle
        from screener.process import OUTPUT_SUFFIXES

        s = self.settings
        data = s.data_dir
        data.mkdir(parents=True, exist_ok=True)
        (data / "spool").mkdir(exist_ok=True)
        self.engine = make_engine(s.database_url)
        create_schema(self.engine)
        self.sessions = session_factory(self.engine)
        bundle = ModelBundle.load(s.model.bundle or None)
        metrics = NodeMetrics(bundle.model_id, bundle.demo)
        metrics.watch_database(self.sessions)
        destinations = [d.destination() for d in s.destinations]
        # Build what some destination takes; with none configured, everything (kept in the outbox).
        kinds = tuple({k for d in destinations for k in d.kinds()}) if destinations else tuple(OUTPUT_SUFFIXES)
        workers = self._workers = WorkerPool(s, s.worker.processes(), kinds, logging.getLogger().level)
        workers.start()
        self._scheduler = BackgroundScheduler(timezone="UTC")
        dispatcher = dispatch.Dispatcher(
            self.sessions, {d.name: d for d in destinations},
            s.dispatch.dispatch_settings(), delivery_object_path, metrics=metrics)
        dispatch.schedule(self._scheduler, dispatcher, s.dispatch.interval_s)
        # the worker processes' stage times, from the events they write, into /metrics
        self._scheduler.add_job(StageTail(self.sessions, metrics.observe_stages).run, "interval", seconds=5,
                                id="stages", max_instances=1, coalesce=True)
        # a worker process that dies is started again, like a receive process
        self._scheduler.add_job(workers.check, "interval", seconds=5, id="workers", max_instances=1, coalesce=True)
        self._scheduler.add_job(housekeeping, "interval", hours=1,
                                args=[self.sessions, data / "spool", data / "outbox", s.storage.retention_days],
                                id="retention", max_instances=1, coalesce=True)
        self._scheduler.start()
        node = s.node
        self.receive_settings = node.receive_settings(spool_root=data / "spool", model_id=bundle.model_id,
                                                      patient_salt=patient_salt(s))
        # Partial files of aborted transfers: once at start (a previous run's), then every 5 minutes.
        stale_s = receive.stale_incoming_s(self.receive_settings)
        sweep_incoming(data / "spool", stale_s)
        self._scheduler.add_job(sweep_incoming, "interval", minutes=5, args=[data / "spool", stale_s],
                                id="incoming", max_instances=1, coalesce=True)
        pool = self._receivers = receivers.ReceiverPool(self.receive_settings, s.database_url, node.receive_processes,
                                                        logging.getLogger().level)
        metrics.watch_associations(pool.accepted)
        if node.health_port:
            # Before the DICOM port: a monitor probing once the port answers finds /health up.
            self._health = start_health_server(node.health_bind_address, node.health_port, HealthChecks(
                engine=self.engine, receive_processes=pool.running, worker_processes=workers.running, slots=pool.slots,
                spool_root=data / "spool", min_free_bytes=self.receive_settings.min_free_bytes,
                metrics=metrics.registry))
        port = pool.start()
        # A receive process that dies is started again; the others and this one keep serving.
        self._scheduler.add_job(pool.check, "interval", seconds=5, id="receivers",
                                max_instances=1, coalesce=True)
        log.info("serving", ae_title=node.ae_title, address=node.bind_address, port=port,
                 health=f"http://{node.health_bind_address}:{node.health_port}/health" if node.health_port else None,
                 receive_processes=node.receive_processes,
                 model_id=bundle.model_id, demo=bundle.demo, worker_processes=workers.processes,
                 torch_threads=workers.threads,
                 destinations=[d.name for d in destinations], data_dir=str(data))
        hint = precision_hint(s.model.device, s.model.precision)
        if hint:
            log.info("hint", message=hint)

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
        if self._workers is not None:
            # A batch still running after this keeps its lease; it expires and is claimed again.
            self._workers.stop(timeout_s)
            self._workers = None
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


def precision_hint(device: str, precision: str) -> str | None:
    """What to tell an administrator whose CPU could run the BMD network in bf16 but is not
    asked to (auto stays fp32 on the CPU so that the processor never changes the numbers)."""
    from screener.pipeline.estimate import cpu_has_fast_bf16, resolve_device

    on_cpu = device in ("cpu", "auto") and resolve_device(device).type == "cpu"
    if not (on_cpu and precision == "auto" and cpu_has_fast_bf16()):
        return None
    return ('this CPU computes bf16 natively: [model] precision = "bf16" runs the BMD network several times '
            "faster (the paper's VGG16 3.8x on an AMX CPU), within 0.01 g/cm2 of fp32 (tests/test_inference.py)")
