"""`screener serve` as a real subprocess on loopback, with DCMTK storescu and storescp as the PACS."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.support import validators
from tests.support.common import ROOT, free_port, process_running, rg1_file, wait_for
from tests.support.dcmtk import dcmtk_tool, storescp
from tests.support.serve import Node

pytestmark = [pytest.mark.dcmtk]


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    with storescp(tmp_path) as found:
        yield found


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture
def node(tmp_path: Path, pacs: tuple[int, Path]) -> Iterator[Node]:
    n = Node(tmp_path, pacs[0])
    yield n
    n.stop()


def received_srs(out: Path) -> dict[str, pydicom.Dataset]:
    found = {}
    for f in out.iterdir():
        if f.is_file() and f.name.startswith("SR"):
            try:
                ds = pydicom.dcmread(f)
            except Exception:
                continue  # storescp still writing
            found[str(ds.SOPInstanceUID)] = ds
    return found


@pytest.mark.dicom3tools
def test_image_in_sr_out_with_audit_trail(node: Node, pacs: tuple[int, Path]) -> None:
    node.start()
    source = pydicom.dcmread(rg1_file())
    assert node.send(rg1_file()).returncode == 0
    srs = wait_for("SR and GSPS at the PACS", lambda: (received_srs(pacs[1]) if any(
        f.name.startswith("PS") for f in pacs[1].iterdir()) else None), 60)
    (sr,) = srs.values()  # type: ignore[union-attr]
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    sr_file = next(f for f in pacs[1].iterdir() if f.name.startswith("SR"))
    assert validators.dciodvfy(sr_file)[0] == []  # the SR as the PACS received it is conformant
    refs = [str(item.ReferencedSOPInstanceUID) for seq in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
            for series in seq.ReferencedSeriesSequence for item in series.ReferencedSOPSequence]
    assert str(source.SOPInstanceUID) in refs
    # SR, GSPS, result image and PDF
    wait_for("deliveries sent", lambda: node.query("select count(*) from deliveries where state='sent'")[0][0] == 4, 40)
    assert sorted(k for (k,) in node.query("select kind from deliveries")) == ["gsps", "image", "pdf", "sr"]
    assert node.query("select state from jobs") == [("done",)]
    kinds = [k for (k,) in node.query(f"select kind from events where sop_instance_uid='{source.SOPInstanceUID}' order by id")]
    for expected in ("received", "claimed", "done", "sent"):
        assert expected in kinds
    assert kinds.index("received") < kinds.index("claimed") < kinds.index("done") < kinds.index("sent")
    status = subprocess.run([sys.executable, "-m", "screener.cli", "status", "--config", str(node.config)],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert status.returncode == 0 and "done 1" in status.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{node.health_port}/health", timeout=10) as response:
        health = json.loads(response.read())
    assert response.status == 200 and health["jobs"]["done"] == 1
    assert health["receive_processes"] == {"configured": 2, "running": 2}
    assert_metrics_after_one_round_trip(node)
    echo = subprocess.run([sys.executable, "-m", "screener.cli", "echo", "pacs", "--config", str(node.config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert echo.returncode == 0, echo.stderr


def test_unknown_calling_ae_rejected(node: Node) -> None:
    node.start()
    result = node.send(rg1_file(), calling="STRANGER")
    assert result.returncode != 0
    assert node.query("select count(*) from instances")[0][0] == 0
    assert node.query("select reason_code from events where kind='association_rejected'") == [("calling-ae-not-recognised",)]


def test_kill_9_then_restart_loses_and_duplicates_nothing(node: Node, pacs: tuple[int, Path], tmp_path: Path) -> None:
    copies = []
    for n in range(3):
        ds = pydicom.dcmread(rg1_file())
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{n + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        copies.append(tmp_path / f"copy{n}.dcm")
        ds.save_as(copies[-1])
    node.start()
    node.send(*copies)
    wait_for("a claimed job", lambda: node.query("select count(*) from events where kind='claimed'")[0][0] > 0, 30, 0.05)
    assert node.proc is not None
    children = child_pids(node.proc.pid)
    assert children, "serve runs its second receive process as a child"
    node.proc.kill()
    node.proc.wait(10)
    # The receive processes notice their parent's death (their pipe closes) and exit.
    wait_for("the killed node's receive processes to exit", lambda: not any(map(process_running, children)), 15)
    node.start()
    node.send(*copies)  # the PACS retries what it may not have had acknowledged: duplicates are not queued again
    uids = [str(pydicom.dcmread(c, stop_before_pixels=True).SOPInstanceUID) for c in copies]
    wait_for("all SRs at the PACS", lambda: len(received_srs(pacs[1])) == 3, 90)
    wait_for("all deliveries sent", lambda: node.query("select count(*) from deliveries where state='sent'")[0][0] == 12, 60)
    for uid in uids:
        rows = node.query(f"select j.state from jobs j join instances i on i.id=j.instance_id where i.sop_instance_uid='{uid}'")
        assert rows == [("done",)], uid
    assert node.query("select count(*) from deliveries where state != 'sent'")[0][0] == 0
    per_object = node.query("select destination, kind, sop_instance_uid, count(*) from deliveries group by 1, 2, 3")
    assert len(per_object) == 12 and all(row[3] == 1 for row in per_object)  # 3 images x 4 objects


def assert_metrics_after_one_round_trip(node: Node) -> None:
    """GET /metrics, parsed with prometheus-client's own parser, after one image went through."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{node.health_port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}

    def value(family: str, name: str | None = None, **labels: str) -> float:
        return sum(s.value for s in families[family].samples
                   if (name is None or s.name == name) and all(s.labels.get(k) == v for k, v in labels.items()))

    (info,) = families["screener_model_info"].samples
    model_id = info.labels["model_id"]
    assert model_id.startswith("cxr-bmd-demo") and info.labels["demo"] == "true"
    assert value("screener_images_received", "screener_images_received_total", model_id=model_id) == 1
    assert value("screener_jobs", "screener_jobs_total", outcome="done", reason_code="eligible") == 1
    assert value("screener_received_bytes", "screener_received_bytes_total") > 1_000_000
    assert value("screener_jobs_in_state", state="done") == 1 and value("screener_jobs_in_state", state="queued") == 0
    for stage in ("decode", "landmarks", "model", "report", "total"):
        assert value("screener_stage_seconds", "screener_stage_seconds_count", stage=stage, model_id=model_id) == 1
    assert value("screener_received_to_sr_acknowledged_seconds",
                 "screener_received_to_sr_acknowledged_seconds_count", destination="pacs") == 1
    assert value("screener_deliveries", destination="pacs", state="sent") == 4
    assert value("screener_database_up") == 1
    assert value("screener_associations_accepted", "screener_associations_accepted_total") >= 1


def test_health_answers_as_soon_as_the_dicom_port_does(tmp_path: Path, pacs: tuple[int, Path]) -> None:
    # Before: the health endpoint started after the receive processes, so a monitor probing
    # once the DICOM port answered could find /health refusing connections.
    node = Node(tmp_path, pacs[0])
    log = node.log_path.open("ab")
    node.proc = subprocess.Popen([sys.executable, "-m", "screener.cli", "serve", "--config", str(node.config)],
                                 stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                 env=dict(__import__("os").environ, PYTHONPATH=str(ROOT)))
    try:
        def dicom_port_open() -> bool:
            try:
                socket.create_connection(("127.0.0.1", node.port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for("the DICOM port to accept connections", dicom_port_open, 90, 0.05)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.health_port}/health", timeout=10) as response:
                status = response.status
        except urllib.error.HTTPError as error:  # 503 while a receive process is still starting is fine
            status = error.code
        assert status in (200, 503)
    finally:
        node.stop()


def test_sigterm_exits_zero(node: Node) -> None:
    node.start()
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(30) == 0


def test_destination_down_then_up_gets_everything(tmp_path: Path) -> None:
    """The PACS is down when the result is ready; once it is up, it gets every object."""
    pacs_port, out = free_port(), tmp_path / "pacs"
    out.mkdir()
    node = Node(tmp_path, pacs_port)  # nothing listens on pacs_port yet
    try:
        node.start()
        assert node.send(rg1_file()).returncode == 0
        wait_for("a failed delivery attempt", lambda: node.query(
            "select count(*) from deliveries where state='pending' and attempts > 0")[0][0] >= 1, 90)
        proc = subprocess.Popen([dcmtk_tool("storescp"), "--aetitle", "PACS", "--output-directory", str(out), "+xa",
                                 str(pacs_port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            wait_for("all four objects delivered", lambda: node.query(
                "select count(*) from deliveries where state='sent'")[0][0] == 4, 90)
            assert received_srs(out) and any(f.name.startswith("PS") for f in out.iterdir())
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        node.stop()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_routing_loop_sr_dropped_and_traversal_uid_refused(node: Node, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    node.start()
    assert node.send(Path(get_testdata_file("test-SR.dcm"))).returncode == 0  # acknowledged...
    evil = pydicom.dcmread(rg1_file())
    evil.SOPInstanceUID = "../../evil"
    evil.save_as(tmp_path / "evil.dcm", enforce_file_format=False)
    before = {p for p in tmp_path.rglob("*")}
    assert node.send(tmp_path / "evil.dcm").returncode != 0  # ...this one refused
    wait_for("both decisions audited", lambda: node.query(
        "select count(*) from events where kind in ('dropped_own_output', 'rejected')")[0][0] == 2, 20)
    assert node.query("select count(*) from instances")[0][0] == 0  # ...and nothing queued
    created = {p for p in tmp_path.rglob("*")} - before
    assert not [p for p in created if "evil" in p.name]
