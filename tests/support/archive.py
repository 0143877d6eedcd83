"""A PACS archive of generated chest films, and Orthanc holding it with `screener serve` beside
it, for the backfill tests and bench.

Each film is the pydicom-data Philips CR (a real chest radiograph) at half resolution, as its
own patient, study, series and instance, with a study date and an age; some studies get a
knee series next to the chest one (which a backfill must not retrieve), some patients are too
young for the age band, some studies lie outside the date range.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from tests.support.common import ROOT, rg1_file
from tests.support.orthanc import Orthanc
from tests.support.serve import Node

ROOT_UID = "1.2.826.0.1.3680043.10.511.7."
FIRST = date(2024, 1, 1)


@dataclass
class Archive:
    files: list[Path] = field(default_factory=list)
    chest_in_band: set[str] = field(default_factory=set)  # SOP Instance UIDs a backfill must screen
    studies_in_band: set[str] = field(default_factory=set)
    young_studies: set[str] = field(default_factory=set)
    other: set[str] = field(default_factory=set)  # SOP Instance UIDs it must leave alone


def _film(template: pydicom.Dataset, pixels: np.ndarray, *, patient: str, study_uid: str, study_date: date,
          age: int, body_part: str = "CHEST") -> pydicom.Dataset:
    ds = template.copy()
    ds.PatientID = patient
    ds.PatientName = f"BACKFILL^{patient}"
    ds.PatientBirthDate = f"{study_date.year - age:04d}{study_date:%m%d}"
    ds.PatientAge = f"{age:03d}Y"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(ROOT_UID)
    ds.SOPInstanceUID = generate_uid(ROOT_UID)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = f"{study_date:%Y%m%d}"
    ds.AccessionNumber = patient
    ds.BodyPartExamined = body_part
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [0.35, 0.35]
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def make_archive(folder: Path, films: int, *, young: int = 0, outside: int = 0, knees: int = 0) -> Archive:
    """``films`` chest studies in January 2024 (patients 55-84), ``young`` more of patients aged
    30, ``outside`` more dated December 2023, and a knee series in the first ``knees`` studies."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(rg1_file())
    pixels = np.ascontiguousarray(template.pixel_array[::2, ::2])
    del template.PixelData
    archive = Archive()
    n = 0

    def save(ds: pydicom.Dataset) -> None:
        nonlocal n
        path = folder / f"{n:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        archive.files.append(path)
        n += 1

    for i in range(films + young + outside):
        study_uid = generate_uid(ROOT_UID)
        kind = "chest" if i < films else "young" if i < films + young else "outside"
        day = FIRST + timedelta(days=i % 28) if kind != "outside" else FIRST - timedelta(days=1 + i % 20)
        age = 30 if kind == "young" else 55 + i % 30
        ds = _film(template, pixels, patient=f"BF{i:05d}", study_uid=study_uid, study_date=day, age=age)
        save(ds)
        if kind == "chest":
            archive.chest_in_band.add(ds.SOPInstanceUID)
            archive.studies_in_band.add(study_uid)
        else:
            archive.other.add(ds.SOPInstanceUID)
            if kind == "young":
                archive.young_studies.add(study_uid)
        if kind == "chest" and i < knees:
            knee = _film(template, pixels, patient=f"BF{i:05d}", study_uid=study_uid, study_date=day, age=age,
                         body_part="KNEE")
            save(knee)
            archive.other.add(knee.SOPInstanceUID)
    return archive


def backfill_stack(tmp_path: Path, archive: Archive, workers: int = 1, **backfill: object) -> tuple[Orthanc, Node]:
    """Orthanc holding ``archive`` (it knows the node as CXRBMD, routes nothing) and a node (not
    started) with ``workers`` worker processes whose [backfill] source is that Orthanc, plus
    the ``backfill`` keys given. Results go back to Orthanc."""
    node = Node(tmp_path, 0, calling="ORTHANC", pacs_ae="ORTHANC")
    orthanc = Orthanc(tmp_path, node.port, route=False)
    for path in archive.files:
        orthanc.upload(path)
    values = {"source_ae_title": "ORTHANC", "source_host": "127.0.0.1", "source_port": orthanc.dicom, **backfill}
    lines = "\n".join(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in values.items())
    node.config.write_text(node.config.read_text().replace("port = 0\n", f"port = {orthanc.dicom}\n")
                           .replace("workers = 1 ", f"workers = {workers} ")
                           .replace("[[destinations]]", f"[backfill]\n{lines}\n[[destinations]]"))
    return orthanc, node


def run_backfill(node: Node, *args: str, log: Path | None = None) -> subprocess.Popen[str]:
    """`screener backfill ARGS --config <the node's>`, its output piped (or into ``log``)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = log.open("w") if log is not None else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "screener.cli", "backfill", *args, "--config", str(node.config)],
                            stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
