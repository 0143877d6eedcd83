"""backfill_studies.moved_at, and the precision of each result in v_instance_history.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

A runner killed between its C-MOVE and recording the outcome leaves a study that is claimed
again and found screened. It is this run's work (done) only if an attempt of the run had
started a C-MOVE for it; otherwise something else screened it (already-screened).
``moved_at`` is what tells the two apart.

Result documents now say at which precision the BMD network ran (``result.precision``: fp32,
bf16 or fp16; absent before this release); v_instance_history gets it as bmd_precision, after
who_category, so administrators can find the results of a half-precision node. The other
views are created again unchanged.
"""

from __future__ import annotations

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_v2 = importlib.import_module("screener.store.migrations.versions.0002_views")
_v4 = importlib.import_module("screener.store.migrations.versions.0004_result_v2")


def view_sql(dialect: str) -> dict[str, str]:
    """The 0004 views, v_instance_history with a bmd_precision column after who_category."""
    views = _v4.view_sql(dialect)
    who = f"{_v2._json(dialect, 'j.result_json', ('result', 'who_category'))} AS who_category,"
    precision = f"{_v2._json(dialect, 'j.result_json', ('result', 'precision'))} AS bmd_precision,"
    history = views["v_instance_history"]
    if history.count(who) != 1:  # 0004's text is fixed forever; this guards the splice
        raise RuntimeError("migration 0006: who_category not found once in the 0004 v_instance_history")
    views["v_instance_history"] = history.replace(who, f"{who}\n        {precision}")
    return views


def upgrade() -> None:
    with op.batch_alter_table("backfill_studies") as batch:
        batch.add_column(sa.Column("moved_at", sa.DateTime(timezone=True), nullable=True))
    _v2.downgrade()  # drops every view
    for statement in view_sql(op.get_bind().dialect.name).values():
        op.execute(statement)


def downgrade() -> None:
    _v2.downgrade()
    for statement in _v4.view_sql(op.get_bind().dialect.name).values():
        op.execute(statement)
    with op.batch_alter_table("backfill_studies") as batch:
        batch.drop_column("moved_at")
