"""What the result image and the PDF report share: a new instance in the source's study.

Both are plain pydicom datasets (highdicom has no Encapsulated PDF, and its Secondary Capture
wants a Patient Orientation that many films lack); this module writes the modules they have
in common, so the two stay alike.
"""

from __future__ import annotations

import datetime

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from screener.pipeline.estimate import BmdEstimate
from screener.report.sr import MANUFACTURER, MODEL_NAME, UTF8, software_versions

__all__ = ["PATIENT_STUDY", "copy_patient_study", "new_instance", "source_reference"]

#: Attributes of the Patient and General Study modules, copied from the source as they are.
PATIENT_STUDY = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "StudyDescription",
)


def copy_patient_study(header: Dataset, target: Dataset) -> None:
    """Patient and General Study modules of the source (type 2: present, maybe empty), written in
    UTF-8: pydicom decoded them with the source's character set (ISO 2022, Latin-1, ...), and a
    term it could not use has been emptied by source_header, so re-encoding is the safe way."""
    target.SpecificCharacterSet = UTF8
    for keyword in PATIENT_STUDY:
        if keyword in header:
            target[keyword] = header[keyword]


def new_instance(
    header: Dataset,
    estimate: BmdEstimate,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
    series_description: str,
    modality: str,
    transfer_syntax_uid: str,
    now: datetime.datetime,
    institution_name: str | None,
) -> Dataset:
    """Patient, study, series, equipment (General and SC Equipment) and SOP common modules of a
    derived object, with its file meta; the caller adds what is its own."""
    ds = Dataset()
    copy_patient_study(header, ds)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.Modality = modality
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description + (" (DEMO)" if estimate.demo else "")
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = software_versions(estimate.algorithm)
    if institution_name:
        ds.InstitutionName = institution_name
    ds.ConversionType = "WSD"  # workstation: made by software from another object
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "YES"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = transfer_syntax_uid
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def source_reference(header: Dataset) -> Dataset:
    """The item that names the source film (Source Image / Source Instance Sequence)."""
    ref = Dataset()
    ref.ReferencedSOPClassUID = header.SOPClassUID
    ref.ReferencedSOPInstanceUID = header.SOPInstanceUID
    return ref
