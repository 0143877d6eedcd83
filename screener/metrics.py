"""Prometheus metrics: ``GET /metrics`` on the health server (``[node] health_port``).

Two sources, one registry per node:

- measured here, in the service process: per-stage latency histograms of every finished job
  (decode, landmarks, model, report, total; from the job result's ``seconds``) and the time
  from an image's arrival to its SR being acknowledged by a destination;
- counted by the receive processes (shared memory, read at scrape time): associations accepted;
- counted in the database at scrape time (:class:`DatabaseCollector`): what the receive
  processes and workers recorded in the audit trail (associations and connections refused by
  reason, images and bytes received, jobs by outcome and reason code), queue depth, deliveries
  by destination and state, the age of the oldest pending delivery. Several processes (and
  several nodes on PostgreSQL) write there, so the database is the one place that has all of
  it; counting there also survives restarts, as Prometheus counters should.

Every series carries the model id where it has one; ``screener_model_info`` names the bundle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from screener.store.models import Delivery, DeliveryState, Event, Instance, Job, JobState, as_utc

__all__ = ["DatabaseCollector", "NodeMetrics", "STAGES"]

STAGES = ("decode", "landmarks", "model", "report", "total")
_STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SR_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
_REFUSALS = ("association_rejected", "connection_refused", "connection_timeout", "association_aborted", "rejected")
_OUTCOMES = ("done", "ineligible", "failed")


class NodeMetrics:
    """The node's registry and the histograms the service process observes."""

    def __init__(self, model_id: str = "", demo: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_id = model_id
        self.demo = demo
        self.stage_seconds = Histogram("screener_stage_seconds", "Seconds per pipeline stage of each finished job",
                                       ["stage", "model_id"], buckets=_STAGE_BUCKETS, registry=self.registry)
        self.sr_acknowledged_seconds = Histogram(
            "screener_received_to_sr_acknowledged_seconds",
            "Seconds from an image's arrival to its SR being acknowledged by a destination",
            ["destination"], buckets=_SR_BUCKETS, registry=self.registry)

    def observe_stages(self, seconds: Mapping[str, float], model_id: str | None = None) -> None:
        for stage in STAGES:
            if stage in seconds:
                self.stage_seconds.labels(stage, model_id or self.model_id).observe(seconds[stage])

    def observe_sr_acknowledged(self, destination: str, received_at: datetime, now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        self.sr_acknowledged_seconds.labels(destination).observe(max(0.0, (now - as_utc(received_at)).total_seconds()))

    def watch_database(self, sessions: sessionmaker[Session]) -> None:
        self.registry.register(DatabaseCollector(sessions, self.model_id, self.demo))

    def watch_associations(self, accepted: Callable[[], int]) -> None:
        """``accepted()``: associations accepted so far (the receive processes count them)."""
        self.registry.register(_AcceptedCollector(accepted))


class _AcceptedCollector(Collector):
    def __init__(self, accepted: Callable[[], int]) -> None:
        self.accepted = accepted

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("screener_associations_accepted", "Associations accepted by the receive processes")
        family.add_metric([], float(self.accepted()))
        yield family


class DatabaseCollector(Collector):
    """Counts read from the database at each scrape (see the module docstring)."""

    def __init__(self, sessions: sessionmaker[Session], model_id: str, demo: bool) -> None:
        self.sessions = sessions
        self.model_id = model_id
        self.demo = demo

    def describe(self) -> list[Metric]:
        return []  # collected live; nothing to describe before the first scrape

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("screener_model_info", "The model bundle this node runs", labels=["model_id", "demo"])
        info.add_metric([self.model_id, str(self.demo).lower()], 1.0)
        yield info
        up = GaugeMetricFamily("screener_database_up", "1 when the database answered this scrape")
        try:
            with self.sessions() as session:
                families = list(self._from(session))
                session.rollback()
        except SQLAlchemyError:
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from families

    def _from(self, session: Session) -> Iterator[Metric]:
        refused = CounterMetricFamily("screener_refusals", "Refused connections, associations and C-STOREs, "
                                      "by kind and reason code (rate-limited rows count once)", labels=["kind", "reason_code"])
        for kind, code, n in session.execute(select(Event.kind, Event.reason_code, func.count())
                                             .where(Event.kind.in_(_REFUSALS)).group_by(Event.kind, Event.reason_code)):
            refused.add_metric([kind, code or ""], n)
        yield refused
        received = CounterMetricFamily("screener_images_received", "Images received and queued", labels=["model_id"])
        for model_id, n in session.execute(select(Event.model_id, func.count()).where(Event.kind == "received")
                                           .group_by(Event.model_id)):
            received.add_metric([model_id or ""], n)
        yield received
        size = CounterMetricFamily("screener_received_bytes", "Bytes of the images on record")
        size.add_metric([], float(session.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0))) or 0))
        yield size
        jobs = CounterMetricFamily("screener_jobs", "Finished jobs by outcome and reason code",
                                   labels=["outcome", "reason_code", "model_id"])
        for kind, code, model_id, n in session.execute(
                select(Event.kind, Event.reason_code, Event.model_id, func.count())
                .where(Event.kind.in_(_OUTCOMES)).group_by(Event.kind, Event.reason_code, Event.model_id)):
            jobs.add_metric([kind, code or ("eligible" if kind == "done" else ""), model_id or ""], n)
        yield jobs
        depth = GaugeMetricFamily("screener_jobs_in_state", "Jobs by state now", labels=["state"])
        counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        for state in JobState:
            depth.add_metric([state.value], counts.get(state.value, 0))
        yield depth
        deliveries = GaugeMetricFamily("screener_deliveries", "Deliveries by destination, kind and state",
                                       labels=["destination", "kind", "state"])
        for destination, kind, state, n in session.execute(
                select(Delivery.destination, Delivery.kind, Delivery.state, func.count())
                .group_by(Delivery.destination, Delivery.kind, Delivery.state)):
            deliveries.add_metric([destination, kind, state], n)
        yield deliveries
        backlog = GaugeMetricFamily("screener_backlog_oldest_seconds",
                                    "Age of the oldest pending delivery per destination (since its job finished)",
                                    labels=["destination"])
        now = datetime.now(UTC)
        for destination, oldest in session.execute(
                select(Delivery.destination, func.min(Job.updated_at)).join(Job, Job.id == Delivery.job_id)
                .where(Delivery.state == DeliveryState.PENDING).group_by(Delivery.destination)):
            backlog.add_metric([destination], max(0.0, (now - as_utc(oldest)).total_seconds()))
        yield backlog
