"""``screener audit``: the questions an administrator asks of the audit database.

Every query takes a SQLAlchemy session and returns plain dicts (one per row, columns in a fixed
order), read from the ``events`` trail where it can be: events outlive purged jobs and
deliveries. Percentiles are computed in Python from event times, so the same code answers on
SQLite and PostgreSQL. ``render`` prints rows as a fixed-width table, JSON or CSV.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from screener.result import SITES, JobResult, ResultDocumentError
from screener.store.models import Delivery, DeliveryState, Event, Instance, Job, JobState, as_utc

DEFAULT_DATABASE_URL = "sqlite:///./screener-data/screener.db"
FORMATS = ("table", "json", "csv")
BUCKETS = ("hour", "day")
FAILURE_KINDS = ("failed", "ineligible", "dead")
OSTEOPOROSIS = "osteoporosis"

Row = dict[str, Any]
Counter_t = dict[str, int]

# ---------------------------------------------------------------- result documents


def result_fields(result: Mapping[str, Any] | None) -> Row:
    """BMD and T-score per site (``bmd_l1`` .. ``bmd_l1_l4``), ``who_category``, and the
    result's ``code``/``reason``; None where the document does not have them (or there is none)."""
    row: Row = {f"bmd_{_column(site)}": None for site in SITES}
    row |= {f"tscore_{_column(site)}": None for site in SITES}
    row |= {"who_category": None, "code": None, "reason": None}
    if not result:
        return row
    try:
        parsed = JobResult.from_json(result)
    except ResultDocumentError:
        return row
    row["code"], row["reason"] = parsed.code.value, parsed.reason
    m = parsed.measurement
    if m is not None:
        for site in SITES:
            row[f"bmd_{_column(site)}"] = m.bmd_g_cm2.get(site)
            row[f"tscore_{_column(site)}"] = m.tscore.get(site) if m.tscore else None
        row["who_category"] = m.who_category
    return row


def _column(site: str) -> str:
    return site.lower().replace("-", "_")


def _summary(result: Mapping[str, Any] | None) -> str | None:
    f = result_fields(result)
    parts = []
    if f["bmd_l1_l4"] is not None:
        parts.append(f"L1-L4 BMD {f['bmd_l1_l4']:.3f} g/cm2")
    if f["tscore_l1_l4"] is not None:
        parts.append(f"T {f['tscore_l1_l4']:+.1f}")
    if f["who_category"]:
        parts.append(f["who_category"])
    if not parts and f["code"]:
        parts.append(f"{f['code']}: {f['reason']}" if f["reason"] else f["code"])
    return ", ".join(parts) or None


# ---------------------------------------------------------------- queries


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None:
        raise ValueError(f"{name}: naive datetime {value!r}; pass a timezone-aware time")
    return value.astimezone(UTC)


def _read(session: Session, query: Any) -> list[Any]:
    rows = list(session.execute(query))
    # End the read transaction: the session may be handed to queue functions next, which
    # refuse an open transaction. Detach the rows first: a rollback would expire them, and the
    # next attribute read would silently open a new transaction.
    session.expunge_all()
    session.rollback()
    return rows


def history(session: Session, *, study_uid: str | None = None, accession: str | None = None,
            sop_uid: str | None = None) -> list[Row]:
    """Every event for the matching instances, in time order. Filters combine with AND; at
    least one is required."""
    if not (study_uid or accession or sop_uid):
        raise ValueError("history: give a study UID, an accession number or a SOP Instance UID")
    query = select(Event, Delivery.destination).outerjoin(Delivery, Delivery.id == Event.delivery_id)
    if study_uid:
        query = query.where(Event.study_uid == study_uid)
    if accession:
        query = query.where(Event.accession_number == accession)
    if sop_uid:
        query = query.where(Event.sop_instance_uid == sop_uid)
    query = query.order_by(Event.time, Event.id)
    out = []
    for event, destination in _read(session, query):
        out.append({
            "time": event.time, "kind": event.kind, "outcome": event.outcome,
            "sop_instance_uid": event.sop_instance_uid, "study_uid": event.study_uid,
            "accession_number": event.accession_number, "model_id": event.model_id,
            "job_id": event.job_id, "delivery_id": event.delivery_id, "destination": destination,
            "peer_ae": event.peer_ae, "reason_code": event.reason_code,
            "detail": event.message or _summary(event.result_json),
        })
    return out


def failures(session: Session, since: datetime) -> list[Row]:
    """Jobs that failed or were found ineligible, and deliveries that went dead, since ``since``
    (oldest first). ``reason_code`` is the event's code, else the Outcome code of an ineligible
    job; ``message`` the event's message, else the Outcome reason."""
    since = _aware(since, "since")
    query = (
        select(Event, Delivery.destination, Delivery.kind)
        .outerjoin(Delivery, Delivery.id == Event.delivery_id)
        .where(Event.kind.in_(FAILURE_KINDS), Event.time >= since)
        .order_by(Event.time, Event.id)
    )
    out = []
    for event, destination, delivery_kind in _read(session, query):
        fields = result_fields(event.result_json)
        out.append({
            "time": event.time, "kind": event.kind, "sop_instance_uid": event.sop_instance_uid,
            "accession_number": event.accession_number, "model_id": event.model_id,
            "job_id": event.job_id, "delivery_id": event.delivery_id,
            "destination": destination, "delivery_kind": delivery_kind,
            "reason_code": event.reason_code or fields["code"],
            "message": event.message or fields["reason"],
        })
    return out


def backlog(session: Session, *, now: datetime | None = None) -> list[Row]:
    """Pending deliveries per destination, the one with the oldest waiting delivery first.
    A delivery joins the backlog when its job completes (the job's ``updated_at``)."""
    now = datetime.now(UTC) if now is None else _aware(now, "now")
    query = (
        select(
            Delivery.destination,
            func.count().label("pending"),
            func.sum(case((Delivery.attempts > 0, 1), else_=0)),
            func.min(Job.updated_at),
            func.min(Delivery.next_attempt_at),
        )
        .join(Job, Job.id == Delivery.job_id)
        .where(Delivery.state == DeliveryState.PENDING)
        .group_by(Delivery.destination)
    )
    return _backlog_rows(session, query, now)


def _backlog_rows(session: Session, query: Any, now: datetime) -> list[Row]:
    out = []
    for destination, pending, retrying, oldest, next_attempt in _read(session, query):
        oldest = as_utc(oldest)
        out.append({
            "destination": destination, "pending": int(pending), "retrying": int(retrying or 0),
            "oldest_queued_at": oldest,
            "oldest_age_s": None if oldest is None else round((now - oldest).total_seconds(), 1),
            "next_attempt_at": as_utc(next_attempt),
        })
    out.sort(key=lambda r: (r["oldest_queued_at"] is None, r["oldest_queued_at"] or now, r["destination"]))
    return out


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100) by linear interpolation between closest ranks (NumPy's
    default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _bucket(time: datetime, bucket: str) -> datetime:
    time = time.astimezone(UTC)
    if bucket == "hour":
        return time.replace(minute=0, second=0, microsecond=0)
    return time.replace(hour=0, minute=0, second=0, microsecond=0)


def throughput(session: Session, since: datetime, bucket: str = "hour") -> list[Row]:
    """Per hour or day (UTC) since ``since``: images received, jobs done / ineligible / failed,
    SR deliveries acknowledged, and latency percentiles in seconds: received -> done (bucketed by
    the done time) and received -> SR acknowledged, per SR delivery (bucketed by the send time).
    A job's received time is its "received" event (re-queued duplicates included)."""
    if bucket not in BUCKETS:
        raise ValueError(f"bucket: {bucket!r} is not one of {', '.join(BUCKETS)}")
    since = _aware(since, "since")
    kinds = ("received", "done", "ineligible", "failed", "sent")
    query = (
        select(Event.time, Event.kind, Event.job_id, Delivery.kind, Event.message)
        .outerjoin(Delivery, Delivery.id == Event.delivery_id)
        .where(Event.time >= since, Event.kind.in_(kinds))
        .order_by(Event.time, Event.id)
    )
    events = _read(session, query)
    job_ids = {job_id for _, kind, job_id, _, _ in events if kind in ("done", "sent") and job_id is not None}
    received_at = _received_times(session, job_ids)

    counts: dict[datetime, Counter_t] = defaultdict(lambda: defaultdict(int))
    done_latency: dict[datetime, list[float]] = defaultdict(list)
    sr_latency: dict[datetime, list[float]] = defaultdict(list)
    for time, kind, job_id, delivery_kind, message in events:
        key = _bucket(time, bucket)
        if kind == "sent":
            # The delivery row may have been purged; its event message starts with the kind.
            is_sr = delivery_kind == "sr" if delivery_kind is not None else (message or "").startswith("sr ")
            if not is_sr:
                continue
            counts[key]["sr_sent"] += 1
            if job_id in received_at:
                sr_latency[key].append((time - received_at[job_id]).total_seconds())
            continue
        counts[key][kind] += 1
        if kind == "done" and job_id in received_at:
            done_latency[key].append((time - received_at[job_id]).total_seconds())

    out = []
    for key in sorted(counts):
        c, d, s = counts[key], done_latency[key], sr_latency[key]
        out.append({
            "bucket": key.strftime("%Y-%m-%dT%H:00Z" if bucket == "hour" else "%Y-%m-%d"),
            "received": c["received"], "done": c["done"], "ineligible": c["ineligible"],
            "failed": c["failed"], "sr_sent": c["sr_sent"],
            "done_p50_s": _round(percentile(d, 50)), "done_p95_s": _round(percentile(d, 95)),
            "sr_p50_s": _round(percentile(s, 50)), "sr_p95_s": _round(percentile(s, 95)),
        })
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _received_times(session: Session, job_ids: Iterable[int]) -> dict[int, datetime]:
    ids = sorted(job_ids)
    found: dict[int, datetime] = {}
    for start in range(0, len(ids), 500):  # keep the IN list within every backend's limits
        chunk = ids[start:start + 500]
        query = (select(Event.job_id, func.min(Event.time))
                 .where(Event.kind == "received", Event.job_id.in_(chunk)).group_by(Event.job_id))
        for job_id, time in _read(session, query):
            found[job_id] = as_utc(time)
        # Fallback for jobs whose received event is gone: the instance's first arrival.
        missing = [j for j in chunk if j not in found]
        if missing:
            query = select(Job.id, Instance.received_at).join(Instance).where(Job.id.in_(missing))
            for job_id, time in _read(session, query):
                found[job_id] = time
    return found


def positives(session: Session, since: datetime, until: datetime | None = None) -> list[Row]:
    """Jobs completed with WHO category osteoporosis in ``[since, until)``, oldest first, from
    the result stored with each "done" event (the latest one per job)."""
    since = _aware(since, "since")
    until = datetime.now(UTC) if until is None else _aware(until, "until")
    if until <= since:
        raise ValueError(f"until: {until.isoformat()} is not after since {since.isoformat()}")
    query = (
        select(Event)
        .where(Event.kind == JobState.DONE.value, Event.time >= since, Event.time < until)
        .order_by(Event.time, Event.id)
    )
    latest: dict[Any, Row] = {}
    for (event,) in _read(session, query):
        fields = result_fields(event.result_json)
        if fields["who_category"] != OSTEOPOROSIS:
            continue
        row = {
            "time": event.time, "accession_number": event.accession_number,
            "sop_instance_uid": event.sop_instance_uid, "study_uid": event.study_uid,
            "model_id": event.model_id, "job_id": event.job_id,
            **{k: fields[k] for k in fields if k.startswith(("bmd_", "tscore_"))},
            "who_category": fields["who_category"],
        }
        latest.pop(event.job_id or ("event", event.id), None)
        latest[event.job_id or ("event", event.id)] = row
    return sorted(latest.values(), key=lambda r: r["time"])


# ---------------------------------------------------------------- output


def _cell(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, float):
        return round(value, 4)
    return value


def render(rows: Sequence[Mapping[str, Any]], fmt: str = "table") -> str:
    """Rows as a fixed-width text table, a JSON array or CSV with a header line. Times are
    ISO 8601 UTC ("...Z"); missing values are empty cells ("-" in tables, null in JSON)."""
    if fmt not in FORMATS:
        raise ValueError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    if fmt == "json":
        return json.dumps([{k: _cell(row.get(k)) for k in columns} for row in rows], indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(k) is None else _cell(row.get(k)) for k in columns])
        return buffer.getvalue()
    if not rows:
        return "(no rows)\n"
    cells = [[_table_text(row.get(k)) for k in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(lines) + "\n"


def _table_text(value: Any) -> str:
    if value is None:
        return "-"
    text = str(_cell(value))
    return " ".join(text.split())  # one line per row, whatever the message holds


# ---------------------------------------------------------------- command line

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """ISO 8601 (a date, or a date and time; no zone means UTC) or a span back from now such as
    "90m", "24h", "7d", "2w". Raises ValueError with what is accepted."""
    now = datetime.now(UTC) if now is None else _aware(now, "now")
    match = _RELATIVE.match(text)
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()])
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is neither an ISO 8601 time (2024-06-01T12:00Z) "
                         "nor a span back from now (90m, 24h, 7d, 2w)") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _time_arg(text: str) -> datetime:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_audit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``audit`` and its sub-commands on an ``add_subparsers()`` object."""
    audit = subparsers.add_parser(
        "audit", help="query the audit database: history, failures, backlog, throughput, positives",
        description="Answers from the audit trail. Times are ISO 8601 (UTC unless a zone is given) "
                    "or a span back from now: 90m, 24h, 7d, 2w.")
    sub = audit.add_subparsers(dest="audit_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
        p.add_argument("--config", type=Path, default=None,
                       help="TOML configuration; its [storage] database_url names the database")
        p.add_argument("--database-url", default=None,
                       help=f"SQLAlchemy URL of the database (default: config, else {DEFAULT_DATABASE_URL})")
        p.set_defaults(func=run_audit)

    h = sub.add_parser("history", help="every event for a study, accession number or SOP Instance UID")
    h.add_argument("--study", default=None, help="Study Instance UID")
    h.add_argument("--accession", default=None, help="Accession Number")
    h.add_argument("--sop", default=None, help="SOP Instance UID")
    common(h)
    f = sub.add_parser("failures", help="failed or ineligible jobs and dead deliveries since a time")
    f.add_argument("--since", type=_time_arg, default="24h", help="from when (default: 24h)")
    common(f)
    b = sub.add_parser("backlog", help="pending deliveries per destination, oldest first")
    common(b)
    t = sub.add_parser("throughput", help="images, jobs and latency percentiles per hour or day")
    t.add_argument("--since", type=_time_arg, default="24h", help="from when (default: 24h)")
    t.add_argument("--bucket", choices=BUCKETS, default="hour", help="bucket size (default: hour)")
    common(t)
    p = sub.add_parser("positives", help="positive screens (WHO osteoporosis) in a period")
    p.add_argument("--since", type=_time_arg, default="7d", help="from when (default: 7d)")
    p.add_argument("--until", type=_time_arg, default=None, help="until when, exclusive (default: now)")
    common(p)
    return audit


def database_url(args: argparse.Namespace) -> str:
    """--database-url, else the database of --config (the node's own rule: [storage]
    database_url, or the SQLite file under data_dir), else the embedded default."""
    if getattr(args, "database_url", None):
        return args.database_url
    from screener.config import Settings, load_config

    config = getattr(args, "config", None)
    return (load_config(config) if config is not None else Settings()).database_url


def _open(url: str) -> Any:
    from screener.store.db import make_engine

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        # Reading must not create an empty database where the node's one was expected.
        if not Path(parsed.database).is_file():
            raise FileNotFoundError(f"database: no SQLite file at {parsed.database} (give --database-url or --config)")
    return make_engine(url)


def run_audit(args: argparse.Namespace, out: Any = None) -> int:
    out = sys.stdout if out is None else out
    if args.audit_command == "history" and not (args.study or args.accession or args.sop):
        raise ValueError("audit history: give --study, --accession or --sop")
    engine = _open(database_url(args))
    try:
        with Session(engine) as session:
            rows = _query(session, args)
    finally:
        engine.dispose()
    out.write(render(rows, args.format))
    return 0


def _query(session: Session, args: argparse.Namespace) -> list[Row]:
    command = args.audit_command
    if command == "history":
        return history(session, study_uid=args.study, accession=args.accession, sop_uid=args.sop)
    if command == "failures":
        return failures(session, args.since)
    if command == "backlog":
        return backlog(session)
    if command == "throughput":
        return throughput(session, args.since, args.bucket)
    if command == "positives":
        return positives(session, args.since, args.until)
    raise ValueError(f"audit: unknown command {command!r}")
