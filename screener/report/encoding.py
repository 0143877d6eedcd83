"""DICOM bytes written directly: Explicit VR Little Endian elements, items and sequences.

pydicom writes a dataset by walking it element by element, and highdicom builds every SR
content item as a checked Dataset; for the ~900 items of our SR that was 0.4 s per image, the
slowest stage of the pipeline after decoding. The measurement tree is the same for every image
up to its numbers, UIDs and outlines, so sr.py writes it with these helpers, the fixed parts
(codes, the algorithm identification) encoded once and cached. A test holds the result byte
for byte to the tree highdicom builds (``sr.build_sr(full_check=True)``), so highdicom stays
the definition of what the tree is, and this module only the fast way to write it.

The pydicom internals this needs (raw elements, the writer, the original encoding that lets
the writer copy raw bytes through) stay in this one module.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from functools import lru_cache

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_sequence_item
from pydicom.sr.coding import Code
from pydicom.tag import Tag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, DSfloat

__all__ = ["element", "text", "ds", "fd", "us", "fl", "item", "sequence", "sop_reference", "code_item", "content_item",
           "encode_items", "set_raw_sequence"]

#: VRs with a 4-byte length field in Explicit VR (PS3.5 7.1.2), as pydicom's writer has them.
_LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
_ITEM = b"\xfe\xff\x00\xe0"
#: The text of SR content is written in UTF-8: the SR says ISO_IR 192 (highdicom's default).
_ENCODING = "utf-8"


def element(tag: int, vr: str, value: bytes) -> bytes:
    """One data element: tag, VR, length and ``value`` (already padded to an even length)."""
    if len(value) % 2:
        raise ValueError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}): odd value length {len(value)}")
    head = struct.pack("<HH2s", tag >> 16, tag & 0xFFFF, vr.encode("ascii"))
    if vr in _LONG_VRS:
        return head + struct.pack("<HI", 0, len(value)) + value
    if len(value) > 0xFFFF:
        raise ValueError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr}: {len(value)} bytes do not fit a 2-byte length")
    return head + struct.pack("<H", len(value)) + value


def text(tag: int, vr: str, value: str) -> bytes:
    """A string element, padded as pydicom pads it (UI with NUL, other strings with a space)."""
    raw = value.encode(_ENCODING)
    if len(raw) % 2:
        raw += b"\x00" if vr == "UI" else b" "
    return element(tag, vr, raw)


def ds(tag: int, value: float) -> bytes:
    """A Decimal String, formatted as highdicom formats it (pydicom's auto_format)."""
    return text(tag, "DS", str(DSfloat(value, auto_format=True)))


def fd(tag: int, value: float) -> bytes:
    return element(tag, "FD", struct.pack("<d", value))


def us(tag: int, value: int) -> bytes:
    return element(tag, "US", struct.pack("<H", value))


def fl(tag: int, values: np.ndarray) -> bytes:
    return element(tag, "FL", np.asarray(values, dtype="<f4").ravel().tobytes())


def item(*elements: tuple[int, bytes]) -> bytes:
    """A sequence item of (tag, encoded element) pairs, written in tag order as DICOM asks."""
    body = b"".join(b for _, b in sorted(elements, key=lambda e: e[0]))
    return _ITEM + struct.pack("<I", len(body)) + body


def sequence(tag: int, items: Iterable[bytes]) -> bytes:
    """A sequence of explicit length holding ``items`` (each from :func:`item`)."""
    return element(tag, "SQ", b"".join(items))


def sop_reference(tag: int, sop_class_uid: str, sop_instance_uid: str) -> tuple[int, bytes]:
    """A one-item reference sequence (Referenced SOP / Referenced Image Sequence) to one
    instance, as the (tag, bytes) pair :func:`item` takes."""
    return tag, sequence(tag, [item((0x00081150, text(0x00081150, "UI", sop_class_uid)),
                                    (0x00081155, text(0x00081155, "UI", sop_instance_uid)))])


def code_item(code: Code) -> bytes:
    """The item of a code sequence (Code Value, Scheme, Version, Meaning)."""
    # cached on all four parts: pydicom's Code compares and hashes without its meaning
    return _code_item(code.value, code.scheme_designator, code.meaning, code.scheme_version or "")


@lru_cache(maxsize=512)
def _code_item(value: str, scheme: str, meaning: str, version: str) -> bytes:
    if len(value) > 16 or value.startswith("urn:"):
        raise ValueError(f"code {value!r}: long and URN code values are not written here")
    elements = [(0x00080100, text(0x00080100, "SH", value)),
                (0x00080102, text(0x00080102, "SH", scheme)),
                (0x00080104, text(0x00080104, "LO", meaning))]
    if version:
        elements.append((0x00080103, text(0x00080103, "SH", version)))
    return item(*elements)


def content_item(relationship: str, value_type: str, name: Code, *elements: tuple[int, bytes]) -> bytes:
    """An SR content item: relationship, value type and concept name, then its own elements."""
    return item(*_head(relationship, value_type, name.value, name.scheme_designator, name.meaning,
                       name.scheme_version or ""), *elements)


@lru_cache(maxsize=512)
def _head(relationship: str, value_type: str, *code: str) -> tuple[tuple[int, bytes], ...]:
    return ((0x0040A010, text(0x0040A010, "CS", relationship)),
            (0x0040A040, text(0x0040A040, "CS", value_type)),
            (0x0040A043, sequence(0x0040A043, [_code_item(*code)])))


def encode_items(items: Iterable[Dataset]) -> bytes:
    """Sequence items of Datasets, as pydicom's writer encodes them (Explicit VR LE, UTF-8)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    for dataset in items:
        write_sequence_item(fp, dataset, [_ENCODING])
    return fp.getvalue()


def set_raw_sequence(dataset: Dataset, keyword: str, items: bytes) -> None:
    """Put already encoded ``items`` into ``dataset`` as the sequence ``keyword``.

    pydicom copies a raw element's bytes when it writes the dataset, but only when the dataset
    says it is already in the encoding being written; otherwise it first decodes every raw
    sequence to correct ambiguous VRs. So the top level is corrected here, once, and marked as
    Explicit VR Little Endian in its own character set. Reading the sequence back
    (``dataset.ContentSequence``) decodes it as usual.
    """
    if dataset.get("SpecificCharacterSet") != "ISO_IR 192":
        raise ValueError(f"set_raw_sequence: the items are UTF-8; the dataset says SpecificCharacterSet "
                         f"{dataset.get('SpecificCharacterSet')!r}, not 'ISO_IR 192'")
    correct_ambiguous_vr(dataset, True)
    tag = Tag(keyword)
    dataset[tag] = RawDataElement(tag, "SQ", len(items), items, 0, False, True)
    dataset.set_original_encoding(False, True, dataset._character_set)
