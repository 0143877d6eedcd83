"""Backfill progress: backfill_runs and backfill_studies, and an index on the series UID.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

`screener backfill` lists the archive's studies here and claims them under a lease, so a
stopped or killed backfill resumes where it was and several nodes on one PostgreSQL database
share one. instances.series_instance_uid gets an index: before retrieving a series the
backfill counts what of it was already screened with the same model.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_index("ix_instances_series_instance_uid", "instances", ["series_instance_uid"])
    op.create_table(
        "backfill_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("first_date", sa.Date(), nullable=False),
        sa.Column("last_date", sa.Date(), nullable=False),
        sa.Column("min_age", sa.Float(), nullable=True),
        sa.Column("max_age", sa.Float(), nullable=True),
        sa.Column("model_id", sa.String(128), nullable=False),
        sa.Column("queried_through", sa.Date(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_backfill_runs"),
        sa.UniqueConstraint("key", name="uq_backfill_runs_key"),
    )
    op.create_table(
        "backfill_studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("study_date", sa.Date(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason_code", sa.String(64), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_expires_at", _utc(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_backfill_studies"),
        sa.ForeignKeyConstraint(["run_id"], ["backfill_runs.id"], name="fk_backfill_studies_run_id_backfill_runs"),
        sa.UniqueConstraint("run_id", "study_uid", name="uq_backfill_studies_run_id_study_uid"),
        sa.CheckConstraint("state IN ('pending', 'running', 'done', 'skipped', 'failed')",
                           name="ck_backfill_studies_state"),
    )
    op.create_index("ix_backfill_studies_run_id_state", "backfill_studies", ["run_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_backfill_studies_run_id_state", "backfill_studies")
    op.drop_table("backfill_studies")
    op.drop_table("backfill_runs")
    op.drop_index("ix_instances_series_instance_uid", "instances")
