"""The HTTP health endpoint: a real server on loopback, read with urllib."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import text

from screener.health import HealthChecks, start_health_server
from screener.store.models import Event, utcnow
from tests.support.common import free_port

Get = Callable[..., tuple[int, dict]]


@pytest.fixture
def health(engine, tmp_path) -> Iterator[Callable[..., Get]]:
    servers = []

    def start(processes: tuple[int, int], slots: tuple[int, int] = (0, 16), min_free_bytes: int = 0) -> Get:
        port = free_port()
        checks = HealthChecks(engine=engine, receive_processes=lambda: processes, slots=lambda: slots,
                              spool_root=tmp_path, min_free_bytes=min_free_bytes, write_timeout_s=0.5)
        servers.append(start_health_server("127.0.0.1", port, checks))

        def get(path: str = "/health", method: str = "GET") -> tuple[int, dict]:
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())
        return get

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_healthy_node_reports_its_queue_and_processes(health, factory) -> None:
    with factory() as session:
        session.add(Event(time=utcnow(), kind="rejected", outcome="error", reason_code="too-large", message="m"))
        session.commit()
    status, document = health((2, 2))()
    assert status == 200 and document["status"] == "ok" and document["problems"] == []
    assert document["jobs"] == {"queued": 0, "running": 0, "done": 0, "ineligible": 0, "failed": 0}
    assert document["receive_processes"] == {"configured": 2, "running": 2}
    assert [e["reason_code"] for e in document["last_errors"]] == ["too-large"]


def test_receive_process_down_is_503(health) -> None:
    status, document = health((2, 1))()
    assert status == 503 and document["status"] == "unavailable"
    assert document["problems"] == ["receive processes: 1 of 2 running"]


def test_database_unreadable_is_503(health, engine) -> None:
    with engine.begin() as connection:
        connection.execute(text("PRAGMA foreign_keys=OFF"))
        connection.execute(text("DROP TABLE jobs"))
    status, document = health((1, 1))()
    assert status == 503 and document["problems"][0].startswith("database: no such table")


def test_other_paths_and_methods_are_refused(health) -> None:
    get = health((1, 1))
    assert get("/")[0] == 404 and get("/health/../etc")[0] == 404
    assert get(method="POST")[0] == 405 and get(method="DELETE")[0] == 405
    assert get("/health?verbose=1")[0] == 200


# Before: each of the three faults below answered 200 "ok".


def test_spool_under_its_watermark_is_503(health) -> None:
    status, document = health((1, 1), min_free_bytes=1 << 62)()
    assert status == 503 and len(document["problems"]) == 1
    assert document["problems"][0].startswith("spool:") and "below the watermark" in document["problems"][0]


def test_write_locked_database_is_503(health, engine) -> None:
    raw = engine.raw_connection()  # another process holding the write lock, as a stuck job would
    try:
        raw.driver_connection.execute("BEGIN IMMEDIATE")
        status, document = health((1, 1))()
    finally:
        raw.driver_connection.execute("ROLLBACK")
        raw.close()
    assert status == 503 and document["problems"][0].startswith("database: database is locked")
    assert health((1, 1))()[0] == 200  # and healthy again once the lock is gone


def test_every_association_slot_taken_is_503(health) -> None:
    status, document = health((2, 2), slots=(32, 32))()
    assert status == 503 and document["associations"] == {"in_use": 32, "capacity": 32}
    assert document["problems"] == ["associations: all 32 slots in use; new callers are rejected (local limit)"]
    assert health((2, 2), slots=(31, 32))()[0] == 200
