"""DICOM TLS for incoming associations, against DCMTK echoscu / storescu +tls.

The SCP listens with TLS on its own port (``tls_port``), mutual TLS: a client must present a
certificate from the configured CA. A trusted client gets Success; an untrusted certificate,
and a plain (non-TLS) client on the TLS port, are refused and audited.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select

from screener.node.receive import ReceiveSettings, bound_port, start_scp, stop
from screener.node.spool import INCOMING
from screener.store.models import Event, Instance
from tests.support.common import rg1_file, wait_for
from tests.support.dcmtk import run_tool
from tests.support.tls import make_ca, make_client_cert, make_server_cert

pytestmark = pytest.mark.dcmtk


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    directory = tmp_path / "pki"
    directory.mkdir()
    ca = make_ca(directory, "site-ca")
    server_cert, server_key = make_server_cert(directory, ca)
    client_cert, client_key = make_client_cert(directory, ca, "modality")
    rogue = tmp_path / "rogue"
    rogue.mkdir()
    rogue_cert, rogue_key = make_client_cert(rogue, make_ca(rogue, "rogue-ca"), "intruder")
    return {"ca": ca[0], "server_cert": server_cert, "server_key": server_key, "client_cert": client_cert,
            "client_key": client_key, "rogue_cert": rogue_cert, "rogue_key": rogue_key}


@pytest.fixture
def tls_scp(tmp_path: Path, pki: dict[str, Path], factory, monkeypatch):
    import tempfile

    settings = ReceiveSettings(spool_root=tmp_path / "spool", model_id="demo-1.0", patient_salt=b"salt", port=0,
                               min_free_bytes=0, tls_port=0, tls_cert_file=str(pki["server_cert"]),
                               tls_key_file=str(pki["server_key"]), tls_ca_file=str(pki["ca"]),
                               acse_timeout_s=3.0)
    (settings.spool_root / INCOMING).mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(settings.spool_root / INCOMING))
    server = start_scp(settings, factory, tls=True)
    yield bound_port(server)
    stop(server)


def tls_args(pki: dict[str, Path], cert: str = "client") -> list[str]:
    return ["+tls", str(pki[f"{cert}_key"]), str(pki[f"{cert}_cert"]), "+cf", str(pki["ca"])]


def refusals(factory) -> list[Event]:
    with factory() as session:
        return list(session.scalars(select(Event).where(Event.reason_code == "tls-handshake-failed")))


def test_trusted_client_echoes_and_stores_over_tls(tls_scp: int, pki, factory) -> None:
    echo = run_tool("echoscu", "-v", *tls_args(pki), "-aec", "CXRBMD", "127.0.0.1", tls_scp)
    assert echo.returncode == 0, echo.stdout
    store = run_tool("storescu", "-v", *tls_args(pki), "-aec", "CXRBMD", "127.0.0.1", tls_scp, rg1_file())
    assert store.returncode == 0 and "Received Store Response (Success)" in store.stdout, store.stdout
    with factory() as session:
        assert session.scalars(select(Instance)).one().calling_ae == "STORESCU"
    assert refusals(factory) == []


def test_untrusted_client_certificate_is_refused_and_audited(tls_scp: int, pki, factory) -> None:
    echo = run_tool("echoscu", *tls_args(pki, "rogue"), "-aec", "CXRBMD", "127.0.0.1", tls_scp)
    assert echo.returncode != 0
    (event,) = wait_for("the refusal to be audited", lambda: refusals(factory), 10)
    assert event.kind == "connection_refused" and "certificate" in (event.message or "").lower()


def test_plain_client_on_the_tls_port_is_refused_and_audited(tls_scp: int, factory) -> None:
    started = time.monotonic()
    echo = run_tool("echoscu", "-aec", "CXRBMD", "--acse-timeout", "10", "127.0.0.1", tls_scp)
    assert echo.returncode != 0 and time.monotonic() - started < 10
    (event,) = wait_for("the refusal to be audited", lambda: refusals(factory), 10)
    assert event.kind == "connection_refused"


def test_tls_needs_certificate_and_its_own_port(tmp_path: Path) -> None:
    base = dict(spool_root=tmp_path, model_id="m", patient_salt=b"s")
    with pytest.raises(ValueError, match="tls_cert_file"):
        ReceiveSettings(**base, tls_port=2762)
    with pytest.raises(ValueError, match="own port"):
        ReceiveSettings(**base, port=2762, tls_port=2762, tls_cert_file="c", tls_key_file="k")


def test_a_client_that_never_handshakes_does_not_hold_up_the_others(tls_scp: int, pki) -> None:
    # pynetdicom would do the handshake in the one accepting thread: a silent TCP client
    # there would keep every other caller waiting.
    import socket

    silent = socket.create_connection(("127.0.0.1", tls_scp))
    try:
        started = time.monotonic()
        echo = run_tool("echoscu", *tls_args(pki), "-aec", "CXRBMD", "127.0.0.1", tls_scp)
        assert echo.returncode == 0 and time.monotonic() - started < 3, echo.stdout
    finally:
        silent.close()


def test_a_tls_only_node_has_no_plain_listener(tmp_path: Path, pki, engine) -> None:
    # Receive processes as `screener serve` runs them, with [node] plain = false.
    import socket

    from screener.node.receivers import ReceiverPool
    from tests.support.common import free_port

    plain_port, tls_port = free_port(), free_port()
    settings = ReceiveSettings(spool_root=tmp_path / "spool", model_id="demo-1.0", patient_salt=b"salt",
                               port=plain_port, min_free_bytes=0, tls_port=tls_port, plain=False,
                               tls_cert_file=str(pki["server_cert"]), tls_key_file=str(pki["server_key"]),
                               tls_ca_file=str(pki["ca"]))
    pool = ReceiverPool(settings, str(engine.url), processes=2)
    assert pool.start() == tls_port
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", plain_port), timeout=2).close()
        for _ in range(3):  # each receive process answers on the TLS port
            echo = run_tool("echoscu", *tls_args(pki), "-aec", "CXRBMD", "127.0.0.1", tls_port)
            assert echo.returncode == 0, echo.stdout
    finally:
        pool.stop()
    with pytest.raises(ValueError, match="plain"):
        ReceiveSettings(spool_root=tmp_path, model_id="m", patient_salt=b"s", plain=False)
