"""A throwaway PostgreSQL server for tests of the multi-node path (ARCHITECTURE.md: "tests for
that path use a real PostgreSQL server, not a mock").

The server binaries come from the Debian ``postgresql`` package (/usr/lib/postgresql/<v>/bin).
A missing server fails the test (it is a CI dependency, installed by .ci/run), it does not skip
it. initdb refuses to run as root, so as root the server runs as the ``postgres`` OS user, with
its data and socket directories owned by that user. Every wait is bounded.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

TIMEOUT_S = 60
DATABASE = "screener"


def pg_bin(name: str) -> str:
    """Path of a PostgreSQL server program, newest major version first."""
    def major(path: Path) -> tuple[int, str]:
        version = path.parent.parent.name
        return (int(version) if version.isdigit() else -1, version)

    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=major, reverse=True)
    found = [str(c) for c in candidates if os.access(c, os.X_OK)]
    if not found:
        on_path = shutil.which(name)
        if on_path:
            return on_path
        pytest.fail(f"PostgreSQL {name} not found under /usr/lib/postgresql/*/bin: run .ci/run, "
                    "which installs the postgresql package")
    return found[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--", *argv]
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in argv)]


def _run(argv: list[str], what: str) -> str:
    try:
        done = subprocess.run(_as_server_user(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{what}: no answer within {TIMEOUT_S} s: {exc.output}")
    if done.returncode != 0:
        pytest.fail(f"{what} failed (exit {done.returncode}):\n{done.stdout}")
    return done.stdout


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a fresh database ``screener`` on a private server, for the whole test session."""
    initdb, pg_ctl, psql = pg_bin("initdb"), pg_bin("pg_ctl"), pg_bin("psql")
    # Not pytest's tmp_path: its parents are private to the current user, and as root the
    # server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="screener-pg-"))
    data, sockets, log = root / "data", root / "sock", root / "server.log"
    data.mkdir()
    sockets.mkdir()
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root, and there is no postgres OS user to run the server as: "
                        "run .ci/run, which installs the postgresql package")
        for path in (root, data, sockets):
            os.chown(path, user.pw_uid, user.pw_gid)
    port = _free_port()
    started = False
    try:
        _run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
              "--no-sync"], "initdb")
        # fsync off: a throwaway server; the node's own durability is tested on SQLite.
        options = f"-k {sockets} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off"
        _run([pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", str(TIMEOUT_S),
              "start"], "pg_ctl start")
        started = True
        _run([psql, "-h", str(sockets), "-p", str(port), "-U", "postgres", "-d", "postgres",
              "-v", "ON_ERROR_STOP=1", "-c", f"CREATE DATABASE {DATABASE}"], "CREATE DATABASE")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{DATABASE}"
    finally:
        if started:
            subprocess.run(_as_server_user([pg_ctl, "-D", str(data), "-m", "immediate", "-w",
                                            "-t", str(TIMEOUT_S), "stop"]),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=TIMEOUT_S + 10)
        shutil.rmtree(root, ignore_errors=True)
