"""Store test data shared by tests/test_store.py, tests/test_audit.py and tests/test_postgres.py."""

from __future__ import annotations

from datetime import UTC, datetime

from screener.codes import ReasonCode
from screener.result import JobResult, JobStatus, OutputObject
from screener.store.queue import ReceivedInstance

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
SALT = b"per-install-salt-0123456789abcdef"
MODEL = "demo-1.0"
DESTS = [("PACS", ("sr", "gsps")), ("ARCHIVE", ("sr",))]


def received(n: int = 1, **changes: object) -> ReceivedInstance:
    fields: dict[str, object] = dict(
        sop_instance_uid=f"1.2.3.4.{n}", study_instance_uid="1.2.3", series_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
        spool_path=f"/spool/1.2.3/1.2.3.4/1.2.3.4.{n}.dcm", size_bytes=1000, accession_number="ACC1",
        patient_id="PID-42", calling_ae="PACS", peer_address="10.0.0.1:104",
    )
    fields.update(changes)
    return ReceivedInstance(**fields)  # type: ignore[arg-type]


def job_result(objects: dict[str, str] | None = None, *, status: str = "reported", code: str = "eligible",
               reason: str = "estimated", measurement: object = None) -> JobResult:
    """A job result document with one output per kind in ``objects`` (kind -> SOP Instance UID)."""
    outputs = {kind: OutputObject(f"/outbox/{uid}.{kind}.dcm", uid) for kind, uid in (objects or {}).items()}
    return JobResult(JobStatus(status), ReasonCode(code), reason, outputs=outputs,
                     measurement=measurement)  # type: ignore[arg-type]


#: A reported result with the objects DESTS take, and an ineligible one.
REPORTED = job_result({"sr": "2.25.1", "gsps": "2.25.2"})
INELIGIBLE = job_result(status="ineligible", code="view-not-frontal", reason="ViewPosition is 'LL'")
