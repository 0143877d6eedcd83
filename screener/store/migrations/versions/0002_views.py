"""Read-only SQL views for administrators who query the database directly.

Revision ID: 0002
Revises: 0001
Create Date: 2024-06-15

Views, not tables: Alembic's compare_metadata reflects tables only, so the models need no
counterpart. JSON access differs by dialect (SQLite ``json_extract``, PostgreSQL ``->``/``->>``),
so the view text is written per dialect from one description. ``result_json`` is the document
``Outcome.to_json()`` writes: ``{"code", "reason", ..., "result": {"bmd_g_cm2": {"L1".."L4",
"L1-L4"}, "tscore": {...} | null, "who_category": ...}}``; a bare ``result`` object (the fields at
the top level) is read too. Frozen like 0001: change views in a new revision.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

VIEWS = ("v_positive_screens", "v_failures", "v_delivery_backlog", "v_instance_history")
SITES = ("L1", "L2", "L3", "L4", "L1-L4")


def _json(dialect: str, column: str, path: tuple[str, ...], number: bool = False) -> str:
    """One JSON member as text (or a number), NULL where it is missing or not a scalar."""
    if dialect == "sqlite":
        quoted = ".".join(f'"{p}"' for p in path)
        return f"json_extract({column}, '$.{quoted}')"
    if dialect == "postgresql":
        head = "".join(f" -> '{p}'" for p in path[:-1])
        text = f"(({column}){head} ->> '{path[-1]}')"
        return f"CAST({text} AS DOUBLE PRECISION)" if number else text
    raise NotImplementedError(f"views: no JSON syntax for dialect {dialect!r}")


def _result(dialect: str, column: str, path: tuple[str, ...], number: bool = False) -> str:
    """A member of the result object, inside ``result`` or at the top level."""
    return (f"COALESCE({_json(dialect, column, ('result', *path), number)}, "
            f"{_json(dialect, column, path, number)})")


def _age_seconds(dialect: str, column: str) -> str:
    if dialect == "sqlite":
        # Times are stored as naive UTC text; julianday('now') is UTC too.
        return f"CAST(ROUND((julianday('now') - julianday({column})) * 86400.0) AS INTEGER)"
    return f"CAST(EXTRACT(EPOCH FROM (CURRENT_TIMESTAMP - {column})) AS BIGINT)"


def _site_column(site: str) -> str:
    return site.lower().replace("-", "_")


def view_sql(dialect: str) -> dict[str, str]:
    """CREATE VIEW statements by view name, in creation order."""
    bmd = ",\n        ".join(
        f"{_result(dialect, 'j.result_json', ('bmd_g_cm2', s), True)} AS bmd_{_site_column(s)}" for s in SITES)
    tscore = ",\n        ".join(
        f"{_result(dialect, 'j.result_json', ('tscore', s), True)} AS tscore_{_site_column(s)}" for s in SITES)
    code = _json(dialect, "j.result_json", ("code",))
    reason = _json(dialect, "j.result_json", ("reason",))
    ineligible_code = _json(dialect, "j2.result_json", ("code",))
    ineligible_reason = _json(dialect, "j2.result_json", ("reason",))
    return {
        # One row per (instance, job); an instance without a job yet has one row with NULL job fields.
        "v_instance_history": f"""
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
        {code} AS result_code,
        {reason} AS result_reason,
        {bmd},
        {tscore},
        {_result(dialect, 'j.result_json', ('who_category',))} AS who_category,
        (SELECT COUNT(*) FROM deliveries d WHERE d.job_id = j.id AND d.state = 'pending') AS deliveries_pending,
        (SELECT COUNT(*) FROM deliveries d WHERE d.job_id = j.id AND d.state = 'sent') AS deliveries_sent,
        (SELECT COUNT(*) FROM deliveries d WHERE d.job_id = j.id AND d.state = 'dead') AS deliveries_dead
    FROM instances i
    LEFT JOIN jobs j ON j.instance_id = i.id
""",
        # From the audit trail: every failed or ineligible job and every dead delivery, with when.
        "v_failures": f"""
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
        COALESCE(e.reason_code, CASE WHEN e.kind = 'ineligible' THEN {ineligible_code} END) AS reason_code,
        COALESCE(e.message, CASE WHEN e.kind = 'ineligible' THEN {ineligible_reason} END) AS message
    FROM events e
    LEFT JOIN deliveries d ON d.id = e.delivery_id
    LEFT JOIN jobs j2 ON j2.id = e.job_id
    WHERE e.kind IN ('failed', 'ineligible', 'dead')
""",
        # Pending deliveries per destination. A delivery is queued when its job completes, so
        # the job's updated_at is when it joined the backlog.
        "v_delivery_backlog": f"""
CREATE VIEW v_delivery_backlog AS
    SELECT
        d.destination,
        COUNT(*) AS pending,
        SUM(CASE WHEN d.attempts > 0 THEN 1 ELSE 0 END) AS retrying,
        MIN(j.updated_at) AS oldest_queued_at,
        MAX({_age_seconds(dialect, 'j.updated_at')}) AS oldest_age_s,
        MIN(d.next_attempt_at) AS next_attempt_at
    FROM deliveries d
    JOIN jobs j ON j.id = d.job_id
    WHERE d.state = 'pending'
    GROUP BY d.destination
""",
        "v_positive_screens": """
CREATE VIEW v_positive_screens AS
    SELECT
        instance_id, sop_instance_uid, study_instance_uid, accession_number, patient_id_hash,
        received_at, job_id, model_id, job_updated_at AS completed_at,
        bmd_l1, bmd_l2, bmd_l3, bmd_l4, bmd_l1_l4,
        tscore_l1, tscore_l2, tscore_l3, tscore_l4, tscore_l1_l4, who_category
    FROM v_instance_history
    WHERE job_state = 'done' AND who_category = 'osteoporosis'
""",
    }


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    for statement in view_sql(dialect).values():
        op.execute(statement)


def downgrade() -> None:
    for name in VIEWS:  # dependants first
        op.execute(f"DROP VIEW IF EXISTS {name}")
