"""backfill_studies.moved_at: when an attempt of the run started retrieving the study.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

A runner killed between its C-MOVE and recording the outcome leaves a study that is claimed
again and found screened. It is this run's work (done) only if an attempt of the run had
started a C-MOVE for it; otherwise something else screened it (already-screened). The column
is what tells the two apart.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("backfill_studies") as batch:
        batch.add_column(sa.Column("moved_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("backfill_studies") as batch:
        batch.drop_column("moved_at")
