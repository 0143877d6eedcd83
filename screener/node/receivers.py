"""Receive processes: the node's SCPs, each in its own process, sharing one port.

One Python process receiving is bound by its GIL, not by the disk: a pynetdicom association
runs two threads that take the GIL for every PDU, and with four PACS associations at once one
process spends as much time handing the GIL around as receiving (bench/receive_throughput.py).
So ``[node] receive_processes`` processes each run an SCP (screener.node.receive.start_scp)
bound with SO_REUSEPORT to the same address, and Linux spreads new connections across them.
They share nothing but the spool folder and the database, which already serialise what has to
be serial (atomic renames, one write transaction at a time). The service process itself
receives nothing: its workers' Python never competes with a receiver for a GIL.

A receive process points its temporary directory at ``<spool>/.incoming``, where pynetdicom
writes arriving datasets, so a finished one is renamed into the spool. It holds one end of a
socket pair from the parent and stops when that closes, which happens on kill -9 of the
parent too: a restarted node never finds last run's receivers answering on its port. One that
dies is started again by :meth:`ReceiverPool.check`, after a growing pause if it keeps dying.

SO_REUSEPORT would also let a second, unrelated node bind the same port and silently take half
the images, so :func:`claim_port` first binds the port plainly: if anything listens there, the
node refuses to start and names the key.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from typing import Any

from sqlalchemy.engine import make_url

from screener.logs import configure_logging
from screener.node import receive
from screener.node.spool import INCOMING
from screener.store.db import make_engine, session_factory
from screener.supervise import CONTEXT, RestartPolicy, spawn, stop_children

LOGGER = logging.getLogger(__name__)

# How long start-up waits for a port that the previous run's receivers are still letting go of
# (they stop within a second of the parent's death), and for a process to be listening.
PORT_WAIT_S = 10.0
CHILD_START_S = 60.0
# How often a receive process reports its open associations to the parent (for /health).
SLOTS_EVERY_S = 0.5


class PortInUse(RuntimeError):
    """Something other than this node listens on the configured address and port."""


def claim_port(address: str, port: int, wait_s: float = PORT_WAIT_S) -> None:
    """Return once ``address:port`` can be bound without SO_REUSEPORT, else raise PortInUse.

    A plain bind fails while any socket listens there, SO_REUSEPORT or not; SO_REUSEADDR lets
    it ignore connections of a previous run in TIME_WAIT, as the real bind does.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    deadline = time.monotonic() + wait_s
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
                return
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    raise
                if time.monotonic() > deadline:
                    raise PortInUse(f"node.port: {address}:{port} is already in use by another program "
                                    "(another screener serve?); stop it or choose another port") from error
        time.sleep(0.2)


def _child_main(settings: receive.ReceiveSettings, database_url: str, log_level: int,
                lifeline: Connection, in_use: Any, accepted: Any) -> None:
    """One receive process: an SCP until the parent closes the lifeline or sends SIGTERM.

    The lifeline is a socket pair, not a multiprocessing Event or Condition: those deadlock
    when the other side dies while waiting, and the parent may die at any moment.
    """
    # Ctrl-C in a terminal signals the whole process group; the parent decides when we stop.
    # (The parent blocked SIGINT around our start, so none arrived during the imports.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    configure_logging(log_level)  # the parent's log format, in this process
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())

    def watch_parent() -> None:
        try:
            lifeline.recv()  # the parent never sends: this returns only by raising EOFError
        except (EOFError, OSError):
            pass
        stopping.set()

    threading.Thread(target=watch_parent, name="lifeline", daemon=True).start()
    incoming = settings.spool_root / INCOMING
    incoming.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(incoming)  # this process only receives: where arriving datasets go
    engine = make_engine(database_url)
    sessions = session_factory(engine)
    servers = [receive.start_scp(settings, sessions, reuse_port=True)] if settings.plain else []
    if settings.tls_port:
        servers.append(receive.start_scp(settings, sessions, reuse_port=True, tls=True))
    try:
        # the pool's port: the plain one, or the TLS one where there is no plain listener
        lifeline.send(receive.bound_port(servers[0]))
        # The parent's health endpoint reads how many association slots this process uses.
        while not stopping.wait(SLOTS_EVERY_S):
            in_use.value = sum(receive.associations_in_use(s) for s in servers)
            accepted.value = receive.accepted_associations()
    except OSError:
        pass  # the parent is gone already
    finally:
        for server in servers:
            receive.stop(server)
        engine.dispose()


@dataclasses.dataclass(frozen=True)
class _Child:
    process: SpawnProcess
    lifeline: Connection  # our end: the child sends its port on it; closing it stops the child
    started: float  # time.monotonic() at start
    in_use: Any  # multiprocessing.Value: the child's associations open now
    accepted: Any  # multiprocessing.Value: associations the child accepted since it started


class ReceiverPool:
    """``processes`` receive processes on one port, started, watched and stopped together."""

    def __init__(self, settings: receive.ReceiveSettings, database_url: str, processes: int,
                 log_level: int = logging.INFO) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"receive_processes: must be an integer >= 1, got {processes!r}")
        url = make_url(database_url)
        if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
            raise ValueError("database_url: an in-memory SQLite database cannot be shared with the "
                             "receive processes; use a file (sqlite:///path/screener.db)")
        self.settings = settings
        self.database_url = database_url
        self.processes = processes
        self.log_level = log_level
        self._children: list[_Child] = []
        self._restarts = RestartPolicy(processes, "receive process")
        self._lock = threading.Lock()  # check() runs in the scheduler's thread, stop() in ours
        self._stopping = False
        self._accepted_before = 0  # counted by processes that have since been replaced
        self.port: int | None = None

    def start(self) -> int:
        """Claim the port, start the first process, then the others on its port; returns it."""
        s = self.settings
        if s.plain:
            claim_port(s.bind_address, s.port)
        if s.tls_port:
            claim_port(s.bind_address, s.tls_port)
        try:
            first = self._spawn(0, s.port if s.plain else s.tls_port)
            self._children = [first]
            # Port 0 is resolved by the first process's bind; the others join that port.
            self.port = self._wait_listening(first)
            self._children += [self._spawn(n, self.port) for n in range(1, self.processes)]
            for child in self._children[1:]:
                self._wait_listening(child)
        except BaseException:
            self.stop()
            raise
        return self.port

    def _spawn(self, n: int, port: int) -> _Child:
        ours, theirs = CONTEXT.Pipe(duplex=True)
        # the port resolved by the first process: the plain one, or the TLS one without it
        settings = dataclasses.replace(self.settings, **{"port" if self.settings.plain else "tls_port": port})
        in_use = CONTEXT.Value("i", 0, lock=False)  # one writer (the child), one int
        accepted = CONTEXT.Value("q", 0, lock=False)
        process = spawn(_child_main, (settings, self.database_url, self.log_level, theirs, in_use, accepted),
                        f"receiver-{n}")
        theirs.close()  # only the child may hold it, or the child would never see our end close
        return _Child(process, ours, time.monotonic(), in_use, accepted)

    @staticmethod
    def _wait_listening(child: _Child) -> int:
        deadline = time.monotonic() + CHILD_START_S
        while not child.lifeline.poll(0.2):
            if not child.process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"receive process {child.process.name} did not start "
                                   f"(exit code {child.process.exitcode}); see its log lines above")
        try:
            return int(child.lifeline.recv())
        except EOFError:
            raise RuntimeError(f"receive process {child.process.name} exited while starting "
                               f"(exit code {child.process.exitcode}); see its log lines above") from None

    def pids(self) -> list[int]:
        """The receive processes' ids."""
        return [child.process.pid for child in self._children if child.process.pid is not None]

    def running(self) -> tuple[int, int]:
        """(configured, running) receive processes."""
        return self.processes, sum(child.process.is_alive() for child in self._children)

    def slots(self) -> tuple[int, int]:
        """(association slots in use, slots in all) across the running receive processes, as
        last reported (every SLOTS_EVERY_S)."""
        with self._lock:
            children = [c for c in self._children if c.process.is_alive()]
        return sum(c.in_use.value for c in children), len(children) * self.settings.max_associations

    def accepted(self) -> int:
        """Associations accepted by the receive processes since the pool started (a process
        that died keeps its count here)."""
        with self._lock:
            return self._accepted_before + sum(c.accepted.value for c in self._children)

    def check(self) -> int:
        """Start again any process that died (after its pause); returns how many were started."""
        restarted = 0
        with self._lock:
            if self._stopping or self.port is None:
                return 0
            now = time.monotonic()
            for i, child in enumerate(self._children):
                if child.process.is_alive() or not self._restarts.due(i, child.process, child.started, now):
                    continue
                child.lifeline.close()
                self._accepted_before += child.accepted.value
                self._children[i] = self._spawn(i, self.port)
                restarted += 1
        return restarted

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every receive process: each finishes or aborts its associations and exits."""
        with self._lock:
            self._stopping = True
            children, self._children = self._children, []
        stop_children(children, timeout_s, "receive process")
