"""Several receive processes on one port: one Python SCP is bound by its GIL, not by the disk.

A pynetdicom association runs two threads that take the GIL for every PDU; with four PACS
associations at once, one process spends as much time handing the GIL around as receiving
(bench/receive_throughput.py). So ``[node] receive_processes`` SCPs, each in its own process,
listen on the same address with SO_REUSEPORT and Linux spreads new connections across them.
They share nothing but the spool folder and the database, which already serialise what has to
be serial (atomic renames, one write transaction at a time).

The parent runs one SCP itself and spawns the others. Each child holds the read end of a pipe
from the parent and stops when it closes: that happens on kill -9 of the parent too, so a
restarted node never finds last run's receivers answering on its port. A child that dies is
logged and started again by :meth:`ReceiverPool.check`.

SO_REUSEPORT would also let a second, unrelated node bind the same port and silently take half
the images, so :func:`claim_port` first binds the port plainly: if anything listens there, the
node refuses to start and names the key.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import multiprocessing
import signal
import socket
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from typing import Any

from screener.node import receive
from screener.store.db import make_engine, session_factory

LOGGER = logging.getLogger(__name__)

# How long start-up waits for a port that the previous run's receivers are still letting go of
# (they stop within a second of the parent's death), and for a child to be listening.
PORT_WAIT_S = 10.0
CHILD_START_S = 60.0


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
                lifeline: Connection) -> None:
    """One receive process: an SCP until the parent closes the lifeline or sends SIGTERM.

    The lifeline is a socket pair, not a multiprocessing Event or Condition: those deadlock
    when the other side dies while waiting, and the parent may die at any moment.
    """
    from screener.service import configure_logging  # the parent's log format, in this process

    configure_logging(log_level)
    # Ctrl-C in a terminal signals the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())

    def watch_parent() -> None:
        try:
            lifeline.recv()  # the parent never sends: this returns only by raising EOFError
        except (EOFError, OSError):
            pass
        stopping.set()

    threading.Thread(target=watch_parent, name="lifeline", daemon=True).start()
    engine = make_engine(database_url)
    server = receive.start_scp(settings, session_factory(engine), reuse_port=True)
    try:
        lifeline.send("listening")
        stopping.wait()
    except OSError:
        pass  # the parent is gone already
    finally:
        receive.stop(server)
        engine.dispose()


@dataclasses.dataclass(frozen=True)
class _Child:
    process: SpawnProcess
    lifeline: Connection  # our end: the child says "listening" on it; closing it stops the child


class ReceiverPool:
    """``processes`` SCPs on one port: this process's own plus ``processes - 1`` children."""

    def __init__(self, settings: receive.ReceiveSettings, database_url: str, processes: int,
                 log_level: int = logging.INFO) -> None:
        if not isinstance(processes, int) or processes < 1:
            raise ValueError(f"receive_processes: must be an integer >= 1, got {processes!r}")
        self.settings = settings
        self.database_url = database_url
        self.processes = processes
        self.log_level = log_level
        self._context = multiprocessing.get_context("spawn")  # no fork of a threaded process
        self._children: list[_Child] = []
        self._server: Any = None
        self._engine: Any = None
        self.port: int | None = None

    def start(self) -> int:
        """Claim the port, start this process's SCP, then the children; returns the port."""
        s = self.settings
        claim_port(s.bind_address, s.port)
        self._engine = make_engine(self.database_url)
        self._server = receive.start_scp(s, session_factory(self._engine), reuse_port=self.processes > 1)
        self.port = receive.bound_port(self._server)
        try:
            self._children = [self._spawn(n) for n in range(1, self.processes)]
            for child in self._children:
                self._wait_ready(child)
        except BaseException:
            self.stop()
            raise
        return self.port

    def _spawn(self, n: int) -> _Child:
        ours, theirs = self._context.Pipe(duplex=True)
        # port 0 was resolved by our own bind: the children must join that port, not pick one.
        settings = dataclasses.replace(self.settings, port=self.port)
        process = self._context.Process(target=_child_main, name=f"receiver-{n}", daemon=True,
                                        args=(settings, self.database_url, self.log_level, theirs))
        process.start()
        theirs.close()  # only the child may hold it, or the child would never see our end close
        return _Child(process, ours)

    @staticmethod
    def _wait_ready(child: _Child) -> None:
        deadline = time.monotonic() + CHILD_START_S
        while not child.lifeline.poll(0.2):
            if not child.process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"receive process {child.process.name} did not start "
                                   f"(exit code {child.process.exitcode}); see its log lines above")
        try:
            child.lifeline.recv()
        except EOFError:
            raise RuntimeError(f"receive process {child.process.name} exited while starting "
                               f"(exit code {child.process.exitcode}); see its log lines above") from None

    def pids(self) -> list[int]:
        """The children's process ids (this process's own SCP not included)."""
        return [child.process.pid for child in self._children if child.process.pid is not None]

    def running(self) -> tuple[int, int]:
        """(configured, running) receive processes, this process's own SCP included."""
        alive = sum(child.process.is_alive() for child in self._children)
        return self.processes, alive + (self._server is not None)

    def check(self) -> int:
        """Start again any child that died; returns how many were restarted."""
        restarted = 0
        for i, child in enumerate(self._children):
            if child.process.is_alive():
                continue
            LOGGER.error("receive process %s exited with code %s; starting it again",
                         child.process.name, child.process.exitcode)
            child.lifeline.close()
            self._children[i] = self._spawn(i + 1)
            restarted += 1
        return restarted

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every SCP: children first (they finish or abort their associations), then ours."""
        for child in self._children:
            child.lifeline.close()
        deadline = time.monotonic() + timeout_s
        for process in (child.process for child in self._children):
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                LOGGER.warning("receive process %s did not stop in %.0f s; terminating", process.name, timeout_s)
                process.terminate()
                process.join(5)
        self._children = []
        if self._server is not None:
            receive.stop(self._server)
            self._server = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
