"""docs/operations.md as an administrator follows it: every `screener ...` line in it parses
with the real command line, and the back-up/restore, certificate-rotation and bundle-swap
steps run as written against a real `screener serve` and DCMTK.

The runbook's commands are taken from the document itself (not retyped here), so a renamed
option or a wrong path in the document fails a test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from screener.cli import build_parser
from screener.pipeline.bundle import demo_bundle_path
from tests.support.common import ROOT, rg1_file, wait_for
from tests.support.dcmtk import run_tool, storescp
from tests.support.serve import Node
from tests.support.tls import make_ca, make_client_cert, make_server_cert

RUNBOOK = ROOT / "docs" / "operations.md"
# What the document writes for "your value here", and what the tests put in its place.
PLACEHOLDERS = {"FILE": "screener.toml", "<SOPInstanceUID>": "1.2.3", "/path/to/bundle": "bundle",
                "...": "2026-01-01T00:00", "<node-host>": "127.0.0.1", "<host>": "127.0.0.1",
                "<calling-ae>": "MODALITY"}


def runbook_commands(program: str) -> list[str]:
    """Every command line of ``program`` in the runbook: indented code lines and `inline code`,
    without the trailing comment."""
    text = RUNBOOK.read_text()
    found = []
    for line in text.splitlines():
        if line.startswith("    ") and line.strip().startswith(program + " "):
            found.append(line.strip().split("  #")[0].strip())
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # fenced blocks (the alert rules) are not commands
    found += [" ".join(m.split()) for m in re.findall(r"`([^`]+)`", prose) if m.startswith(program + " ")]
    return found


def fill(command: str, **values: str) -> list[str]:
    for placeholder, value in {**PLACEHOLDERS, **values}.items():
        command = command.replace(placeholder, value)
    return shlex.split(command)


def screener(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "screener.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=120)


def test_every_screener_command_in_the_runbook_parses() -> None:
    commands = runbook_commands("screener")
    # the runbook names at least these steps; a rewrite that drops one should say so here
    names = {shlex.split(c)[1] for c in commands}
    assert {"check-config", "conformance", "echo", "status", "audit", "bundle", "requeue", "serve", "backfill"} <= names, names
    parser = build_parser()
    for command in commands:
        argv = fill(command)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit as exc:  # argparse's way of refusing
            pytest.fail(f"runbook command does not parse ({exc}): {command}")


def _only(program: str, containing: str) -> str:
    [command] = [c for c in runbook_commands(program) if containing in c]
    return command


@pytest.mark.dcmtk
def test_backup_while_serving_and_restore_keep_results_and_patient_hashes(tmp_path: Path) -> None:
    """Section 5 and 6: an online `sqlite3 .backup` while the node runs, the salt copied; the data
    folder lost; the backup restored: the node knows what it screened (the same film is not
    screened twice) and hashes the patient ID as before (the salt came back)."""
    with storescp(tmp_path) as (port, _):
        _backup_and_restore(tmp_path, port)


def _backup_and_restore(tmp_path: Path, port: int) -> None:
    node = Node(tmp_path, port)
    node.start()
    film = pydicom.dcmread(rg1_file())
    try:
        assert node.send(rg1_file()).returncode == 0
        # a quiet node: the outbox is not backed up (section 5), so what is still to send is not
        # in the backup's future (a delivery whose file is gone is dead at once: test_dispatch)
        wait_for("the SR, GSPS, result image and PDF delivered", lambda: node.query(
            "select count(*) from deliveries where state = 'sent'") == [(4,)], 120, 0.5)
        backup = tmp_path / "backup"
        backup.mkdir()
        argv = fill(_only("sqlite3", ".backup"), **{"/backup/screener.db": str(backup / "screener.db")})
        if shutil.which(argv[0]) is None:
            pytest.fail("the sqlite3 shell is needed for the runbook's backup step: install the sqlite3 package "
                        "(.ci/run does)")
        done = subprocess.run(argv, cwd=node.data, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        shutil.copy2(node.data / "patient_id_salt", backup / "patient_id_salt")
    finally:
        node.stop()
    before = node.query("select patient_id_hash from instances")
    shutil.rmtree(node.data)  # the disk is lost
    node.data.mkdir()
    for name in ("screener.db", "patient_id_salt"):
        shutil.copy2(backup / name, node.data / name)

    node.start()
    try:
        status = json.loads(screener("status", "--json", "--config", node.config, cwd=tmp_path).stdout)
        assert status["jobs"].get("done") == 1, status
        history = screener("audit", "history", "--sop", film.SOPInstanceUID, "--config", node.config, cwd=tmp_path)
        for program in ("echoscu", "storescu"):  # section 3, the PACS side, as written
            argv = fill(_only(program, "-aec CXRBMD <node-host> 11112"), **{"11112": str(node.port),
                                                                            "film.dcm": str(rg1_file())})
            assert run_tool(argv[0], *argv[1:]).returncode == 0, argv
        kinds = {line.split()[1] for line in history.stdout.splitlines()[1:] if line.strip()}
        assert history.returncode == 0 and {"received", "done"} <= kinds, history.stdout
        # the storescu above sent the same film again: already screened with this model, no new job
        # a second film of the same patient: hashed with the restored salt, so it joins the first
        second = tmp_path / "second.dcm"
        film.SOPInstanceUID = film.SOPInstanceUID + ".2"
        film.file_meta.MediaStorageSOPInstanceUID = film.SOPInstanceUID
        film.save_as(second)
        assert node.send(second).returncode == 0
        rows = wait_for("the second film received", lambda: (
            r if len(r := node.query("select patient_id_hash from instances")) == 2 else None), 30)
        assert {row[0] for row in rows} == {before[0][0]}  # type: ignore[union-attr]
        wait_for("the second film screened", lambda: node.query(
            "select count(*) from jobs where state = 'done'") == [(2,)], 120, 0.5)
        assert node.query("select count(*) from jobs") == [(2,)]
        assert node.query("select count(*) from events where kind = 'duplicate'") == [(1,)]
    finally:
        node.stop()


def _tls_node(tmp_path: Path, pki: Path, pacs_port: int) -> Node:
    node = Node(tmp_path, pacs_port)
    text = node.config.read_text().replace(
        "[node]\n", f'[node]\ntls_port = {node.port + 0}\ntls_cert_file = "{pki}/server.pem"\n'
        f'tls_key_file = "{pki}/server.key"\ntls_ca_file = "{pki}/ca.pem"\nplain = false\n', 1)
    node.config.write_text(text)
    return node


def _issue(pki: Path, name: str) -> None:
    """A site CA, the node's server certificate and a modality's client certificate, under the
    file names the node's configuration points at."""
    work = pki.parent / name
    work.mkdir()
    ca = make_ca(work, f"{name}-ca")
    server = make_server_cert(work, ca)
    client = make_client_cert(work, ca, "modality")
    pki.mkdir(exist_ok=True)
    for source, target in ((ca[0], "ca.pem"), (server[0], "server.pem"), (server[1], "server.key"),
                           (client[0], "modality.pem"), (client[1], "modality.key")):
        shutil.copy2(source, pki / target)
        if source != work / target:  # the client's copy under the same names, for the check
            shutil.copy2(source, work / target)


@pytest.mark.dcmtk
def test_rotating_certificates_is_replace_the_files_and_restart(tmp_path: Path) -> None:
    """Section 8: new PEM files under the configured names, a restart, and the runbook's
    `echoscu +tls` check passes with the new CA; a client holding only the old one is refused."""
    with storescp(tmp_path) as (port, _):
        _rotate(tmp_path, port)


def _rotate(tmp_path: Path, port: int) -> None:
    pki = tmp_path / "pki"
    _issue(pki, "old")
    node = _tls_node(tmp_path, pki, port)
    check = _only("echoscu", "+cf")

    def echo(where: Path) -> subprocess.CompletedProcess[str]:
        argv = fill(check, **{"<key>": str(where / "modality.key"), "<cert>": str(where / "modality.pem"),
                              "<ca>": str(where / "ca.pem"), "<tls_port>": str(node.port)})
        return run_tool(argv[0], *argv[1:])

    node._echo = lambda: echo(pki).returncode == 0  # type: ignore[method-assign] # the TLS port only
    node.start()
    try:
        assert echo(tmp_path / "old").returncode == 0
    finally:
        node.stop()
    _issue(pki, "new")  # rotation: same file names, new CA and certificates
    node.start()
    try:
        assert echo(tmp_path / "new").returncode == 0
        assert echo(tmp_path / "old").returncode != 0  # the old CA's client no longer trusted
    finally:
        node.stop()


def test_swapping_the_model_bundle_is_checked_before_restart(tmp_path: Path) -> None:
    """Section 7: `screener bundle PATH` reads a bundle the site put on the host and names its
    model id; a configuration naming it passes check-config; a damaged bundle is refused by the
    same check, before any restart."""
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle_path(), bundle)
    argv = fill(_only("screener", "screener bundle"))[1:]
    shown = screener(*argv, cwd=tmp_path)
    assert shown.returncode == 0 and "model id" in shown.stdout, shown.stdout + shown.stderr
    config = tmp_path / "screener.toml"
    config.write_text(f'[model]\nbundle = "{bundle}"\n')
    assert screener("check-config", config).returncode == 0
    weights = next(p for p in bundle.iterdir() if p.suffix in (".pt", ".safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])  # a truncated copy
    refused = screener(*argv, cwd=tmp_path)
    assert refused.returncode == 2 and "error:" in refused.stderr, refused.stdout + refused.stderr
