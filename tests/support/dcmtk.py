"""Locate and run real DCMTK tools for network tests.

pyenv puts pynetdicom's own ``storescu``/``echoscu`` apps on PATH ahead of DCMTK's, so a tool
is taken only if it reports itself as DCMTK. A missing tool fails the test (it is a CI
dependency, installed by .ci/run), it does not skip it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import pytest

TIMEOUT_S = 30


@cache
def dcmtk_tool(name: str) -> str:
    for directory in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]:
        candidate = Path(directory) / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        try:
            version = subprocess.run([str(candidate), "--version"], capture_output=True, text=True,
                                     timeout=TIMEOUT_S).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "$dcmtk:" in version:
            return str(candidate)
    pytest.fail(f"DCMTK {name} not found (pynetdicom's app of the same name does not count): "
                "run .ci/run, which installs the dcmtk package")


def run_tool(name: str, *args: object) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool, bounded in time; stdout and stderr merged in ``.stdout``."""
    return subprocess.run([dcmtk_tool(name), *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)


@contextmanager
def storescp(tmp_path: Path, ae_title: str = "PACS") -> Iterator[tuple[int, Path]]:
    """DCMTK storescp as the PACS on a free loopback port, accepting every transfer syntax:
    (port, the folder it writes to)."""
    from tests.support.common import free_port, wait_for

    port, out = free_port(), tmp_path / "pacs"
    out.mkdir()
    log = (tmp_path / "storescp.log").open("wb")
    proc = subprocess.Popen([dcmtk_tool("storescp"), "--aetitle", ae_title, "--output-directory", str(out), "+xa",
                             str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for("storescp", lambda: run_tool("echoscu", "-aec", ae_title, "127.0.0.1", port).returncode == 0, 15)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
