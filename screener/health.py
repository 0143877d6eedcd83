"""A loopback HTTP health endpoint for monitoring systems (``[node] health_port``; 0 = off).

``GET /health`` answers 200 with JSON while the node can take images: the database answers and
takes a write lock within 2 s, every receive process runs, an association slot is free and
the spool has more free space than its watermark. It carries what ``screener status`` prints
(jobs by state, deliveries by destination and state, the last errors), the receive processes,
association slots and spool space. It answers 503 with the same document and a ``problems``
list naming each fault otherwise, so a probe that only reads the status code still sees an
outage. The service starts it before the DICOM port opens: it answers (503, starting) as soon
as the port does. ``GET /metrics`` serves the Prometheus metrics (screener/metrics.py). Other paths
get 404, other methods 405. There is
no authentication: it binds to loopback by default, and says nothing a log line does not.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from screener.node.spool import free_bytes
from screener.safe_text import scrub
from screener.store.db import session_factory, write_probe
from screener.store.status import status_report

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthChecks:
    """What the endpoint looks at. ``receive_processes()`` and ``worker_processes()`` return
    (configured, running); ``slots()`` (association slots in use, slots in all)."""

    engine: Engine
    receive_processes: Callable[[], tuple[int, int]]
    slots: Callable[[], tuple[int, int]]
    spool_root: Path
    min_free_bytes: int
    write_timeout_s: float = 2.0
    metrics: CollectorRegistry | None = None  # GET /metrics, when given
    worker_processes: Callable[[], tuple[int, int]] | None = None


def health_document(checks: HealthChecks) -> tuple[int, dict[str, Any]]:
    """(HTTP status, document): 503 with a reason in ``problems`` for each fault found."""
    problems: list[str] = []
    document: dict[str, Any] = {}
    try:
        with session_factory(checks.engine)() as session:
            document.update(status_report(session))
        write_probe(checks.engine, checks.write_timeout_s)
    except SQLAlchemyError as error:
        problems.append(f"database: {scrub(getattr(error, 'orig', None) or error, 200)}")
    configured, running = checks.receive_processes()
    document["receive_processes"] = {"configured": configured, "running": running}
    if running < configured:
        problems.append(f"receive processes: {running} of {configured} running")
    if checks.worker_processes is not None:
        configured, running = checks.worker_processes()
        document["worker_processes"] = {"configured": configured, "running": running}
        if running < configured:
            problems.append(f"worker processes: {running} of {configured} running (images queue but are not "
                            "screened until one is back)")
    in_use, capacity = checks.slots()
    document["associations"] = {"in_use": in_use, "capacity": capacity}
    if capacity and in_use >= capacity:
        problems.append(f"associations: all {capacity} slots in use; new callers are rejected (local limit)")
    try:
        free = free_bytes(checks.spool_root)
    except OSError as error:
        problems.append(f"spool: {checks.spool_root} cannot be read ({error.strerror})")
    else:
        document["spool"] = {"free_bytes": free, "min_free_bytes": checks.min_free_bytes}
        if free < checks.min_free_bytes:
            problems.append(f"spool: {free} bytes free, below the watermark of {checks.min_free_bytes}; "
                            "C-STOREs are answered 0xA700")
    document["status"] = "unavailable" if problems else "ok"
    document["problems"] = problems
    return (HTTPStatus.SERVICE_UNAVAILABLE if problems else HTTPStatus.OK), document


class _HealthServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung probe connection must not hold up shutdown


class _HealthServer6(_HealthServer):
    address_family = socket.AF_INET6


def start_health_server(address: str, port: int, checks: HealthChecks) -> ThreadingHTTPServer:
    """Serve ``GET /health`` in a background thread; ``shutdown()`` and ``server_close()`` it."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "screener-health"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics" and checks.metrics is not None:
                self._write(HTTPStatus.OK, generate_latest(checks.metrics), CONTENT_TYPE_LATEST)
                return
            if path != "/health":
                self._send(HTTPStatus.NOT_FOUND, {"error": "not found; GET /health or /metrics"})
                return
            self._send(*health_document(checks))

        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def _refuse(self) -> None:
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "only GET /health"})

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

        def _send(self, status: int, document: dict[str, Any]) -> None:
            self._write(status, json.dumps(document, indent=2).encode(), "application/json")

        def _write(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base signature)
            LOGGER.debug("health %s: " + format, self.client_address[0], *args)

    server = (_HealthServer6 if ":" in address else _HealthServer)((address, port), Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
