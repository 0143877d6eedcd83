"""Worker processes (screener.workers): several claim from one queue without doing a job twice,
one killed with SIGKILL is replaced and its jobs are screened after their lease expires, and
the stage times they leave in the audit trail reach /metrics."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest

from screener.store.models import Event
from screener.workers import StageTail
from tests.support.common import rg1_file, wait_for
from tests.support.dcmtk import storescp
from tests.support.films import renumbered_copies
from tests.support.serve import Node

UID_ROOT = "1.2.826.0.1.3680043.10.1234.9"  # the copies' SOP Instance UIDs: UID_ROOT.<i>


def test_stage_tail_observes_each_finished_job_once(factory) -> None:
    now = datetime.now(UTC)
    with factory() as session:
        session.add(Event(time=now, kind="done", outcome="ok", job_id=1, model_id="m", result_json={"seconds": {"total": 9.0}}))
        session.commit()
    seen: list[tuple[dict, str | None]] = []
    tail = StageTail(factory, lambda seconds, model: seen.append((dict(seconds), model)))  # history is not replayed
    with factory() as session:
        session.add_all([
            Event(time=now, kind="received", outcome="ok", job_id=2),
            Event(time=now, kind="done", outcome="ok", job_id=2, model_id="m",
                  result_json={"seconds": {"decode": 0.5, "total": 1.5}}),
            Event(time=now, kind="failed", outcome="error", job_id=3, model_id="m", result_json=None),
            Event(time=now, kind="ineligible", outcome="ok", job_id=4, model_id="m", result_json={"seconds": {"total": 0.1}}),
        ])
        session.commit()
    assert tail.run() == 3
    assert seen == [({"decode": 0.5, "total": 1.5}, "m"), ({"total": 0.1}, "m")]
    assert tail.run() == 0 and len(seen) == 2


def _children_named(pid: int, name: str) -> list[int]:
    """Child processes of ``pid`` whose command line mentions ``name`` (spawned ones carry
    multiprocessing's spawn_main; the workers are told apart by the pool's arguments)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            if name in (stat.parent / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(stat.parent.name))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return found


@pytest.mark.dcmtk
def test_two_worker_processes_share_the_queue_and_one_killed_is_replaced(tmp_path: Path) -> None:
    films = renumbered_copies([rg1_file()], tmp_path, 6, UID_ROOT)
    with storescp(tmp_path) as (port, _):
        node = Node(tmp_path, port)
        # Batches of 2: a worker that polled after all six had arrived could otherwise claim
        # them in one batch of 8 (right for the node, but the test wants both processes seen).
        node.config.write_text(node.config.read_text().replace("workers = 1 ", "workers = 2 ")
                               .replace('device = "cpu"\n', 'device = "cpu"\nbatch_size = 2\n', 1))
        assert "workers = 2 " in node.config.read_text() and "batch_size = 2" in node.config.read_text()
        node.start()
        try:
            health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{node.health_port}/health", timeout=10))
            assert health["worker_processes"] == {"configured": 2, "running": 2}, health
            assert node.send(*films).returncode == 0
            wait_for("six jobs screened", lambda: node.query(
                "select count(*) from jobs where state = 'done'") == [(6,)], 240, 0.5)
            owners = {row[0].split(" by ")[1] for row in node.query("select message from events where kind = 'claimed'")}
            assert len({owner.rsplit(":", 2)[1] for owner in owners}) == 2, owners  # two pids claimed
            assert node.query("select count(*) from events where kind = 'claimed'") == [(6,)]  # none twice

            assert node.proc is not None
            workers = _children_named(node.proc.pid, "spawn_main")
            assert len(workers) >= 4, workers  # two receive and two worker processes
            pids = {int(owner.rsplit(":", 2)[1]) for owner in owners}
            victim = sorted(pids)[0]
            os.kill(victim, signal.SIGKILL)
            wait_for("a replacement worker process", lambda: (
                (h := json.load(urllib.request.urlopen(f"http://127.0.0.1:{node.health_port}/health", timeout=10)))
                ["worker_processes"]["running"] == 2 and victim not in _children_named(node.proc.pid, "spawn_main")
                and h), 60, 0.5)
            assert node.send(*renumbered_copies([rg1_file()], tmp_path, 2, UID_ROOT, first=6)).returncode == 0
            wait_for("the new films screened", lambda: node.query(
                "select count(*) from jobs where state = 'done'") == [(8,)], 240, 0.5)
            # the stage times of the worker processes' jobs reach the service's /metrics
            # (read from the audit trail every 5 s)
            def total_count() -> float:
                text = urllib.request.urlopen(f"http://127.0.0.1:{node.health_port}/metrics", timeout=10).read().decode()
                return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                           if line.startswith("screener_stage_seconds_count{") and 'stage="total"' in line)

            wait_for("the stage times in /metrics", lambda: total_count() == 8, 30, 1.0)  # each job once
        finally:
            node.stop()
