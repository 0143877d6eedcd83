"""Receive processes sharing one port: real child processes, real DCMTK storescu and echoscu."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from screener.node.receive import ReceiveSettings
from screener.node.receivers import PortInUse, ReceiverPool, claim_port
from screener.node.spool import INCOMING
from screener.store.models import Instance, Job
from tests.support.common import free_port, process_running, rg1_file, wait_for
from tests.support.dcmtk import run_tool

CALLING = "PACS"


@pytest.fixture
def settings(tmp_path: Path) -> ReceiveSettings:
    return ReceiveSettings(spool_root=tmp_path / "spool", model_id="demo-1.0", patient_salt=b"salt", port=0,
                           allowed_calling_aes=(CALLING,), min_free_bytes=0)


@pytest.fixture
def pool(settings: ReceiveSettings, engine, tmp_path: Path) -> Iterator[ReceiverPool]:
    pool = ReceiverPool(settings, str(engine.url), processes=2)
    pool.start()
    yield pool
    pool.stop()


def copies(folder: Path, n: int) -> list[Path]:
    folder.mkdir(exist_ok=True)
    ds = pydicom.dcmread(rg1_file())
    paths = []
    for i in range(n):
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID.rsplit('.', 1)[0]}.{9000 + i}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        paths.append(folder / f"{i}.dcm")
        ds.save_as(paths[-1])
    return paths


def count(factory: sessionmaker[Session], model: type) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


@pytest.mark.dcmtk
def test_parallel_associations_all_land_once(pool: ReceiverPool, factory, tmp_path: Path) -> None:
    files = copies(tmp_path / "sent", 8)
    assert pool.port and len(pool.pids()) == 2 and all(map(process_running, pool.pids()))
    assert os.getpid() not in pool.pids() and pool.running() == (2, 2)

    def send(chunk: list[Path]) -> str:
        result = run_tool("storescu", "-aet", CALLING, "-aec", "CXRBMD", "127.0.0.1", pool.port, *chunk)
        assert result.returncode == 0, result.stdout
        return result.stdout

    with ThreadPoolExecutor(4) as executor:
        list(executor.map(send, [files[i::4] for i in range(4)]))
    assert count(factory, Instance) == 8 and count(factory, Job) == 8
    assert len(list((tmp_path / "spool").rglob("*.dcm"))) == 8
    assert list((tmp_path / "spool" / INCOMING).iterdir()) == []  # each one arrived there, then moved


@pytest.mark.dcmtk
def test_one_process_is_enough_and_this_process_receives_nothing(settings, engine, factory) -> None:
    pool = ReceiverPool(settings, str(engine.url), processes=1)
    try:
        port = pool.start()
        assert len(pool.pids()) == 1
        result = run_tool("storescu", "-aet", CALLING, "-aec", "CXRBMD", "127.0.0.1", port, rg1_file())
        assert result.returncode == 0, result.stdout
        assert count(factory, Job) == 1
    finally:
        pool.stop()
    assert tempfile.gettempdir() != str(settings.spool_root / INCOMING)  # only the child's was moved


@pytest.mark.dcmtk
def test_dead_child_is_started_again(pool: ReceiverPool) -> None:
    pid, other = pool.pids()
    os.kill(pid, signal.SIGKILL)
    # What the service's scheduler does every few seconds: check until the death is seen.
    wait_for("the pool to start the process again", lambda: pool.check() == 1, 10, 0.05)
    new_pid, same = pool.pids()
    assert new_pid != pid and same == other and pool.check() == 0
    echo = run_tool("echoscu", "-aet", CALLING, "-aec", "CXRBMD", "127.0.0.1", pool.port)
    assert echo.returncode == 0, echo.stdout


def test_a_process_that_keeps_dying_is_restarted_after_growing_pauses(pool: ReceiverPool) -> None:
    pauses = []
    for _ in range(3):
        pid = pool.pids()[0]
        os.kill(pid, signal.SIGKILL)
        wait_for("the death to be seen", lambda: pool.running()[1] == 1, 10, 0.05)
        started = pool.check()
        pauses.append(pool._restarts._not_before[0] and round(pool._restarts._not_before[0] - time.monotonic()))
        if not started:
            pool._restarts._not_before[0] = time.monotonic()  # skip the pause in this test
            assert pool.check() == 1
    assert pauses[0] == 0 and 4 <= pauses[1] <= 5 and 9 <= pauses[2] <= 10


def test_stop_ends_the_processes_and_frees_the_port(settings: ReceiveSettings, engine) -> None:
    port = free_port()
    pool = ReceiverPool(dataclasses.replace(settings, port=port), str(engine.url), processes=3)
    assert pool.start() == port
    pids = pool.pids()
    assert len(pids) == 3
    pool.stop()
    assert not any(map(process_running, pids))
    assert pool.check() == 0  # a check after stop starts nothing again
    claim_port("127.0.0.1", port, wait_s=0)  # nothing listens any more


def test_port_held_by_another_program_is_refused_by_key(settings: ReceiveSettings, engine) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(PortInUse, match=rf"node.port: 127.0.0.1:{port} is already in use"):
            claim_port("127.0.0.1", port, wait_s=0.3)
        pool = ReceiverPool(dataclasses.replace(settings, port=port), str(engine.url), processes=2)
        with pytest.raises(PortInUse):
            pool.start()  # SO_REUSEPORT alone would have let it share the port silently


@pytest.mark.parametrize("processes", [0, -1, 1.5, True])
def test_processes_must_be_a_positive_integer(settings: ReceiveSettings, processes: object) -> None:
    with pytest.raises(ValueError, match="receive_processes"):
        ReceiverPool(settings, "sqlite:///x.db", processes)  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_database_is_refused(settings: ReceiveSettings, url: str) -> None:
    with pytest.raises(ValueError, match="in-memory SQLite"):
        ReceiverPool(settings, url, 1)
