"""Shared fixtures. Nothing here needs ../shared: real DICOM comes from pydicom-data.

The helpers live in tests/support/ (test modules import from there, never from one another);
the fixtures pytest must find are defined or imported here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.common import synthetic_contours
from tests.support.pg import postgres_url

__all__ = ["postgres_url"]  # the fixture, for every test module

torch.set_num_threads(min(2, os.cpu_count() or 1))

# A fixture that needs an external tool, and the markers a test using it (directly or through
# another fixture) must carry, so that `-m "not <tool>"` leaves out every test that needs it.
# Tests that call the tools themselves are marked by hand (see pyproject.toml's markers).
FIXTURE_MARKERS: dict[str, tuple[str, ...]] = {
    "postgres_url": ("postgres",),  # tests/support/pg.py: a PostgreSQL server
    "pacs": ("dcmtk",),  # tests/test_serve.py: DCMTK storescp as the PACS
    "storescp": ("dcmtk",),  # tests/test_dispatch.py: DCMTK storescp
    "tls_storescp": ("dcmtk",),  # tests/test_dispatch.py: DCMTK storescp over TLS
    "site": ("orthanc",),  # tests/test_orthanc.py and tests/test_viewer.py: both start Orthanc
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fail collection if a test uses a fixture of FIXTURE_MARKERS without its markers."""
    missing = []
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            for marker in FIXTURE_MARKERS.get(fixture, ()):
                if item.get_closest_marker(marker) is None:
                    missing.append(f"{item.nodeid}: uses the fixture {fixture!r}, so it needs @pytest.mark.{marker}")
    if missing:
        raise pytest.UsageError("tests lack the marker of a tool they need:\n  " + "\n  ".join(missing))


@pytest.fixture
def engine(tmp_path: Path):
    """A migrated SQLite database in the test's folder."""
    from screener.store.db import create_schema, make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    create_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine):
    """A session factory on :func:`engine`."""
    from screener.store.db import session_factory

    return session_factory(engine)


@pytest.fixture
def contours() -> dict[str, np.ndarray]:
    return synthetic_contours()


@pytest.fixture
def scp(factory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., int]]:
    """Start an SCP with the given settings; returns its port. Stopped after the test.

    Arriving datasets go to the spool's .incoming folder, as in a receive process.
    """
    import tempfile

    from screener.node.receive import bound_port, start_scp, stop
    from screener.node.spool import INCOMING

    servers = []

    def start(settings) -> int:  # a screener.node.receive.ReceiveSettings
        incoming = settings.spool_root / INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        monkeypatch.setattr(tempfile, "tempdir", str(incoming))
        server = start_scp(settings, factory)
        servers.append(server)
        return bound_port(server)

    yield start
    for server in servers:
        stop(server)
