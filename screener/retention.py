"""Retention: no copy of a patient's image or report outlives ``storage.retention_days``.

Three sweeps, run by the service every hour, each deletion audited (``purged`` events):

- :func:`purge_spool`: spooled images whose jobs are all finished, once older than the
  retention.
- :func:`purge_outbox`: report objects (SR, GSPS, result image, PDF, JSON) older than the
  retention, unless a pending delivery still needs them.
- :func:`sweep_orphans`: spool files no instance row points at: left by a C-STORE answered
  0xA700 because the database was unavailable, by a re-send of a SOP Instance UID under
  another study, or by a crash between the rename and the commit. They were never
  acknowledged as stored (or are a second copy of one that was), so they go once they are
  older than a grace period that no running C-STORE can take.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from screener.codes import ReasonCode
from screener.node.spool import INCOMING, InvalidUID, validate_uid
from screener.store.db import SQLITE_BEGIN
from screener.store.models import Delivery, DeliveryState, Event, Instance, Job, JobState, utcnow

__all__ = ["ORPHAN_GRACE_S", "purge_outbox", "purge_spool", "sweep_orphans"]

log = structlog.get_logger(__name__)

_FINISHED = (JobState.DONE, JobState.INELIGIBLE, JobState.FAILED)
#: A spool file younger than this may belong to a C-STORE whose row is being committed.
ORPHAN_GRACE_S = 600.0
_CHUNK = 500  # paths per IN (...) query, within every backend's limits


def _audit(sessions: sessionmaker[Session], events: Iterable[Event]) -> None:
    events = list(events)
    if not events:
        return
    with sessions() as session:
        session.connection(execution_options={SQLITE_BEGIN: "IMMEDIATE"})
        session.add_all(events)
        session.commit()


def purge_spool(sessions: sessionmaker[Session], retention_days: float) -> int:
    """Delete spooled images whose jobs are all finished and that are older than the retention."""
    cutoff = utcnow() - timedelta(days=retention_days)
    with sessions() as session:
        old = session.scalars(select(Instance).where(Instance.received_at < cutoff)).all()
        candidates = [i for i in old if Path(i.spool_path).exists()
                      and all(j.state in _FINISHED for j in i.jobs)]
        session.commit()
    for instance in candidates:
        Path(instance.spool_path).unlink(missing_ok=True)
        _audit(sessions, [Event(time=utcnow(), kind="purged", outcome="ok", reason_code=ReasonCode.RETENTION.value,
                                sop_instance_uid=instance.sop_instance_uid, study_uid=instance.study_instance_uid,
                                accession_number=instance.accession_number,
                                message=f"spooled image deleted after {retention_days:g} days")])
        log.info("spool_purged", sop_instance_uid=instance.sop_instance_uid)
    _remove_empty_folders(Path(i.spool_path).parent for i in candidates)
    return len(candidates)


def purge_outbox(sessions: sessionmaker[Session], outbox: Path, retention_days: float) -> int:
    """Delete report objects older than the retention that no pending delivery needs."""
    if not outbox.is_dir():
        return 0
    cutoff = time.time() - retention_days * 86400.0
    old = [p for p in outbox.iterdir() if _older_file(p, cutoff)]
    if not old:
        return 0
    with sessions() as session:
        pending = session.scalars(select(Job.result_json).join(Delivery, Delivery.job_id == Job.id)
                                  .where(Delivery.state == DeliveryState.PENDING)).all()
        session.commit()
    needed = {str(o.get("path")) for doc in pending if isinstance(doc, dict)
              for o in (doc.get("outputs") or {}).values() if isinstance(o, dict)}
    removed = [p for p in old if str(p) not in needed]
    for path in removed:
        path.unlink(missing_ok=True)
    _audit(sessions, [Event(time=utcnow(), kind="purged", outcome="ok", reason_code=ReasonCode.RETENTION.value,
                            sop_instance_uid=_uid_of(p), message=f"report object {p.name} deleted after "
                            f"{retention_days:g} days") for p in removed])
    if removed:
        log.info("outbox_purged", files=len(removed))
    return len(removed)


def sweep_orphans(sessions: sessionmaker[Session], spool_root: Path, grace_s: float = ORPHAN_GRACE_S) -> int:
    """Delete spool files that no instance row points at (see the module docstring).

    A file belongs to a row when the row has its SOP Instance UID (the file's name) and the
    row's path ends in the same study/series/file: compared below the spool folder, so a data
    folder that was moved or mounted elsewhere still matches. If most files look orphaned,
    something is wrong with the comparison, not the files: nothing is deleted and it is logged.
    """
    if not spool_root.is_dir():
        return 0
    cutoff = time.time() - grace_s
    files = [p for p in spool_root.rglob("*") if INCOMING not in p.relative_to(spool_root).parts
             and _older_file(p, cutoff)]
    orphans: list[Path] = []
    for start in range(0, len(files), _CHUNK):
        chunk = files[start:start + _CHUNK]
        uids = {p: _uid_of(p) for p in chunk}
        with sessions() as session:
            rows = session.execute(select(Instance.sop_instance_uid, Instance.spool_path)
                                   .where(Instance.sop_instance_uid.in_({u for u in uids.values() if u}))).all()
            session.commit()
        known = {(uid, Path(path).parts[-3:]) for uid, path in rows}
        orphans += [p for p in chunk if (uids[p], p.relative_to(spool_root).parts[-3:]) not in known]
    if len(orphans) > max(20, len(files) // 2):
        log.error("spool_sweep_refused", orphans=len(orphans), files=len(files),
                  why="most spool files match no instance row; check storage.data_dir and the database")
        return 0
    for path in orphans:
        path.unlink(missing_ok=True)
    _audit(sessions, [Event(time=utcnow(), kind="purged", outcome="ok", reason_code=ReasonCode.ORPHAN_FILE.value,
                            sop_instance_uid=_uid_of(p), study_uid=_study_of(p, spool_root),
                            message="spool file without an instance row deleted (never acknowledged as "
                                    "stored, or a second copy)") for p in orphans])
    if orphans:
        log.warning("spool_orphans_removed", files=len(orphans))
    _remove_empty_folders(p.parent for p in orphans)
    return len(orphans)


def _older_file(path: Path, cutoff: float) -> bool:
    try:  # a temporary file may be renamed between listing and looking
        return path.is_file() and path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False


_SUFFIXES = (".sr.dcm", ".gsps.dcm", ".sc.dcm", ".pdf.dcm", ".gsps.png", ".dcm", ".json")


def _uid_of(path: Path) -> str | None:
    """The SOP Instance UID a spool or outbox file is named after, if it is one."""
    name = next((path.name.removesuffix(s) for s in _SUFFIXES if path.name.endswith(s)), path.name)
    try:
        return validate_uid("SOPInstanceUID", name)
    except InvalidUID:
        return None


def _study_of(path: Path, root: Path) -> str | None:
    parts = path.relative_to(root).parts
    try:
        return validate_uid("StudyInstanceUID", parts[0]) if len(parts) == 3 else None
    except InvalidUID:
        return None


def _remove_empty_folders(folders: Iterable[Path]) -> None:
    """Series and study folders left empty (``rmdir`` refuses a folder that is not)."""
    for folder in set(folders):
        for candidate in (folder, folder.parent):
            try:
                candidate.rmdir()
            except OSError:
                break
