"""Alembic migrations for the node database (run by screener.store.db.create_schema)."""
