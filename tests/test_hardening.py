"""What hostile or odd input must not leave behind, and the shape of the house, checked.

No network here: the Receiver takes a plain StoreRequest, retention and migrations work on a
real SQLite database, and the import graph is read from the source.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from alembic import command
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from screener import durable
from screener.codes import ReasonCode
from screener.node.receive import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, Receiver, ReceiveSettings, StoreRequest
from screener.node.spool import spool_path
from screener.pipeline.eligibility import check_header
from screener.result import JobResult, JobStatus, ObjectKind, OutputObject
from screener.retention import purge_outbox, sweep_orphans
from screener.safe_text import quote, scrub
from screener.store.db import alembic_config, create_schema, make_engine
from screener.store.models import Event, Instance
from tests.support.common import edit_dataset, rg1_file

ROOT = Path(__file__).resolve().parents[1]
CR = "1.2.840.10008.5.1.4.1.1.1"


def receiver(tmp_path: Path, factory: sessionmaker[Session]) -> Receiver:
    return Receiver(ReceiveSettings(spool_root=tmp_path / "spool", model_id="demo-1.0", patient_salt=b"salt",
                                    port=0, min_free_bytes=0), factory)


def request(tmp_path: Path, ds: pydicom.Dataset, name: str = "in.dcm") -> StoreRequest:
    """What pynetdicom's chunked receive hands over: the dataset as a Part 10 file."""
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return StoreRequest(path=path, sop_class_uid=CR, sop_instance_uid=str(ds.SOPInstanceUID),
                        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), calling_ae="PACS",
                        peer_address="127.0.0.1:4000")


def events(factory: sessionmaker[Session], **where: object) -> list[Event]:
    with factory() as session:
        query = select(Event)
        for key, value in where.items():
            query = query.where(getattr(Event, key) == value)
        return list(session.scalars(query))


# ---------------------------------------------------------------- the Receiver without a network


def test_receiver_stores_a_plain_request(tmp_path: Path, factory) -> None:
    ds = pydicom.dcmread(rg1_file())
    assert receiver(tmp_path, factory).store(request(tmp_path, ds)) == SUCCESS
    with factory() as session:
        instance = session.scalars(select(Instance)).one()
    assert Path(instance.spool_path).is_file() and instance.calling_ae == "PACS"


def test_resend_under_another_study_leaves_no_second_copy(tmp_path: Path, factory) -> None:
    # Before: the second file was written and never referenced nor removed.
    ds = pydicom.dcmread(rg1_file())
    r = receiver(tmp_path, factory)
    assert r.store(request(tmp_path, ds)) == SUCCESS
    moved = edit_dataset(ds, StudyInstanceUID="1.2.826.0.1.3680043.10.1.999")
    assert r.store(request(tmp_path, moved, "again.dcm")) == SUCCESS
    files = [p for p in (tmp_path / "spool").rglob("*.dcm")]
    with factory() as session:
        assert [Path(i.spool_path) for i in session.scalars(select(Instance))] == files
    assert [e.kind for e in events(factory)] == ["received", "duplicate"]


def test_database_unavailable_answers_a700_and_the_orphan_is_swept(tmp_path: Path, engine, factory) -> None:
    # Before: the spooled file of a 0xA700 "database unavailable" stayed for ever.
    ds = pydicom.dcmread(rg1_file())
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE instances RENAME TO instances_away"))
    assert receiver(tmp_path, factory).store(request(tmp_path, ds)) == OUT_OF_RESOURCES
    orphan = spool_path(tmp_path / "spool", ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert orphan.is_file()
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE instances_away RENAME TO instances"))
    assert sweep_orphans(factory, tmp_path / "spool") == 0  # too young: its row may be committing
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    assert sweep_orphans(factory, tmp_path / "spool") == 1
    assert not orphan.exists() and not orphan.parent.exists()
    purged = events(factory, kind="purged")
    assert [(e.reason_code, e.sop_instance_uid, e.study_uid) for e in purged] == [
        ("orphan-file", ds.SOPInstanceUID, ds.StudyInstanceUID)]


def test_sweep_matches_rows_below_the_spool_folder_so_a_moved_data_folder_loses_nothing(tmp_path, engine) -> None:
    # Rows keep absolute paths; after the data folder moves they no longer match the files'
    # own paths, and the sweep must not take that for orphans.
    from screener.store.db import session_factory

    sessions = session_factory(engine)
    ds = pydicom.dcmread(rg1_file())
    r = Receiver(ReceiveSettings(spool_root=tmp_path / "old" / "spool", model_id="m", patient_salt=b"s", port=0,
                                 min_free_bytes=0), sessions)
    assert r.store(request(tmp_path, ds)) == SUCCESS
    (tmp_path / "old").rename(tmp_path / "new")
    (stored,) = (tmp_path / "new" / "spool").rglob("*.dcm")
    os.utime(stored, (0, 0))
    assert sweep_orphans(sessions, tmp_path / "new" / "spool") == 0 and stored.is_file()


def test_when_most_files_look_orphaned_nothing_is_deleted(tmp_path: Path, factory) -> None:
    spool = tmp_path / "spool"
    for n in range(30):
        path = spool / "1.2" / "1.2.3" / f"1.2.3.{n}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (0, 0))
    assert sweep_orphans(factory, spool) == 0 and len(list(spool.rglob("*.dcm"))) == 30


def test_a_resend_after_retention_takes_the_place_of_the_removed_copy(tmp_path: Path, factory) -> None:
    ds = pydicom.dcmread(rg1_file())
    first = Receiver(ReceiveSettings(spool_root=tmp_path / "spool", model_id="model-1", patient_salt=b"salt",
                                     port=0, min_free_bytes=0), factory)
    assert first.store(request(tmp_path, ds)) == SUCCESS
    (stored,) = (tmp_path / "spool").rglob("*.dcm")
    stored.unlink()  # retention removed it
    moved = edit_dataset(ds, StudyInstanceUID="1.2.826.0.1.3680043.10.1.999")
    second = Receiver(ReceiveSettings(spool_root=tmp_path / "spool", model_id="model-2", patient_salt=b"salt",
                                      port=0, min_free_bytes=0), factory)
    assert second.store(request(tmp_path, moved, "again.dcm")) == SUCCESS
    with factory() as session:
        instance = session.scalars(select(Instance)).one()
    assert Path(instance.spool_path).is_file() and "1.2.826.0.1.3680043.10.1.999" in instance.spool_path
    assert [e.kind for e in events(factory)] == ["received", "received", "relocated"]


@pytest.mark.parametrize("rows", range(2048, 2054))
def test_an_honest_deflated_image_header_is_read_to_the_end_of_its_stream(tmp_path: Path, rows: int) -> None:
    # A deflate stream followed by a pad byte, whose last chunk inflates to more than a chunk
    # (black rows compress well), kept the header read spinning for ever.
    import threading

    import numpy as np
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from screener.node.receive import read_header

    ds = pydicom.dcmread(rg1_file())
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, 2048, 16, 12, 11
    ds.PixelData = np.zeros((rows, 2048), np.uint16).tobytes()
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, implicit_vr=False, little_endian=True)
    deflated = pydicom.dcmread(path)
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated.save_as(path, enforce_file_format=True)
    found: list[object] = []
    reader = threading.Thread(target=lambda: found.append(read_header(path, 512 << 20)), daemon=True)
    reader.start()
    reader.join(20)
    assert not reader.is_alive(), "read_header did not finish"
    assert found and found[0].SOPInstanceUID == ds.SOPInstanceUID
    # the worker's own guard (one bounded inflate serves both) finishes too
    from screener.pipeline.decode import read_dataset

    checker = threading.Thread(target=lambda: found.append(read_dataset(path)), daemon=True)
    checker.start()
    checker.join(60)
    assert not checker.is_alive(), "read_dataset did not finish"
    assert found[1].SOPInstanceUID == ds.SOPInstanceUID


def test_sweep_keeps_every_file_a_row_points_at(tmp_path: Path, factory) -> None:
    ds = pydicom.dcmread(rg1_file())
    assert receiver(tmp_path, factory).store(request(tmp_path, ds)) == SUCCESS
    (stored,) = (tmp_path / "spool").rglob("*.dcm")
    os.utime(stored, (0, 0))
    assert sweep_orphans(factory, tmp_path / "spool") == 0 and stored.is_file()


def test_invalid_uid_is_refused_without_quoting_what_is_not_a_uid(tmp_path: Path, factory) -> None:
    ds = edit_dataset(pydicom.dcmread(rg1_file()), StudyInstanceUID="DOE^JANE")
    assert receiver(tmp_path, factory).store(request(tmp_path, ds)) == CANNOT_UNDERSTAND
    (row,) = events(factory, kind="rejected")
    assert row.reason_code == "invalid-study-instance-uid" and "DOE" not in (row.message or "")


def test_outbox_objects_go_after_the_retention_unless_a_delivery_waits(tmp_path: Path, factory) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    old, waiting, young = outbox / "1.2.3.sr.dcm", outbox / "1.2.4.sr.dcm", outbox / "1.2.5.sr.dcm"
    for path in (old, waiting, young):
        path.write_bytes(b"x")
    for path in (old, waiting):
        os.utime(path, (0, 0))
    from tests.support.store import MODEL, SALT, received
    from screener.store.queue import claim_jobs, complete_job, record_received

    with factory() as session:
        record_received(session, received(), MODEL, SALT)
    (job,) = claim_jobs(factory, "w", 1, 60)
    result = JobResult(JobStatus.REPORTED, ReasonCode.ELIGIBLE, "estimated",
                       outputs={ObjectKind.SR: OutputObject(str(waiting), "1.2.4")})
    with factory() as session:
        complete_job(session, job.id, "w", "done", result, [("PACS", ("sr",))])
    assert purge_outbox(factory, outbox, retention_days=1) == 1
    assert not old.exists() and waiting.exists() and young.exists()
    assert [e.sop_instance_uid for e in events(factory, kind="purged")] == ["1.2.3"]


# ---------------------------------------------------------------- what reaches the audit


def test_free_text_in_a_coded_attribute_is_not_echoed() -> None:
    # Before: a BodyPartExamined holding a name appeared in `audit failures`.
    ds = edit_dataset(pydicom.dcmread(rg1_file(), stop_before_pixels=True), BodyPartExamined="DOE^JOHN")
    decision = check_header(ds)
    assert decision.code == "body-part" and "DOE" not in decision.reason
    assert "not a valid CS" in decision.reason
    assert quote("CHEST", "CS") == "'CHEST'" and "JOHN" not in quote("JOHN^DOE", "CS")
    assert scrub("invalid value 'DOE^JOHN' for PN") == "invalid value '…' for PN"


def test_fuji_image_type_with_a_space_is_accepted_and_the_report_says_so() -> None:
    # Before: ImageType "ORIGINAL PRIMARY" (one value) was refused as ineligible.
    ds = edit_dataset(pydicom.dcmread(rg1_file(), stop_before_pixels=True), ImageType="ORIGINAL PRIMARY",
                      ViewPosition="P.A.")
    decision = check_header(ds)
    assert decision.eligible, decision.reason
    assert "read as ORIGINAL\\PRIMARY" in decision.reason and "ViewPosition (0018,5101) read as 'PA'" in decision.reason
    ambiguous = edit_dataset(ds, ImageType="PRIMARY ORIGINAL")
    assert check_header(ambiguous).code == "image-type"


def test_every_code_the_pipeline_can_give_is_a_reason_code() -> None:
    text_ = "\n".join(p.read_text() for p in (ROOT / "screener").rglob("*.py"))
    quoted = set(__import__("re").findall(r"reason_code=\"([a-z-]+)\"", text_))
    assert quoted <= {c.value for c in ReasonCode}
    assert all(c.value == c.value.lower() and "_" not in c.value for c in ReasonCode)


def test_status_piped_into_head_ends_without_a_traceback(tmp_path: Path) -> None:
    # Before: `screener status | head` ended with a BrokenPipeError traceback.
    config = tmp_path / "node.toml"
    config.write_text('[storage]\ndata_dir = "data"\n')
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'screener.db'}")
    (tmp_path / "data").mkdir()
    create_schema(engine)
    with engine.begin() as connection:
        for n in range(2000):
            connection.execute(text("INSERT INTO events (time, kind, outcome, sop_instance_uid, message) VALUES "
                                    "('2026-01-01 00:00:00', 'rejected', 'error', '1.2.3', :m)"),
                               {"m": f"refusal {n} " + "x" * 200})
    engine.dispose()
    screener = shutil.which("screener") or f"{sys.executable} -m screener.cli"
    for command_ in (f"audit history --sop 1.2.3 --config {config}", f"status --config {config}"):
        run = subprocess.run(f"{screener} {command_} | head -n 1", shell=True, capture_output=True, text=True,
                             timeout=120)
        assert run.stdout.strip() and "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr


# ---------------------------------------------------------------- durable, collision-free outputs


def test_atomic_write_syncs_the_file_and_its_folder(tmp_path: Path, monkeypatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(durable.os, "fsync", fsync)
    target = tmp_path / "outbox" / "1.2.3.sr.dcm"
    durable.write_atomically(target, lambda fh: fh.write(b"DICM"))
    assert target.read_bytes() == b"DICM"
    assert any(s.startswith(str(target.parent / ".1.2.3.sr.dcm.")) for s in synced)  # the file, before the rename
    assert str(target.parent) in synced  # the folder, after it


def test_process_and_spool_share_one_atomic_write_helper() -> None:
    for module in ("screener/process.py", "screener/node/spool.py"):
        source = (ROOT / module).read_text()
        assert "write_atomically" in source and "os.replace(tmp" not in source


# ---------------------------------------------------------------- one shape for the house


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name.split(".")[0] == "screener"}


def _module_graph() -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (ROOT / "screener").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def test_low_layers_never_import_the_wiring() -> None:
    # function-local imports count too: they hid the old cycles
    wiring = {"screener.service", "screener.cli", "screener.audit"}
    for name, imported in _module_graph().items():
        if name.startswith(("screener.node", "screener.store", "screener.pipeline", "screener.report")):
            assert not imported & wiring, f"{name} imports {sorted(imported & wiring)}"


def test_the_import_graph_has_no_cycle() -> None:
    graph = _module_graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_one_ae_title_rule_for_receive_and_dispatch() -> None:
    from screener.node.dispatch import DispatchSettings

    for bad in ("", " " * 4, "A" * 17, "BACK\\SLASH", "CAF\u00c9", "TAB\t"):
        with pytest.raises(ValueError):
            ReceiveSettings(spool_root=Path("."), model_id="m", patient_salt=b"s", ae_title=bad)
        with pytest.raises(ValueError):
            DispatchSettings(calling_ae=bad)
    assert ReceiveSettings(spool_root=Path("."), model_id="m", patient_salt=b"s", ae_title=" CXR ").ae_title == "CXR"


def test_config_defaults_come_from_the_stage_that_owns_them() -> None:
    from screener.config import DispatchConfig, NodeSettings
    from screener.node.dispatch import DispatchSettings

    node, receive = NodeSettings(), ReceiveSettings(spool_root=Path("."), model_id="m", patient_salt=b"s")
    for key in ("ae_title", "port", "max_dataset_bytes", "acse_timeout_s", "network_timeout_s", "max_associations",
                "max_associations_per_peer"):
        assert getattr(node, key) == getattr(receive, key), key
    assert node.min_free_mb * 1024 * 1024 == receive.min_free_bytes
    dispatch, settings = DispatchConfig(), DispatchSettings()
    assert [getattr(dispatch, k) for k in ("calling_ae", "max_attempts", "backoff_base_s", "backoff_cap_s")] == [
        getattr(settings, k) for k in ("calling_ae", "max_attempts", "backoff_base_s", "backoff_cap_s")]


def test_pynetdicom_internals_stay_in_the_compat_module() -> None:
    private = ("_create_association", "__class__ =", "ae._servers", "_config.")
    for path in (ROOT / "screener").rglob("*.py"):
        if path.name == "compat.py":
            continue
        source = path.read_text()
        assert not [p for p in private if p in source], f"{path.relative_to(ROOT)} reaches into pynetdicom"


# ---------------------------------------------------------------- the result document


def test_result_document_round_trips_and_refuses_unversioned() -> None:
    result = JobResult(JobStatus.ERROR, ReasonCode.CORRUPT_PIXEL_DATA, "truncated", "1.2.3",
                       outputs={ObjectKind.SR: OutputObject("/o/9.sr.dcm", "9")}, seconds={"total": 1.5})
    assert JobResult.from_json(json.loads(json.dumps(result.to_json()))) == result
    with pytest.raises(ValueError, match="version"):
        JobResult.from_json({"status": "error", "code": "bad-size", "reason": "x"})


def test_migration_0004_converts_version_1_documents(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0003")
    old_ineligible = {"file": "/s/1.dcm", "status": "ineligible", "code": "low_landmark_confidence", "reason": "r",
                      "sop_instance_uid": "1.2", "outputs": [], "seconds": {"total": 1.0}}
    old_done = {"file": "/s/2.dcm", "status": "reported", "code": "eligible", "reason": "estimated",
                "sop_instance_uid": "1.3", "outputs": ["/o/1.3.sr.dcm", "/o/1.3.gsps.dcm"], "seconds": {},
                "result": {"model_id": "m", "demo": True, "bmd_g_cm2": {"L1-L4": 0.7}, "tscore": {"L1-L4": -2.9},
                           "who_category": "osteoporosis", "tscore_note": ""}}
    with engine.begin() as c:
        c.execute(text("INSERT INTO instances (id, sop_instance_uid, study_instance_uid, series_instance_uid, "
                       "sop_class_uid, transfer_syntax_uid, spool_path, size_bytes, received_at) VALUES "
                       "(1, '1.2', '1', '1', '1', '1', '/s/1.dcm', 1, '2026-01-01 00:00:00'), "
                       "(2, '1.3', '1', '1', '1', '1', '/s/2.dcm', 1, '2026-01-01 00:00:00')"))
        c.execute(text("INSERT INTO jobs (id, instance_id, model_id, state, attempts, max_attempts, result_json, "
                       "created_at, updated_at) VALUES (1, 1, 'm', 'ineligible', 1, 3, :a, '2026-01-01', '2026-01-01'),"
                       " (2, 2, 'm', 'done', 1, 3, :b, '2026-01-01', '2026-01-01')"),
                  {"a": json.dumps(old_ineligible), "b": json.dumps(old_done)})
        c.execute(text("INSERT INTO deliveries (job_id, destination, kind, sop_instance_uid, state, attempts) VALUES "
                       "(2, 'PACS', 'sr', '9.1', 'pending', 0), (2, 'PACS', 'gsps', '9.2', 'pending', 0)"))
        c.execute(text("INSERT INTO events (time, kind, outcome, job_id, message) VALUES "
                       "('2026-01-01', 'failed', 'error', 1, 'not retryable: corrupt-pixel-data: truncated'), "
                       "('2026-01-01', 'rejected', 'error', NULL, 'x')"))
        c.execute(text("UPDATE events SET reason_code = 'invalid-SOPInstanceUID' WHERE kind = 'rejected'"))
    create_schema(engine)
    with engine.connect() as c:
        docs = {i: JobResult.from_json(json.loads(d)) for i, d in c.execute(text("SELECT id, result_json FROM jobs"))}
        codes = dict(c.execute(text("SELECT kind, reason_code FROM events")).all())
        positives = c.execute(text("SELECT sop_instance_uid, tscore_l1_l4 FROM v_positive_screens")).all()
        failures = c.execute(text("SELECT kind, reason_code FROM v_failures")).all()
    assert docs[1].code is ReasonCode.LOW_LANDMARK_CONFIDENCE and docs[1].outputs == {}
    assert docs[2].output("sr") == OutputObject("/o/1.3.sr.dcm", "9.1") and docs[2].measurement.who_category == "osteoporosis"
    assert codes == {"failed": "corrupt-pixel-data", "rejected": "invalid-sop-instance-uid"}
    assert positives == [("1.3", -2.9)] and failures == [("failed", "corrupt-pixel-data")]
    engine.dispose()
