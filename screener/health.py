"""A loopback HTTP health endpoint for monitoring systems (``[node] health_port``; 0 = off).

``GET /health`` answers 200 with JSON while the node can take images: the database answers and
every receive process runs. It carries what ``screener status`` prints (jobs by state,
deliveries by destination and state, the last errors) and the receive processes running. It
answers 503 with the same document and a ``problems`` list otherwise, so a probe that only
reads the status code still sees an outage. Other paths get 404, other methods 405. There is
no authentication: it binds to loopback by default, and says nothing a log line does not.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from screener.audit import status_report

LOGGER = logging.getLogger(__name__)


def health_document(sessions: sessionmaker[Session],
                    receive_processes: Callable[[], tuple[int, int]]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, document). ``receive_processes()`` returns (configured, running)."""
    problems: list[str] = []
    document: dict[str, Any] = {}
    try:
        with sessions() as session:
            document.update(status_report(session))
    except SQLAlchemyError as error:
        problems.append(f"database: {str(getattr(error, 'orig', None) or error)[:200]}")
    configured, running = receive_processes()
    document["receive_processes"] = {"configured": configured, "running": running}
    if running < configured:
        problems.append(f"receive processes: {running} of {configured} running")
    document["status"] = "unavailable" if problems else "ok"
    document["problems"] = problems
    return (HTTPStatus.SERVICE_UNAVAILABLE if problems else HTTPStatus.OK), document


class _HealthServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung probe connection must not hold up shutdown


class _HealthServer6(_HealthServer):
    address_family = socket.AF_INET6


def start_health_server(address: str, port: int, sessions: sessionmaker[Session],
                        receive_processes: Callable[[], tuple[int, int]]) -> ThreadingHTTPServer:
    """Serve ``GET /health`` in a background thread; ``shutdown()`` and ``server_close()`` it."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "screener-health"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.split("?", 1)[0] != "/health":
                self._send(HTTPStatus.NOT_FOUND, {"error": "not found; GET /health"})
                return
            self._send(*health_document(sessions, receive_processes))

        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def _refuse(self) -> None:
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "only GET /health"})

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

        def _send(self, status: int, document: dict[str, Any]) -> None:
            body = json.dumps(document, indent=2).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
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
