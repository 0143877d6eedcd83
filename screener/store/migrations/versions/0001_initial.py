"""Initial schema: instances, jobs, deliveries, events.

Revision ID: 0001
Revises:
Create Date: 2024-06-01

Written by hand, frozen: later changes go in new revisions, never here. Types are spelled out
(not imported from models) so this file keeps meaning what it meant when it shipped.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UID = sa.String(64)
AE_TITLE = sa.String(16)


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", UID, nullable=False),
        sa.Column("study_instance_uid", UID, nullable=False),
        sa.Column("series_instance_uid", UID, nullable=False),
        sa.Column("sop_class_uid", UID, nullable=False),
        sa.Column("transfer_syntax_uid", UID, nullable=False),
        sa.Column("accession_number", sa.String(64), nullable=True),
        sa.Column("patient_id_hash", sa.String(64), nullable=True),
        sa.Column("calling_ae", AE_TITLE, nullable=True),
        sa.Column("peer_address", sa.String(255), nullable=True),
        sa.Column("spool_path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("received_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_instances"),
        sa.UniqueConstraint("sop_instance_uid", name="uq_instances_sop_instance_uid"),
    )
    op.create_index("ix_instances_study_instance_uid", "instances", ["study_instance_uid"])
    op.create_index("ix_instances_accession_number", "instances", ["accession_number"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_expires_at", _utc(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("result_json", sa.JSON(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.ForeignKeyConstraint(["instance_id"], ["instances.id"], name="fk_jobs_instance_id_instances"),
        sa.UniqueConstraint("instance_id", "model_id", name="uq_jobs_instance_id_model_id"),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'done', 'ineligible', 'failed')", name="ck_jobs_state"
        ),
    )
    op.create_index("ix_jobs_state_lease_expires_at", "jobs", ["state", "lease_expires_at"])

    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("sop_instance_uid", UID, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", _utc(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_deliveries"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_deliveries_job_id_jobs"),
        sa.UniqueConstraint("job_id", "destination", "kind", name="uq_deliveries_job_id_destination_kind"),
        sa.CheckConstraint("kind IN ('sr', 'gsps')", name="ck_deliveries_kind"),
        sa.CheckConstraint("state IN ('pending', 'sent', 'dead')", name="ck_deliveries_state"),
    )
    op.create_index("ix_deliveries_state_next_attempt_at", "deliveries", ["state", "next_attempt_at"])

    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("time", _utc(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("peer_ae", AE_TITLE, nullable=True),
        sa.Column("peer_address", sa.String(255), nullable=True),
        sa.Column("sop_instance_uid", UID, nullable=True),
        sa.Column("study_uid", UID, nullable=True),
        sa.Column("accession_number", sa.String(64), nullable=True),
        sa.Column("reason_code", sa.String(64), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("model_id", sa.String(128), nullable=True),
        sa.Column("timings_json", sa.JSON(), nullable=True),
        sa.Column("result_json", sa.JSON(), nullable=True),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("delivery_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_time", "events", ["time"])
    op.create_index("ix_events_sop_instance_uid", "events", ["sop_instance_uid"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("deliveries")
    op.drop_table("jobs")
    op.drop_table("instances")
