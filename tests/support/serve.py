"""`screener serve` as a real subprocess on loopback, configured for one PACS (DCMTK storescp or
Orthanc); C-ECHO and C-STORE to it with DCMTK echoscu and storescu."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.common import ROOT, free_port, wait_for
from tests.support.dcmtk import run_tool

CALLING = "MODALITY"


class Node:
    def __init__(self, tmp_path: Path, pacs_port: int, *, calling: str = CALLING, pacs_ae: str = "PACS") -> None:
        self.port = free_port()
        self.health_port = free_port()
        self.calling = calling
        self.data = tmp_path / "data"
        self.config = tmp_path / "screener.toml"
        self.config.write_text(f"""
[model]
device = "cpu"
[node]
port = {self.port}
health_port = {self.health_port}
allowed_calling_aes = ["{calling}"]
min_free_mb = 0
[storage]
data_dir = "data"
[worker]
workers = 1  # one worker process: each loads torch and the model (tests/test_workers.py runs two)
lease_seconds = 5
poll_seconds = 0.2
[dispatch]
interval_s = 0.5
backoff_base_s = 1.0
backoff_cap_s = 2.0
[[destinations]]
name = "pacs"
ae_title = "{pacs_ae}"
host = "127.0.0.1"
port = {pacs_port}
""")
        self.log_path = tmp_path / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
        self.proc = subprocess.Popen([sys.executable, "-m", "screener.cli", "serve", "--config", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        wait_for("the node to answer C-ECHO", self._echo, 60, 0.5)

    def _echo(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
        return run_tool("echoscu", "-aet", self.calling, "-aec", "CXRBMD", "127.0.0.1", self.port).returncode == 0

    def send(self, *paths: Path, calling: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_tool("storescu", "-aet", calling or self.calling, "-aec", "CXRBMD", "127.0.0.1", self.port, *paths)

    def query(self, sql: str) -> list[tuple]:
        db = sqlite3.connect(f"file:{self.data / 'screener.db'}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
