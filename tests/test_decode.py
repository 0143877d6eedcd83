"""Decoding real CR files (pydicom-data RG1) and refusing broken ones with a reason code.

Transfer-syntax fixtures are made in the test from RG1_UNCR with DCMTK (JPEG family, JPEG-LS,
RLE, implicit/big endian) and pydicom (deflate); JPEG 2000 comes from pydicom-data (J2KR/J2KI).
A missing DCMTK tool fails the test: CI must not silently lose the coverage.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid as dicom_uid

from screener.pipeline import decode as decode_module
from screener.pipeline.decode import DecodeError, DecodeLimits, decode_dataset, decode_file
from tests.support.common import edit_dataset, SHARED, rg1_file


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


# ---------------------------------------------------------------------------------------------
# every transfer syntax a chest radiograph arrives in


def _dcmtk(tool: str, *args: str | Path) -> None:
    exe = shutil.which(tool)
    if exe is None:
        pytest.fail(f"DCMTK tool {tool!r} is not installed: run .ci/run (it installs dcmtk), or apt-get install dcmtk")
    done = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{tool} {' '.join(map(str, args))} failed: {done.stderr}"


def _deflate(src: Path, out: Path) -> None:
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = dicom_uid.DeflatedExplicitVRLittleEndian
    ds.save_as(out, enforce_file_format=True)


# name -> (expected transfer syntax, how to make it from RG1_UNCR, lossless?)
# JPEG baseline is 8-bit only: dcmcjpeg scales the 15-bit CR to 8 bits itself (min-max
# scaling) and rewrites WindowCenter/WindowWidth to match, so the display stays comparable;
# extended (+ee) does the same to 12 bits. Both are lossy, so "close", not "equal".
VARIANTS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "implicit": (dicom_uid.ImplicitVRLittleEndian, ("dcmconv", "+ti"), True),
    "big-endian": (dicom_uid.ExplicitVRBigEndian, ("dcmconv", "+tb"), True),
    "deflated": (dicom_uid.DeflatedExplicitVRLittleEndian, ("pydicom-deflate",), True),
    "jpeg-lossless-14": (dicom_uid.JPEGLossless, ("dcmcjpeg", "+el"), True),
    "jpeg-lossless-sv1": (dicom_uid.JPEGLosslessSV1, ("dcmcjpeg", "+e1"), True),
    "jpeg-extended-12bit": (dicom_uid.JPEGExtended12Bit, ("dcmcjpeg", "+ee"), False),
    "jpeg-baseline-8bit": (dicom_uid.JPEGBaseline8Bit, ("dcmcjpeg", "+eb"), False),
    "jpegls-lossless": (dicom_uid.JPEGLSLossless, ("dcmcjpls", "+el"), True),
    "jpegls-near-lossless": (dicom_uid.JPEGLSNearLossless, ("dcmcjpls", "+en"), False),
    "rle": (dicom_uid.RLELossless, ("dcmcrle",), True),
}


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return decode_file(rg1_file("RG1_UNCR.dcm")).pixels


@pytest.mark.parametrize("name", [pytest.param(name, marks=() if recipe[0] == "pydicom-deflate" else pytest.mark.dcmtk)
                                  for name, (_, recipe, _) in VARIANTS.items()])
def test_transfer_syntax_decodes(name: str, tmp_path: Path, reference: np.ndarray) -> None:
    syntax, recipe, lossless = VARIANTS[name]
    out = tmp_path / f"{name}.dcm"
    if recipe[0] == "pydicom-deflate":
        _deflate(rg1_file(), out)
    else:
        _dcmtk(recipe[0], *recipe[1:], rg1_file(), out)
    img = decode_file(out)
    assert img.transfer_syntax_uid == syntax, f"{recipe} wrote {img.transfer_syntax_uid}, expected {syntax}"
    assert img.shape == reference.shape == (1955, 1841)  # the source's pixel grid, never resampled
    if lossless:
        np.testing.assert_array_equal(img.pixels, reference)
    else:
        assert np.abs(img.pixels - reference).mean() < 0.01


def test_jpeg2000_lossy_matches_its_uncompressed_twin(reference: np.ndarray) -> None:
    lossy = decode_file(rg1_file("RG1_J2KI.dcm"))
    assert lossy.transfer_syntax_uid == dicom_uid.JPEG2000
    np.testing.assert_allclose(lossy.pixels, decode_file(rg1_file("RG1_UNCI.dcm")).pixels, atol=1e-6)
    assert np.abs(lossy.pixels - reference).mean() < 0.01


# ---------------------------------------------------------------------------------------------
# grey-value pipeline: modality LUT, VOI, inversion, bits, padding


def _rg1(**changes: object) -> pydicom.Dataset:
    return edit_dataset(pydicom.dcmread(rg1_file()), **changes)


def _with_raw(ds: pydicom.Dataset, raw: np.ndarray) -> pydicom.Dataset:
    ds.PixelData = raw.astype("<u2").tobytes()
    return ds


def test_first_window_is_used_when_several() -> None:
    one = decode_dataset(_rg1()).pixels
    two = decode_dataset(_rg1(WindowCenter=[15000, 4000], WindowWidth=[30000, 1000]))
    assert two.voi_source == "WindowCenter/WindowWidth"
    np.testing.assert_array_equal(two.pixels, one)


def test_voi_lut_sequence_matches_equivalent_window() -> None:
    ds = _rg1()
    item = pydicom.Dataset()
    item.LUTDescriptor = [30000, 0, 16]
    item.LUTData = np.round(np.linspace(0, 65535, 30000)).astype(int).tolist()
    ds.VOILUTSequence = [item]
    img = decode_dataset(ds)
    assert img.voi_source == "VOILUTSequence"
    assert np.abs(img.pixels - decode_dataset(_rg1()).pixels).mean() < 1e-3


def test_modality_rescale_and_lut_are_applied_before_the_window() -> None:
    base = decode_dataset(_rg1(WindowCenter=None, WindowWidth=None))
    assert base.voi_source.startswith("percentile")
    # The percentile window is invariant to a positive affine rescale: same display.
    rescaled = decode_dataset(_rg1(WindowCenter=None, WindowWidth=None, RescaleSlope=2.5, RescaleIntercept=-1000))
    np.testing.assert_allclose(rescaled.pixels, base.pixels, atol=1e-5)
    # A window in rescaled units gives the stored-unit window's display.
    windowed = decode_dataset(_rg1(RescaleSlope=2, RescaleIntercept=-100, WindowCenter=29900.5, WindowWidth=59999))
    np.testing.assert_allclose(windowed.pixels, decode_dataset(_rg1(WindowCenter=15000, WindowWidth=30000)).pixels, atol=1e-4)
    ds = _rg1(WindowCenter=None, WindowWidth=None)
    item = pydicom.Dataset()
    item.LUTDescriptor = [0, 0, 16]  # 0 = 65536 entries
    item.ModalityLUTType = "US"
    item.LUTData = (np.arange(65536) // 2).tolist()
    ds.ModalityLUTSequence = [item]
    assert np.abs(decode_dataset(ds).pixels - base.pixels).mean() < 1e-3


def test_window_that_clips_everything_falls_back_to_percentiles() -> None:
    img = decode_dataset(_rg1(WindowCenter=200000, WindowWidth=100))
    assert img.voi_source.startswith("percentile") and "unclipped" in img.voi_source
    assert 0.2 < img.pixels.mean() < 0.9


def test_monochrome2_is_not_inverted() -> None:
    m1 = decode_dataset(_rg1()).pixels
    m2 = decode_dataset(_rg1(PhotometricInterpretation="MONOCHROME2")).pixels
    np.testing.assert_allclose(m2, 1.0 - m1, atol=1e-6)


def test_unused_high_bits_are_ignored_and_high_bit_is_honoured() -> None:
    reference = decode_dataset(_rg1()).pixels
    raw = pydicom.dcmread(rg1_file()).pixel_array.astype(np.uint16)  # BitsStored 15, HighBit 14
    garbage = _with_raw(_rg1(), raw | 0x8000)  # bit 15 is not part of the value
    np.testing.assert_array_equal(decode_dataset(garbage).pixels, reference)
    shifted = _with_raw(_rg1(HighBit=15), raw << 1)  # 15 bits stored in bits 1..15
    np.testing.assert_array_equal(decode_dataset(shifted).pixels, reference)


def test_pixel_padding_is_black_and_left_out_of_statistics() -> None:
    raw = pydicom.dcmread(rg1_file()).pixel_array.astype(np.uint16)
    padded = raw.copy()
    padded[:, :500] = 32767  # the brightest stored value: would drag the 99.5 % percentile
    ds = _with_raw(_rg1(WindowCenter=None, WindowWidth=None, PixelPaddingValue=32767), padded)
    img = decode_dataset(ds)
    assert img.valid_mask is not None and not img.valid_mask[:, :500].any() and img.valid_mask[:, 500:].all()
    assert np.all(img.pixels[:, :500] == 0.0)
    lo, hi = np.percentile(raw[:, 500:], [0.5, 99.5])
    expected = 1.0 - np.clip((raw[:, 500:] - lo) / (hi - lo), 0, 1)  # MONOCHROME1
    assert np.abs(img.pixels[:, 500:] - expected).mean() < 0.005


def test_pixel_padding_range_limit() -> None:
    raw = pydicom.dcmread(rg1_file()).pixel_array.astype(np.uint16)
    raw[:100] = np.arange(0, 900, 9)[:, None]  # values 0..891
    ds = _with_raw(_rg1(PixelPaddingValue=0, PixelPaddingRangeLimit=900), raw)
    img = decode_dataset(ds)
    assert np.all(img.pixels[:100] == 0.0) and not img.valid_mask[:100].any()
    everything = _with_raw(_rg1(PixelPaddingValue=0, PixelPaddingRangeLimit=40000), raw)
    with pytest.raises(DecodeError) as info:
        decode_dataset(everything)
    assert info.value.code == "no-pixel-data" and "PixelPaddingValue" in str(info.value)


# ---------------------------------------------------------------------------------------------
# every error class, from a real or generated file


def _code(call, *args, **kwargs) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        call(*args, **kwargs)
    return info.value


@pytest.mark.parametrize(
    "syntax",
    ["1.2.3.4.5.6.7.8", dicom_uid.MPEG2MPML, dicom_uid.HEVCMP51, dicom_uid.JPEG2000MC, "1.2.840.10008.1.2.4.94"],
)
def test_unknown_and_video_syntaxes_are_unsupported(syntax: str) -> None:
    ds = pydicom.dcmread(rg1_file("RG1_J2KR.dcm"))
    ds.file_meta.TransferSyntaxUID = syntax
    err = _code(decode_dataset, ds)
    assert err.code == "unsupported-transfer-syntax" and str(syntax) in str(err) and "TransferSyntaxUID" in str(err)


def test_encapsulated_syntax_without_decoder_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoPlugin:
        is_available = False
        missing_dependencies = ["pylibjpeg-openjpeg"]

    real = decode_module.get_decoder
    monkeypatch.setattr(decode_module, "get_decoder", lambda ts: NoPlugin() if ts == dicom_uid.JPEG2000Lossless else real(ts))
    err = _code(decode_file, rg1_file("RG1_J2KR.dcm"))
    assert err.code == "unsupported-transfer-syntax" and "pylibjpeg-openjpeg" in str(err)


def test_multi_frame_is_refused(tmp_path: Path) -> None:
    ds = _rg1(NumberOfFrames=2)
    ds.PixelData = ds.PixelData * 2
    ds.save_as(tmp_path / "two.dcm")
    err = _code(decode_file, tmp_path / "two.dcm")
    assert err.code == "multi-frame" and "NumberOfFrames" in str(err)


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL", "PALETTE COLOR"])
def test_colour_photometric_is_refused(photometric: str) -> None:
    err = _code(decode_dataset, _rg1(PhotometricInterpretation=photometric))
    assert err.code == "colour" and photometric in str(err)


def test_too_small_and_too_large(tmp_path: Path) -> None:
    raw = pydicom.dcmread(rg1_file()).pixel_array.astype(np.uint16)
    small = _with_raw(_rg1(Rows=100, Columns=120), raw[800:900, 800:920])
    small.save_as(tmp_path / "small.dcm")
    err = _code(decode_file, tmp_path / "small.dcm")
    assert err.code == "bad-size" and "100 x 120" in str(err)
    err = _code(decode_file, rg1_file(), limits=DecodeLimits(max_side=1024))
    assert err.code == "bad-size" and "1955 x 1841" in str(err)
    err = _code(decode_file, rg1_file(), limits=DecodeLimits(max_pixels=2_000_000))
    assert err.code == "bad-size"
    with pytest.raises(ValueError, match="min_side"):
        DecodeLimits(min_side=0)


def test_hostile_header_is_refused_before_decoding(tmp_path: Path) -> None:
    ds = _rg1(Rows=65535, Columns=65535)
    ds.PixelData = b"\x00" * 64
    ds.save_as(tmp_path / "huge.dcm")
    t0 = time.perf_counter()
    err = _code(decode_file, tmp_path / "huge.dcm")
    assert err.code == "bad-size" and time.perf_counter() - t0 < 2.0
    # Within the limits but over a few bytes: the length check catches it, nothing is allocated.
    ds = _rg1(Rows=8000, Columns=8000)
    ds.PixelData = b"\x00" * 64
    assert _code(decode_dataset, ds).code == "inconsistent-attributes"
    # An encapsulated frame whose codestream is larger than the header says: refused before the
    # codec allocates what the codestream claims.
    j2k = pydicom.dcmread(rg1_file("RG1_J2KR.dcm"))
    j2k.Rows, j2k.Columns = 512, 512
    err = _code(decode_dataset, j2k)
    assert err.code == "inconsistent-attributes" and "codestream is 1955 x 1841" in str(err)


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"Rows": 1000}, "Rows x Columns"),
        ({"BitsStored": 17}, "BitsStored"),
        ({"HighBit": 3}, "HighBit"),
        ({"BitsAllocated": 12}, "BitsAllocated"),
        ({"Rows": None}, "Rows"),
        ({"PhotometricInterpretation": None}, "PhotometricInterpretation"),
        ({"PixelRepresentation": 2}, "PixelRepresentation"),
        ({"RescaleSlope": 0, "RescaleIntercept": 0}, "RescaleSlope"),
        ({"NumberOfFrames": 0}, "NumberOfFrames"),
    ],
)
def test_inconsistent_attributes_are_named(changes: dict, named: str) -> None:
    err = _code(decode_dataset, _rg1(**changes))
    assert err.code == "inconsistent-attributes" and named in str(err)


def test_missing_transfer_syntax_is_named() -> None:
    ds = _rg1()
    del ds.file_meta.TransferSyntaxUID
    err = _code(decode_dataset, ds)
    assert err.code == "inconsistent-attributes" and "TransferSyntaxUID" in str(err)


def test_unreadable_and_empty_files(tmp_path: Path) -> None:
    assert _code(decode_file, tmp_path / "absent.dcm").code == "unreadable-file"
    (tmp_path / "empty.dcm").write_bytes(b"")
    assert _code(decode_file, tmp_path / "empty.dcm").code == "not-dicom"
    assert _code(decode_file, tmp_path).code in ("unreadable-file", "not-dicom")


@pytest.mark.parametrize("name, code", [("RG1_UNCR.dcm", "inconsistent-attributes"), ("RG1_J2KR.dcm", "corrupt-pixel-data")])
def test_truncated_files_never_raise_raw_exceptions(name: str, code: str, tmp_path: Path) -> None:
    data = rg1_file(name).read_bytes()
    for fraction in (0.0005, 0.002, 0.3, 0.9):
        path = tmp_path / f"cut{fraction}.dcm"
        path.write_bytes(data[: int(len(data) * fraction)])
        err = _code(decode_file, path)
        assert err.code in ("not-dicom", "inconsistent-attributes", "corrupt-pixel-data", "no-pixel-data"), (fraction, err.code, err)
        if fraction >= 0.3:  # cut inside the pixel data
            assert err.code == code and ("truncated" in str(err)), (fraction, err)


def test_deflate_bomb_is_refused_without_inflating_it_all(tmp_path: Path) -> None:
    ds = _rg1()
    ds.PixelData = b"\x00" * (66 * 2**20)  # deflates to ~70 kB
    ds.file_meta.TransferSyntaxUID = dicom_uid.DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "bomb.dcm", enforce_file_format=True)
    assert (tmp_path / "bomb.dcm").stat().st_size < 2**20
    limits = DecodeLimits(min_side=1, max_side=128, max_pixels=128 * 128)
    err = _code(decode_file, tmp_path / "bomb.dcm", limits=limits)
    assert err.code == "bad-size" and "inflates" in str(err)


# ---------------------------------------------------------------------------------------------
# extended: the real files in ../shared/data/dicom


@pytest.mark.skipif(not (SHARED / "dicom").is_dir(), reason="extended check: ../shared/data/dicom not present")
def test_every_shared_dicom_file() -> None:
    files = sorted((SHARED / "dicom").glob("*.dcm"))
    assert files
    for path in files:
        if "corrupt" in path.name:
            err = _code(decode_file, path)
            assert err.code == "corrupt-pixel-data" and "corrupt pixel data" in str(err)
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        img = decode_file(path)
        assert img.shape == (ds.Rows, ds.Columns), path.name
        assert 0.05 < img.pixels.mean() < 0.95 and img.pixels.std() > 0.05, (path.name, img.voi_source)
