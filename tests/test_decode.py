"""Decoding real CR files (pydicom-data RG1) and refusing broken ones with a reason code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from screener.pipeline.decode import DecodeError, decode_dataset, decode_file
from tests.conftest import SHARED, rg1_file


def test_monochrome1_cr_is_inverted_to_bright_bone() -> None:
    ds = pydicom.dcmread(rg1_file())
    img = decode_file(rg1_file())
    assert img.photometric == "MONOCHROME1" and img.shape == (1955, 1841)
    assert img.pixels.dtype == np.float32 and 0.0 <= img.pixels.min() and img.pixels.max() <= 1.0
    raw = ds.pixel_array.astype(float)
    assert np.corrcoef(raw.ravel()[::97], img.pixels.ravel()[::97])[0, 1] < -0.9


def test_lossless_transfer_syntaxes_decode_identically() -> None:
    a = decode_file(rg1_file("RG1_UNCR.dcm")).pixels
    b = decode_file(rg1_file("RG1_J2KR.dcm")).pixels
    np.testing.assert_array_equal(a, b)
    lossy = decode_file(rg1_file("RG1_J2KI.dcm")).pixels
    assert np.abs(lossy - a).mean() < 0.02


def test_zero_pixel_spacing_is_reported_unknown() -> None:
    img = decode_file(rg1_file())
    assert img.pixel_spacing_mm is None and img.spacing_source == "unknown"
    assert img.patient_sex == "F"


def test_imager_spacing_corrected_for_magnification() -> None:
    ds = pydicom.dcmread(rg1_file())
    del ds.PixelSpacing
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.EstimatedRadiographicMagnificationFactor = 1.1
    img = decode_dataset(ds)
    assert img.pixel_spacing_mm == pytest.approx((0.2 / 1.1, 0.2 / 1.1))
    assert "Magnification" in img.spacing_source


def test_corrupt_codestream_gives_clean_error(tmp_path: Path) -> None:
    ds = pydicom.dcmread(rg1_file("RG1_J2KR.dcm"))
    frame = bytearray(ds.PixelData)
    frame[len(frame) // 3 : len(frame) // 3 + 4000] = b"\x00" * 4000  # wipe the middle of the codestream
    ds.PixelData = bytes(frame[: len(frame) // 2])
    path = tmp_path / "corrupt.dcm"
    ds.save_as(path)
    with pytest.raises(DecodeError) as info:
        decode_file(path)
    assert info.value.code == "corrupt-pixel-data" and "corrupt pixel data" in str(info.value)


@pytest.mark.skipif(not (SHARED / "dicom").is_dir(), reason="extended check: ../shared/data/dicom not present")
def test_shared_corrupt_canon_file() -> None:
    with pytest.raises(DecodeError, match="corrupt pixel data"):
        decode_file(SHARED / "dicom" / "canon_dx_chest_j2k_corrupt.dcm")


def test_structural_problems_have_reason_codes(tmp_path: Path) -> None:
    no_pixels = pydicom.dcmread(rg1_file())
    del no_pixels.PixelData
    with pytest.raises(DecodeError) as info:
        decode_dataset(no_pixels)
    assert info.value.code == "no-pixel-data"
    colour = pydicom.dcmread(rg1_file())
    colour.SamplesPerPixel = 3
    with pytest.raises(DecodeError) as info:
        decode_dataset(colour)
    assert info.value.code == "colour"
    (tmp_path / "x.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(DecodeError) as info:
        decode_file(tmp_path / "x.dcm")
    assert info.value.code == "not-dicom"
