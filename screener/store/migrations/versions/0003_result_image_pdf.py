"""Deliveries of the result image and the PDF report: two more values of deliveries.kind.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Only the CHECK constraint on deliveries.kind changes, under the name 0001 gave it (which the
naming convention made ck_deliveries_ck_deliveries_kind). PostgreSQL alters it in place. SQLite
cannot alter a constraint, so the table is rebuilt from its own stored DDL with just that
clause replaced (rows, names and indexes kept), and the administrators' views that read it
(0002) are dropped before and created again after. Alembic's batch mode is not used: it runs
the models' naming convention over the reflected names and would rename every other CHECK of
the table to ck_deliveries_ck_deliveries_*. Downgrading deletes the image and pdf delivery
rows: the old constraint does not admit them.
"""

from __future__ import annotations

import importlib

from alembic import op
from sqlalchemy import text

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_views = importlib.import_module("screener.store.migrations.versions.0002_views")

OLD = "kind IN ('sr', 'gsps')"
NEW = "kind IN ('sr', 'gsps', 'image', 'pdf')"
_TMP = "_deliveries_0003"


def _sqlite_rebuild(old: str, new: str) -> None:
    bind = op.get_bind()
    ddl = bind.execute(text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'deliveries'")).scalar_one()
    if old not in ddl:
        raise RuntimeError(f"deliveries: expected the constraint CHECK ({old}) in its DDL, found: {ddl}")
    head, rest = ddl.split("(", 1)
    indexes = bind.execute(text("SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'deliveries' "
                                "AND sql IS NOT NULL")).scalars().all()
    _views.downgrade()
    op.execute(f"CREATE TABLE {_TMP} (" + rest.replace(old, new, 1))
    op.execute(f"INSERT INTO {_TMP} SELECT * FROM deliveries")
    op.execute("DROP TABLE deliveries")
    op.execute(f"ALTER TABLE {_TMP} RENAME TO deliveries")
    for statement in indexes:
        op.execute(statement)
    _views.upgrade()


def _replace(old: str, new: str) -> None:
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_rebuild(old, new)
    else:
        name = op.get_bind().execute(text(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'deliveries'::regclass AND contype = 'c' "
            "AND pg_get_constraintdef(oid) LIKE '%kind%'")).scalar_one()
        op.execute(f'ALTER TABLE deliveries DROP CONSTRAINT "{name}"')
        op.execute(f'ALTER TABLE deliveries ADD CONSTRAINT "{name}" CHECK ({new})')


def upgrade() -> None:
    _replace(OLD, NEW)


def downgrade() -> None:
    op.execute("DELETE FROM deliveries WHERE kind IN ('image', 'pdf')")
    _replace(NEW, OLD)
