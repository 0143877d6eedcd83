"""The node's state in one document: what ``screener status`` prints and ``/health`` serves."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from screener.store.models import Delivery, Event, Job, JobState, as_utc

__all__ = ["status_report"]


def status_report(session: Session, *, errors: int = 5) -> dict[str, Any]:
    """Queue depth by job state, delivery counts by destination and state, the last errors.

    What ``screener status`` prints and the health endpoint serves.
    """
    jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    deliveries = session.execute(select(Delivery.destination, Delivery.state, func.count())
                                 .group_by(Delivery.destination, Delivery.state)
                                 .order_by(Delivery.destination, Delivery.state)).all()
    last = session.scalars(select(Event).where(Event.outcome.in_(("error", "rejected")))
                           .order_by(Event.id.desc()).limit(errors)).all()
    return {
        "jobs": {state.value: int(jobs.get(state.value, 0)) for state in JobState},
        "deliveries": [{"destination": d, "state": st, "count": int(n)} for d, st, n in deliveries],
        "last_errors": [{"time": as_utc(e.time).isoformat(), "kind": e.kind, "sop_instance_uid": e.sop_instance_uid,
                         "job_id": e.job_id, "reason_code": e.reason_code, "message": e.message} for e in last],
    }
