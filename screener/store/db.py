"""Engine, sessions and schema creation.

SQLite is the embedded default. Its connections are set up for a durable, concurrent queue:
WAL (readers do not block the writer), FULL sync (a committed row survives power loss, which
is what "ack only what is on disk" needs), foreign keys on, and a busy timeout so a writer
waits for the lock instead of failing at once.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent / "migrations"

# Connection execution option naming how SQLite should begin the transaction. Write
# transactions use IMMEDIATE: the write lock is taken at BEGIN, so a transaction never has to
# upgrade a read snapshot to a write, which in WAL mode fails with SQLITE_BUSY without waiting.
SQLITE_BEGIN = "screener_sqlite_begin"
_SQLITE_BEGIN_MODES = frozenset({"DEFERRED", "IMMEDIATE", "EXCLUSIVE"})
SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite connections get the pragmas and explicit BEGIN above."""
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Turn off pysqlite's own implicit BEGIN so the "begin" hook below decides the mode
        # (the SQLAlchemy-documented recipe for SQLite transaction control).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(SQLITE_BEGIN, "DEFERRED")
        if mode not in _SQLITE_BEGIN_MODES:
            raise ValueError(f"{SQLITE_BEGIN}: {mode!r} is not one of {sorted(_SQLITE_BEGIN_MODES)}")
        connection.exec_driver_sql(f"BEGIN {mode}")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: queue functions commit and hand back rows that callers (workers
    # in other threads) read after the session is gone.
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str | None = None) -> Config:
    """Alembic config pointing at the bundled migrations (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url)
    return config


def create_schema(engine: Engine) -> None:
    """Bring the database to the newest schema by running the Alembic migrations."""
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def write_probe(engine: Engine, timeout_s: float = 2.0) -> None:
    """Raise (OperationalError) unless a write transaction can start within ``timeout_s``.

    For the health endpoint: a database that answers reads but holds its write lock for
    another process (a long migration, a stuck backup, an administrator's open shell) takes
    no images, and a read-only check would call it healthy. Nothing is written.
    """
    if engine.dialect.name == "sqlite":
        raw = engine.raw_connection()  # plain DBAPI: the pragma and BEGIN are ours, not SQLAlchemy's
        try:
            sqlite = raw.driver_connection
            sqlite.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
            try:
                sqlite.execute("BEGIN IMMEDIATE")
                sqlite.execute("ROLLBACK")
            except sqlite3.Error as error:
                raise OperationalError("BEGIN IMMEDIATE", None, error) from error
            finally:
                sqlite.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        finally:
            raw.close()
        return
    with engine.connect() as connection, connection.begin():
        connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{int(timeout_s * 1000)}ms'")
        connection.exec_driver_sql("LOCK TABLE events IN ROW EXCLUSIVE MODE")
