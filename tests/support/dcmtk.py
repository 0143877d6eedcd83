"""Locate and run real DCMTK tools for network tests.

pyenv puts pynetdicom's own ``storescu``/``echoscu`` apps on PATH ahead of DCMTK's, so a tool
is taken only if it reports itself as DCMTK. A missing tool fails the test (it is a CI
dependency, installed by .ci/run), it does not skip it.
"""

from __future__ import annotations

import os
import subprocess
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
