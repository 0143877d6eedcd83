"""What the receive and worker pools share: starting a child process and deciding when one that
died is started again.

Children are spawned, not forked (the service is threaded), with SIGINT blocked around the
start so a Ctrl-C in the terminal reaches only the service, which then stops them in order. A
child that dies within ``STABLE_S`` of its start is restarted after 5 s, 10 s, 20 s, ... up to
``MAX_BACKOFF_S``: a database or disk that is down would otherwise be retried in a tight loop.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from typing import Any, Protocol

__all__ = ["RestartPolicy", "default_processes", "spawn", "stop_children"]

LOGGER = logging.getLogger(__name__)

STABLE_S = 60.0
MAX_BACKOFF_S = 300.0

CONTEXT = multiprocessing.get_context("spawn")  # no fork of a threaded process


def spawn(target: Callable[..., None], args: tuple[Any, ...], name: str) -> SpawnProcess:
    """Start ``target(*args)`` in a new daemon process that inherits no pending Ctrl-C."""
    process = CONTEXT.Process(target=target, name=name, daemon=True, args=args)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return process


class Child(Protocol):
    lifeline: Connection
    process: SpawnProcess


def stop_children(children: Sequence[Child], timeout_s: float, kind: str) -> None:
    """Close every child's lifeline (its cue to finish and exit), wait for all of them within one
    deadline of ``timeout_s``, and terminate those still running then."""
    for child in children:
        child.lifeline.close()
    deadline = time.monotonic() + timeout_s
    for process in (child.process for child in children):
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            LOGGER.warning("%s %s did not stop in %.0f s; terminating", kind, process.name, timeout_s)
            process.terminate()
            process.join(5)


def default_processes() -> int:
    """One worker process per CPU core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class RestartPolicy:
    """Per slot of a pool: when a dead child may be started again."""

    def __init__(self, slots: int, kind: str) -> None:
        self.kind = kind
        self._failures = [0] * slots  # consecutive early deaths per slot
        self._not_before = [0.0] * slots  # monotonic time before which a slot is not restarted

    def due(self, slot: int, process: SpawnProcess, started: float, now: float | None = None) -> bool:
        """True when the dead ``process`` of ``slot`` (started at monotonic ``started``) may be
        replaced now; the first call after its death logs it and sets the pause."""
        now = time.monotonic() if now is None else now
        if self._not_before[slot] == 0.0:
            early = now - started < STABLE_S
            self._failures[slot] = self._failures[slot] + 1 if early else 1
            failures = self._failures[slot]
            pause = 0.0 if failures == 1 else min(MAX_BACKOFF_S, 5.0 * 2 ** (failures - 2))
            self._not_before[slot] = now + pause
            LOGGER.error("%s %s exited with code %s; starting it again in %.0f s",
                         self.kind, process.name, process.exitcode, pause)
        if now < self._not_before[slot]:
            return False
        self._not_before[slot] = 0.0
        return True
