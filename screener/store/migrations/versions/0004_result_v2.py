"""Job result documents to version 2, stable reason codes everywhere, views on the new schema.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Version 1 documents (written before screener.result existed) had their outputs as a list of
paths, eligibility codes in snake_case, and were read "inside result or at the top level".
This revision rewrites every ``jobs.result_json`` and ``events.result_json`` as version 2
(screener/result.py): ``version``, outputs keyed by object kind with each object's SOP
Instance UID (from the outbox rows, else the file), codes hyphenated, ``result`` always
present. Events of failed jobs, retries and ineligible jobs get the ``reason_code`` they
lacked (parsed from the message "<why>: <code>: <reason>", or the result's code). The
administrators' views are created again reading only the version-2 paths.

The conversion is written out here, not imported: a migration must do the same thing forever,
whatever the application code later becomes. Downgrading puts the 0002 views back (they read
version-2 documents too); the documents and codes stay converted.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

from alembic import op
from sqlalchemy import text

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_v2 = importlib.import_module("screener.store.migrations.versions.0002_views")

SITES = ("L1", "L2", "L3", "L4", "L1-L4")
_SUFFIXES = {".sr.dcm": "sr", ".gsps.dcm": "gsps", ".sc.dcm": "image", ".pdf.dcm": "pdf"}
# Codes whose spelling changed (everything else already was lower-case and hyphenated).
_RENAMED = {"invalid-SOPInstanceUID": "invalid-sop-instance-uid",
            "invalid-StudyInstanceUID": "invalid-study-instance-uid",
            "invalid-SeriesInstanceUID": "invalid-series-instance-uid"}
_CODE_IN_MESSAGE = re.compile(r"^(?:not retryable|attempts exhausted \(\d+\)|attempt \d+ of \d+ failed): "
                              r"([a-z][a-z0-9_-]*): ")


def code(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    return _RENAMED.get(value, value.replace("_", "-"))


def convert(doc: Any, object_uids: dict[str, str]) -> Any:
    """One version-1 document as version 2 (a version-2 one unchanged)."""
    if not isinstance(doc, dict) or doc.get("version") == 2:
        return doc
    inner = doc.get("result")
    if not isinstance(inner, dict):
        inner = {k: doc[k] for k in ("model_id", "demo", "bmd_g_cm2", "tscore", "who_category", "tscore_note",
                                     "landmarks_xy", "landmark_confidence", "roi_corners_xy", "demo_statement",
                                     "coordinates") if k in doc} or None
        if inner is not None and "bmd_g_cm2" not in inner:
            inner = None
    outputs: dict[str, dict[str, str]] = {}
    for path in doc.get("outputs") or []:
        kind = next((k for suffix, k in _SUFFIXES.items() if str(path).endswith(suffix)), None)
        if kind is None:
            continue
        uid = object_uids.get(kind) or _uid_in_file(Path(str(path)))
        if uid:
            outputs[kind] = {"path": str(path), "sop_instance_uid": uid}
    status = doc.get("status")
    return {
        "version": 2,
        "status": status if status in ("reported", "ineligible", "error") else ("reported" if inner else "error"),
        "code": code(doc.get("code") or ("eligible" if inner else "internal-error")),
        "reason": str(doc.get("reason", "")),
        "sop_instance_uid": str(doc.get("sop_instance_uid", "")),
        "file": str(doc.get("file", "")),
        "outputs": outputs,
        "seconds": doc.get("seconds") if isinstance(doc.get("seconds"), dict) else {},
        "result": inner,
    }


def _uid_in_file(path: Path) -> str | None:
    try:
        import pydicom

        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    except Exception:  # gone or unreadable: that output is not listed
        return None


def _load(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _rewrite_documents() -> None:
    bind = op.get_bind()
    uids: dict[int, dict[str, str]] = {}
    for job_id, kind, uid in bind.execute(text("SELECT job_id, kind, sop_instance_uid FROM deliveries "
                                               "WHERE sop_instance_uid IS NOT NULL")):
        uids.setdefault(job_id, {})[kind] = uid
    # SQLite keeps JSON as text; PostgreSQL needs the text cast to its json type.
    value = ":doc" if bind.dialect.name == "sqlite" else "CAST(:doc AS JSON)"
    for table, key in (("jobs", "id"), ("events", "job_id")):
        rows = bind.execute(text(f"SELECT id, {key}, result_json FROM {table} WHERE result_json IS NOT NULL")).all()
        for row_id, job_id, raw in rows:
            doc = _load(raw)
            new = convert(doc, uids.get(job_id, {}))
            if new is not doc:
                bind.execute(text(f"UPDATE {table} SET result_json = {value} WHERE id = :id"),
                             {"doc": json.dumps(new), "id": row_id})


def _rewrite_codes() -> None:
    bind = op.get_bind()
    for row_id, reason_code in bind.execute(text("SELECT id, reason_code FROM events WHERE reason_code IS NOT NULL")).all():
        if code(reason_code) != reason_code:
            bind.execute(text("UPDATE events SET reason_code = :c WHERE id = :id"), {"c": code(reason_code), "id": row_id})
    missing = bind.execute(text("SELECT id, kind, message, result_json FROM events WHERE reason_code IS NULL "
                                "AND kind IN ('failed', 'retry', 'ineligible')")).all()
    for row_id, kind, message, raw in missing:
        found = None
        match = _CODE_IN_MESSAGE.match(message or "")
        if match:
            found = code(match.group(1))
        elif kind == "ineligible":
            doc = _load(raw)
            found = doc.get("code") if isinstance(doc, dict) else None
        if found:
            bind.execute(text("UPDATE events SET reason_code = :c WHERE id = :id"), {"c": found, "id": row_id})


def view_sql(dialect: str) -> dict[str, str]:
    """The 0002 views, reading version-2 documents only (``result.*``; reason codes from events)."""
    j = _v2._json

    def result(path: tuple[str, ...], number: bool = False) -> str:
        return j(dialect, "j.result_json", ("result", *path), number)

    column = _v2._site_column
    bmd = ",\n        ".join(f"{result(('bmd_g_cm2', s), True)} AS bmd_{column(s)}" for s in SITES)
    tscore = ",\n        ".join(f"{result(('tscore', s), True)} AS tscore_{column(s)}" for s in SITES)
    views = _v2.view_sql(dialect)  # v_delivery_backlog and v_positive_screens are unchanged
    views["v_instance_history"] = f"""
CREATE VIEW v_instance_history AS
    SELECT
        i.id AS instance_id,
        i.sop_instance_uid,
        i.study_instance_uid,
        i.series_instance_uid,
        i.accession_number,
        i.patient_id_hash,
        i.calling_ae,
        i.peer_address,
        i.received_at,
        j.id AS job_id,
        j.model_id,
        j.state AS job_state,
        j.attempts,
        j.max_attempts,
        j.last_error,
        j.updated_at AS job_updated_at,
        {j(dialect, "j.result_json", ("code",))} AS result_code,
        {j(dialect, "j.result_json", ("reason",))} AS result_reason,
        {bmd},
        {tscore},
        {result(('who_category',))} AS who_category,
        (SELECT COUNT(*) FROM deliveries d WHERE d.job_id = j.id AND d.state = 'pending') AS deliveries_pending,
        (SELECT COUNT(*) FROM deliveries d WHERE d.job_id = j.id AND d.state = 'sent') AS deliveries_sent,
        (SELECT COUNT(*) FROM deliveries d WHERE d.job_id = j.id AND d.state = 'dead') AS deliveries_dead
    FROM instances i
    LEFT JOIN jobs j ON j.instance_id = i.id
"""
    views["v_failures"] = f"""
CREATE VIEW v_failures AS
    SELECT
        e.id AS event_id,
        e.time,
        e.kind,
        e.sop_instance_uid,
        e.study_uid,
        e.accession_number,
        e.model_id,
        e.job_id,
        e.delivery_id,
        d.destination,
        d.kind AS delivery_kind,
        e.reason_code,
        COALESCE(e.message, CASE WHEN e.kind = 'ineligible' THEN {j(dialect, "j2.result_json", ("reason",))} END)
            AS message
    FROM events e
    LEFT JOIN deliveries d ON d.id = e.delivery_id
    LEFT JOIN jobs j2 ON j2.id = e.job_id
    WHERE e.kind IN ('failed', 'ineligible', 'dead')
"""
    return {name: views[name] for name in _v2.view_sql(dialect)}  # creation order


def upgrade() -> None:
    _rewrite_documents()
    _rewrite_codes()
    _v2.downgrade()
    for statement in view_sql(op.get_bind().dialect.name).values():
        op.execute(statement)


def downgrade() -> None:
    _v2.downgrade()
    _v2.upgrade()
