"""Hostile inputs built on the fly (shared by tests/test_hostile.py and bench/hostile_input.py)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import ComputedRadiographyImageStorage


def deflate_bomb(path: Path, inflated_bytes: int) -> str:
    """A valid Deflated Explicit VR Little Endian CR file whose Pixel Data inflates to
    ``inflated_bytes`` of zeros; the file is about a thousandth of that."""
    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "CR", "BOMB"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_dataset(head, ds)
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, inflated_bytes)
    deflate = zlib.compressobj(1, zlib.DEFLATED, -15)
    with path.open("wb") as out:
        out.write(b"\0" * 128 + b"DICM")
        file_meta = DicomBytesIO()
        file_meta.is_little_endian, file_meta.is_implicit_VR = True, False
        write_file_meta_info(file_meta, meta, enforce_standard=True)
        out.write(file_meta.getvalue())
        out.write(deflate.compress(head.getvalue() + pixel_header))
        zeros = bytes(1 << 20)
        for _ in range(inflated_bytes >> 20):
            out.write(deflate.compress(zeros))
        out.write(deflate.flush())
    return str(ds.SOPInstanceUID)
