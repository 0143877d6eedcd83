"""DICOM (or PNG) radiograph -> display-value grey image that keeps the source geometry.

Display values are floats in [0, 1], bright = dense (bone), whatever the source's photometric
interpretation: modality LUT (Rescale Slope/Intercept or Modality LUT Sequence), then the first
VOI LUT or the first window when the file carries one (else a robust 0.5-99.5 percentile
window), then MONOCHROME1 inversion. Pixel padding (PixelPaddingValue, up to
PixelPaddingRangeLimit) is left out of the percentile statistics and comes out black (0).
The pixel grid is the source's (Rows x Columns), so points found on the decoded image are
source pixel coordinates.

Everything that can go wrong ends as a :class:`DecodeError` with a stable ``code``:

==============================  ===============================================================
code                            meaning
==============================  ===============================================================
not-dicom                       the file is not DICOM (no preamble/DICM prefix, unparseable)
unreadable-file                 the file cannot be read at all (missing, permissions, I/O)
no-pixel-data                   no (7FE0,0010) Pixel Data, or nothing but padding in it
unsupported-transfer-syntax     unknown, video or otherwise undecodable transfer syntax, or
                                no decoder plugin installed for it
multi-frame                     NumberOfFrames > 1
colour                          SamplesPerPixel > 1 or a colour PhotometricInterpretation
bad-size                        smaller than the minimum or larger than the configured limits
inconsistent-attributes         Image Pixel attributes missing, out of range, or disagreeing
                                with the pixel data (length, codestream size)
corrupt-pixel-data              the decoder failed on the pixel data
==============================  ===============================================================

Sizes are checked from the header *before* any pixel data is decoded, so a hostile header
(Rows = Columns = 65535 over a few bytes) costs nothing.
"""

from __future__ import annotations

import contextlib
import math
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import pydicom
from pydicom import uid as dicom_uid
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut
from pydicom.pixels.decoders.base import get_decoder

from screener.codes import ReasonCode
from screener.safe_text import quote

__all__ = [
    "read_dataset",
    "DecodeError",
    "DecodeLimits",
    "DecodedImage",
    "DEFAULT_LIMITS",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "decode_dataset",
    "decode_file",
    "pixel_spacing",
]

MIN_SIDE = 128  # kept for callers of the first release; DecodeLimits.min_side is the setting

#: Transfer syntaxes a chest radiograph arrives in, all decoded by pydicom's own native
#: readers or its pylibjpeg / pyjpegls / pillow plugins. Anything else (video, JPIP, JPEG 2000
#: Part 2, private syntaxes) is refused by name rather than attempted.
NATIVE_TRANSFER_SYNTAXES = frozenset(
    {
        dicom_uid.ImplicitVRLittleEndian,
        dicom_uid.ExplicitVRLittleEndian,
        dicom_uid.DeflatedExplicitVRLittleEndian,
        dicom_uid.ExplicitVRBigEndian,  # retired, but old archives still send it
    }
)
_JPEG_FAMILY = frozenset(
    {
        dicom_uid.JPEGBaseline8Bit,
        dicom_uid.JPEGExtended12Bit,
        dicom_uid.JPEGLossless,
        dicom_uid.JPEGLosslessSV1,
        dicom_uid.JPEGLSLossless,
        dicom_uid.JPEGLSNearLossless,
    }
)
_J2K_FAMILY = frozenset(
    {
        dicom_uid.JPEG2000Lossless,
        dicom_uid.JPEG2000,
        dicom_uid.HTJ2KLossless,
        dicom_uid.HTJ2KLosslessRPCL,
        dicom_uid.HTJ2K,
    }
)
ENCAPSULATED_TRANSFER_SYNTAXES = _JPEG_FAMILY | _J2K_FAMILY | frozenset({dicom_uid.RLELossless})
SUPPORTED_TRANSFER_SYNTAXES = NATIVE_TRANSFER_SYNTAXES | ENCAPSULATED_TRANSFER_SYNTAXES
_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR_PREFIXES = ("RGB", "YBR", "PALETTE", "HSV", "ARGB", "CMYK", "XYB")
_STATS_SAMPLE = 1_000_000  # pixels used for percentile statistics (strided, deterministic)
#: A file's window is used only if at least this share of the image falls inside it (not
#: clipped to 0 or 1); below that the window cannot belong to these pixel values.
MIN_WINDOW_INSIDE = 0.10


class DecodeError(ValueError):
    """The image cannot be decoded; ``code`` is a stable reason code for reports and audit."""

    def __init__(self, code: ReasonCode, message: str) -> None:
        super().__init__(message)
        self.code = ReasonCode(code)


@dataclass(frozen=True)
class DecodeLimits:
    """Size limits checked from the header before any pixel data is decoded.

    The defaults cover every chest detector in use (43 x 43 cm at 0.1 mm is ~4300 px a side)
    with room to spare; below 128 px a side there is nothing to measure.
    """

    min_side: int = 128
    max_side: int = 8192
    max_pixels: int = 64_000_000

    def __post_init__(self) -> None:
        for name in ("min_side", "max_side", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DecodeLimits.{name} = {value!r}: must be a whole number >= 1")
        if self.min_side > self.max_side:
            raise ValueError(f"DecodeLimits.min_side ({self.min_side}) is larger than max_side ({self.max_side})")

    @property
    def max_file_bytes(self) -> int:
        """Largest file (or inflated deflate stream) worth reading: 32-bit pixels + 64 MiB of header."""
        return self.max_pixels * 4 + 64 * 2**20


DEFAULT_LIMITS = DecodeLimits()
# Compressed bytes read, and inflated bytes produced, per step of a bounded inflate.
_INFLATE_CHUNK = 1 << 20


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (rows, columns) float32 display values in [0, 1]
    pixel_spacing_mm: tuple[float, float] | None  # (row, column) spacing, None = unknown
    spacing_source: str  # "PixelSpacing", "ImagerPixelSpacing", ... or "unknown"
    photometric: str
    sop_instance_uid: str
    patient_sex: str | None
    transfer_syntax_uid: str = ""
    voi_source: str = ""  # "VOILUTSequence", "WindowCenter/WindowWidth" or "percentile ..."
    valid_mask: np.ndarray | None = None  # (rows, columns) bool, False on pixel padding; None = all valid

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# header helpers


@contextlib.contextmanager
def _as_decode_error(code: str, what: str) -> Iterator[None]:
    """Turn any non-DecodeError raised inside into DecodeError(code) naming ``what`` failed."""
    try:
        yield
    except DecodeError:
        raise
    except MemoryError as exc:
        raise DecodeError(ReasonCode.BAD_SIZE, f"{what}: out of memory ({exc})") from exc
    except Exception as exc:  # pydicom and the codecs raise many types for broken input
        raise DecodeError(code, f"{what}: {type(exc).__name__}: {exc}") from exc


def _tag(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else ""


def _int_attr(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """A required (or defaulted) integer attribute; a missing or non-integer one is named."""
    try:
        value = ds.get(keyword)
    except Exception as exc:
        raise DecodeError(ReasonCode.INCONSISTENT_ATTRIBUTES, f"{keyword} {_tag(keyword)} cannot be read: {exc}") from exc
    if value is None or value == "":
        if default is None:
            raise DecodeError(ReasonCode.INCONSISTENT_ATTRIBUTES, f"{keyword} {_tag(keyword)} is missing")
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise DecodeError(ReasonCode.INCONSISTENT_ATTRIBUTES, f"{keyword} {_tag(keyword)} = {quote(value, 'IS')} is not a whole number") from exc


def _first_float(value: Any) -> float | None:
    """First value of a (possibly multi-valued) DS/IS attribute, None when absent or unusable."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _transfer_syntax(ds: Dataset) -> dicom_uid.UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if not ts:
        raise DecodeError(
            ReasonCode.INCONSISTENT_ATTRIBUTES,
            "TransferSyntaxUID (0002,0010) is missing from the file meta information: the pixel data cannot be interpreted",
        )
    return dicom_uid.UID(str(ts))


def _check_transfer_syntax(ts: dicom_uid.UID) -> None:
    if ts not in SUPPORTED_TRANSFER_SYNTAXES:
        name = ts.name if ts.is_valid and ts.name != str(ts) else "unknown"
        raise DecodeError(
            ReasonCode.UNSUPPORTED_TRANSFER_SYNTAX,
            f"TransferSyntaxUID (0002,0010) = {ts} ({name}) is not a supported still-image transfer syntax",
        )
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise DecodeError(ReasonCode.UNSUPPORTED_TRANSFER_SYNTAX, f"TransferSyntaxUID (0002,0010) = {ts} ({ts.name}): {exc}") from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise DecodeError(
            ReasonCode.UNSUPPORTED_TRANSFER_SYNTAX,
            f"TransferSyntaxUID (0002,0010) = {ts} ({ts.name}): no decoder installed (needs {missing})",
        )


@dataclass(frozen=True)
class _PixelModule:
    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    high_bit: int
    signed: bool
    photometric: str


def _pixel_module(ds: Dataset, limits: DecodeLimits) -> _PixelModule:
    """Validate the Image Pixel module from the header alone (nothing decoded yet)."""
    samples = _int_attr(ds, "SamplesPerPixel", default=1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if samples != 1 or photometric.startswith(_COLOUR_PREFIXES):
        raise DecodeError(
            ReasonCode.COLOUR,
            f"SamplesPerPixel (0028,0002) = {samples}, PhotometricInterpretation (0028,0004) = {quote(photometric, 'CS')}: "
            "only grey (MONOCHROME1/2) radiographs are supported",
        )
    if not photometric:
        raise DecodeError(ReasonCode.INCONSISTENT_ATTRIBUTES, "PhotometricInterpretation (0028,0004) is missing: MONOCHROME1 and MONOCHROME2 display inverted to each other")
    if photometric not in _GREY:
        raise DecodeError(ReasonCode.INCONSISTENT_ATTRIBUTES, f"PhotometricInterpretation (0028,0004) = {quote(photometric, 'CS')} is not a known value")
    frames = _int_attr(ds, "NumberOfFrames", default=1)
    if frames > 1:
        raise DecodeError(ReasonCode.MULTI_FRAME, f"NumberOfFrames (0028,0008) = {frames}: only single-frame images are supported")
    if frames < 1:
        raise DecodeError(ReasonCode.INCONSISTENT_ATTRIBUTES, f"NumberOfFrames (0028,0008) = {frames}: must be at least 1")

    rows, columns = _int_attr(ds, "Rows"), _int_attr(ds, "Columns")
    if min(rows, columns) < limits.min_side:
        raise DecodeError(ReasonCode.BAD_SIZE, f"Rows x Columns = {rows} x {columns}: smaller than the minimum of {limits.min_side} px a side")
    if max(rows, columns) > limits.max_side or rows * columns > limits.max_pixels:
        raise DecodeError(
            ReasonCode.BAD_SIZE,
            f"Rows x Columns = {rows} x {columns}: larger than the limit of {limits.max_side} px a side and {limits.max_pixels} pixels",
        )

    allocated = _int_attr(ds, "BitsAllocated")
    stored = _int_attr(ds, "BitsStored")
    high_bit = _int_attr(ds, "HighBit", default=stored - 1)
    representation = _int_attr(ds, "PixelRepresentation")
    if allocated not in (8, 16, 32):
        raise DecodeError(ReasonCode.INCONSISTENT_ATTRIBUTES, f"BitsAllocated (0028,0100) = {allocated}: a grey radiograph has 8, 16 or 32")
    if not 1 <= stored <= allocated:
        raise DecodeError(ReasonCode.INCONSISTENT_ATTRIBUTES, f"BitsStored (0028,0101) = {stored} with BitsAllocated (0028,0100) = {allocated}: must be 1..BitsAllocated")
    if not stored - 1 <= high_bit <= allocated - 1:
        raise DecodeError(
            ReasonCode.INCONSISTENT_ATTRIBUTES,
            f"HighBit (0028,0102) = {high_bit} with BitsStored = {stored}, BitsAllocated = {allocated}: must be BitsStored-1..BitsAllocated-1",
        )
    if representation not in (0, 1):
        raise DecodeError(ReasonCode.INCONSISTENT_ATTRIBUTES, f"PixelRepresentation (0028,0103) = {representation}: must be 0 or 1")
    return _PixelModule(rows, columns, allocated, stored, high_bit, representation == 1, photometric)


def _check_native_length(ds: Dataset, pm: _PixelModule) -> None:
    expected = pm.rows * pm.columns * pm.bits_allocated // 8
    actual = len(ds.PixelData)
    # PS3.5 8.1.1: odd-length data carries one trailing padding byte; anything else means the
    # header does not describe this pixel data (a truncated file, or wrong Rows/Columns/Bits).
    if actual not in (expected, expected + expected % 2):
        raise DecodeError(
            ReasonCode.INCONSISTENT_ATTRIBUTES,
            f"Pixel Data is {actual} bytes but Rows x Columns x BitsAllocated = {pm.rows} x {pm.columns} x {pm.bits_allocated} "
            f"needs {expected}: the header and the pixel data disagree (wrong attributes or a truncated file)",
        )


def _codestream_size(ts: dicom_uid.UID, frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG/JPEG-LS SOF or J2K SIZ marker; None if not parseable."""
    if ts in _JPEG_FAMILY:
        if frame[:2] != b"\xff\xd8":
            return None
        offset = 2
        while offset + 4 <= len(frame):
            if frame[offset] != 0xFF:
                return None
            marker = frame[offset + 1]
            # SOF0..SOF15 except DHT (C4), JPG (C8), DAC (CC); SOF55 (F7) is JPEG-LS.
            if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
                if offset + 10 > len(frame):
                    return None
                height, width = struct.unpack(">HH", frame[offset + 5 : offset + 9])
                return height, width, frame[offset + 9]
            if marker == 0xDA:  # start of scan before any frame header
                return None
            offset += 2 + struct.unpack(">H", frame[offset + 2 : offset + 4])[0]
        return None
    if ts in _J2K_FAMILY:
        offset = 0
        if frame.startswith(b"\x00\x00\x00\x0cjP  "):  # JP2 wrapper: find the jp2c box
            offset = 12
            while offset + 8 <= len(frame):
                length = struct.unpack(">I", frame[offset : offset + 4])[0]
                if frame[offset + 4 : offset + 8] == b"jp2c":
                    offset += 8
                    break
                if length < 8:
                    return None
                offset += length
        if frame[offset : offset + 4] != b"\xff\x4f\xff\x51" or len(frame) < offset + 42:
            return None
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", frame[offset + 8 : offset + 24])
        csiz = struct.unpack(">H", frame[offset + 40 : offset + 42])[0]
        return ysiz - yosiz, xsiz - xosiz, csiz
    return None


def _check_codestream(ds: Dataset, ts: dicom_uid.UID, pm: _PixelModule) -> None:
    """The first frame's own size must match Rows/Columns: codecs allocate what *it* says."""
    with _as_decode_error(ReasonCode.CORRUPT_PIXEL_DATA, "corrupt pixel data: cannot read the encapsulated frames"):
        frame = next(generate_frames(ds.PixelData, number_of_frames=1), b"")
    if not frame:
        raise DecodeError(ReasonCode.CORRUPT_PIXEL_DATA, "corrupt pixel data: the encapsulated Pixel Data holds no frame")
    size = _codestream_size(ts, frame)
    if size is None:
        if ts in _JPEG_FAMILY or ts in _J2K_FAMILY:
            raise DecodeError(ReasonCode.CORRUPT_PIXEL_DATA, f"corrupt pixel data: no {ts.name} frame header found in the first fragment")
        return
    rows, columns, components = size
    if (rows, columns) != (pm.rows, pm.columns):
        raise DecodeError(
            ReasonCode.INCONSISTENT_ATTRIBUTES,
            f"Rows x Columns = {pm.rows} x {pm.columns} but the {ts.name} codestream is {rows} x {columns}",
        )
    if components != 1:
        raise DecodeError(ReasonCode.INCONSISTENT_ATTRIBUTES, f"SamplesPerPixel = 1 but the {ts.name} codestream has {components} components")


# ---------------------------------------------------------------------------------------------
# pixel value pipeline


def _stored_values(ds: Dataset, ts: dicom_uid.UID, pm: _PixelModule) -> np.ndarray:
    options: dict[str, Any] = {"as_rgb": False}
    shift = pm.high_bit + 1 - pm.bits_stored
    if shift and not ts.is_encapsulated:
        # Data sits above bit 0 (HighBit > BitsStored-1): read through HighBit, then shift down.
        # pydicom masks/sign-extends from bit BitsStored-1, so tell it the top bit is HighBit.
        options["bits_stored"] = pm.high_bit + 1
    with _as_decode_error(ReasonCode.CORRUPT_PIXEL_DATA, "corrupt pixel data"):
        arr, _ = get_decoder(ts).as_array(ds, index=0, **options)
    if arr.shape != (pm.rows, pm.columns):
        raise DecodeError(ReasonCode.CORRUPT_PIXEL_DATA, f"corrupt pixel data: decoded shape {arr.shape} is not Rows x Columns = {pm.rows} x {pm.columns}")
    if shift and not ts.is_encapsulated:
        arr = np.right_shift(arr, shift)  # arithmetic for signed dtypes, so the sign survives
    return arr


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """True where a pixel is padding: PixelPaddingValue, or the range up to PixelPaddingRangeLimit."""
    if "PixelPaddingValue" not in ds:
        return None
    value = _int_attr(ds, "PixelPaddingValue")
    limit = _int_attr(ds, "PixelPaddingRangeLimit", default=value)
    lo, hi = min(value, limit), max(value, limit)
    mask = (stored >= lo) & (stored <= hi)
    return mask if mask.any() else None


def _modality(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    if ds.get("ModalityLUTSequence"):
        with _as_decode_error(ReasonCode.INCONSISTENT_ATTRIBUTES, "ModalityLUTSequence (0028,3000) cannot be applied"):
            return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    values = stored.astype(np.float32)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None and intercept is None:
        return values
    slope_f, intercept_f = _first_float(slope if slope is not None else 1.0), _first_float(intercept if intercept is not None else 0.0)
    if slope_f is None or slope_f == 0.0:
        raise DecodeError(ReasonCode.INCONSISTENT_ATTRIBUTES, f"RescaleSlope (0028,1053) = {quote(slope, 'DS')}: must be a non-zero number")
    if intercept_f is None:
        raise DecodeError(ReasonCode.INCONSISTENT_ATTRIBUTES, f"RescaleIntercept (0028,1052) = {quote(intercept, 'DS')}: must be a number")
    if slope_f != 1.0:
        values *= np.float32(slope_f)
    if intercept_f != 0.0:
        values += np.float32(intercept_f)
    return values


def _lut_table(ds: Dataset, item: Dataset, name: str) -> tuple[int, np.ndarray]:
    """(first mapped input value, LUT entries) of a LUT item; US lists or OW bytes."""
    descriptor = item.get("LUTDescriptor")
    if descriptor is None or len(descriptor) != 3:
        raise DecodeError(ReasonCode.INCONSISTENT_ATTRIBUTES, f"{name} LUTDescriptor (0028,3002) = {descriptor!r}: needs 3 values")
    entries = int(descriptor[0]) or 65536
    first = int(descriptor[1])
    data = item.get("LUTData")
    if data is None:
        raise DecodeError(ReasonCode.INCONSISTENT_ATTRIBUTES, f"{name} LUTData (0028,3006) is missing")
    if isinstance(data, (bytes, bytearray)):
        big = getattr(ds, "original_encoding", (None, True))[1] is False
        table = np.frombuffer(bytes(data), dtype=">u2" if big else "<u2")
    else:
        table = np.asarray(list(data) if not isinstance(data, int) else [data], dtype=np.float64)
    if table.size < entries:
        raise DecodeError(ReasonCode.INCONSISTENT_ATTRIBUTES, f"{name} LUTData has {table.size} entries, LUTDescriptor says {entries}")
    return first, table[:entries].astype(np.float32)


def _voi(ds: Dataset, values: np.ndarray) -> tuple[np.ndarray | None, str]:
    """Display values in [0, 1] from the first VOI LUT, else the first window; (None, why) if neither."""
    if ds.get("VOILUTSequence"):
        with _as_decode_error(ReasonCode.INCONSISTENT_ATTRIBUTES, "VOILUTSequence (0028,3010) cannot be applied"):
            first, table = _lut_table(ds, ds.VOILUTSequence[0], "VOILUTSequence[0]")
            lo, hi = float(table.min()), float(table.max())
            if hi > lo:
                # Normalised by the LUT's own output range, not 2^bits from the descriptor:
                # vendors get the descriptor's bit depth wrong more often than the data.
                index = np.clip(np.rint(values) - first, 0, table.size - 1).astype(np.intp)
                return (table[index] - lo) / (hi - lo), "VOILUTSequence"
    center = _first_float(ds.get("WindowCenter"))
    width = _first_float(ds.get("WindowWidth"))
    if center is None or width is None:
        return None, "percentile 0.5-99.5 (no VOI LUT or window in the file)"
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function == "SIGMOID" and width > 0:
        exponent = np.clip(-4.0 * (values - center) / width, -80.0, 80.0)  # no overflow warnings
        return 1.0 / (1.0 + np.exp(exponent)), "WindowCenter/WindowWidth (SIGMOID)"
    if function == "LINEAR_EXACT" and width > 0:
        return _window(values, center, width), "WindowCenter/WindowWidth (LINEAR_EXACT)"
    if width < 1:  # PS3.3 C.11.2.1.2.1: LINEAR needs WindowWidth >= 1; ignore a broken window
        return None, f"percentile 0.5-99.5 (WindowWidth = {width} is unusable)"
    # PS3.3 C.11.2.1.2.1 LINEAR: the window's edges are c - 0.5 -/+ (w - 1) / 2.
    return _window(values, center - 0.5, max(width - 1.0, 1e-6)), "WindowCenter/WindowWidth"


def _window(values: np.ndarray, offset: float, scale: float) -> np.ndarray:
    """clip((values - offset) / scale + 0.5, 0, 1) in one new array: the same arithmetic as
    the expression, without its three full-size temporaries (a 4-megapixel film: 12 -> 3 ms)."""
    out = values - offset
    out /= scale
    out += 0.5
    return np.clip(out, 0.0, 1.0, out=out)


def _strided(values: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """A deterministic strided sample of the non-padding pixels for statistics."""
    step = max(1, values.size // _STATS_SAMPLE)
    sample = values.ravel()[::step]
    if valid is not None:
        sample = sample[valid.ravel()[::step]]
    if sample.size == 0:  # padding everywhere in the strided sample: fall back to all valid
        sample = values[valid] if valid is not None else values.ravel()
    return sample


def _inside_fraction(pixels: np.ndarray, valid: np.ndarray | None) -> float:
    sample = _strided(pixels, valid)
    return float(((sample > 0.0) & (sample < 1.0)).mean())


def _percentile_window(values: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    lo, hi = np.percentile(_strided(values, valid), [0.5, 99.5])
    return np.clip((values - lo) / max(float(hi - lo), 1e-9), 0.0, 1.0)


def pixel_spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str]:
    """(row, column) spacing in mm in the patient and where it came from, or (None, "unknown")."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and not isinstance(value, (str, bytes)) and len(value) == 2:
            try:
                row, col = float(value[0]), float(value[1])
            except (TypeError, ValueError):
                continue
            if row > 0 and col > 0 and math.isfinite(row) and math.isfinite(col):
                if keyword == "ImagerPixelSpacing":
                    mag = _first_float(ds.get("EstimatedRadiographicMagnificationFactor"))
                    if mag is not None and mag > 0:
                        return (row / mag, col / mag), "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor"
                return (row, col), keyword
    return None, "unknown"


def _decode(ds: Dataset, limits: DecodeLimits) -> DecodedImage:
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        extra = f" (it has {other[0]}, which radiographs do not use)" if other else ""
        raise DecodeError(ReasonCode.NO_PIXEL_DATA, f"the dataset has no Pixel Data (7FE0,0010){extra}")
    ts = _transfer_syntax(ds)
    _check_transfer_syntax(ts)
    pm = _pixel_module(ds, limits)
    with _as_decode_error(ReasonCode.CORRUPT_PIXEL_DATA, "corrupt pixel data: Pixel Data (7FE0,0010) cannot be read"):
        empty = ds.PixelData is None or len(ds.PixelData) == 0
    if empty:
        raise DecodeError(ReasonCode.NO_PIXEL_DATA, "Pixel Data (7FE0,0010) is empty")
    if ts.is_encapsulated:
        _check_codestream(ds, ts, pm)
    else:
        _check_native_length(ds, pm)

    stored = _stored_values(ds, ts, pm)
    padding = _padding_mask(ds, stored)
    valid = ~padding if padding is not None else None
    if valid is not None and not valid.any():
        raise DecodeError(ReasonCode.NO_PIXEL_DATA, "every pixel equals the PixelPaddingValue (0028,0120): there is no image")
    values = _modality(ds, stored)
    del stored
    with _as_decode_error(ReasonCode.INCONSISTENT_ATTRIBUTES, "the VOI LUT / window cannot be applied"):
        pixels, voi_source = _voi(ds, values)
    if pixels is not None:
        inside = _inside_fraction(pixels, valid)
        if inside < MIN_WINDOW_INSIDE:
            # A window that clips nearly every pixel belongs to other data (a vendor default,
            # a rescale that was later dropped): it would hand the detector a blank image.
            pixels, voi_source = None, f"percentile 0.5-99.5 ({voi_source} leaves only {inside:.1%} of pixels unclipped)"
    if pixels is None:
        pixels = _percentile_window(values, valid)
    del values
    pixels = np.asarray(pixels, dtype=np.float32)
    if pm.photometric == "MONOCHROME1":
        pixels = 1.0 - pixels  # MONOCHROME1: high values display dark; we want bright = dense
    if padding is not None:
        pixels[padding] = 0.0  # padding is outside the patient: black, whatever the photometric
    spacing, source = pixel_spacing(ds)
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return DecodedImage(
        pixels=pixels,
        pixel_spacing_mm=spacing,
        spacing_source=source,
        photometric=pm.photometric,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        patient_sex=sex if sex in ("M", "F") else None,
        transfer_syntax_uid=str(ts),
        voi_source=voi_source,
        valid_mask=valid,
    )


def decode_dataset(ds: Dataset, limits: DecodeLimits = DEFAULT_LIMITS) -> DecodedImage:
    """Decode a dataset's single grey frame; raises only :class:`DecodeError`."""
    # Checks raise their own precise codes; this net catches what a check did not foresee
    # (an attribute pydicom cannot convert, a codec error in a LUT) so no raw exception escapes.
    with _as_decode_error(ReasonCode.CORRUPT_PIXEL_DATA, "cannot decode the image"):
        return _decode(ds, limits)


# ---------------------------------------------------------------------------------------------
# files


def inflated_prefix(fp: BinaryIO, limit: int, keep: int = 0) -> bytes | None:
    """Inflate the raw deflate stream at ``fp`` in bounded chunks: its first ``keep`` bytes, or
    None once it inflates past ``limit`` (pydicom would inflate it whole in memory, and a few
    megabytes can inflate to gigabytes). Memory stays at a chunk plus ``keep``.

    The receiver reads a deflated header with it and the decoder checks a deflated file.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    kept = bytearray()
    total = 0
    while not inflater.eof and (chunk := fp.read(_INFLATE_CHUNK)):
        data = chunk
        # After the end of the stream a pad byte stays in unconsumed_tail for ever: stop at eof.
        while data and not inflater.eof:
            out = inflater.decompress(data, _INFLATE_CHUNK)
            total += len(out)
            if len(kept) < keep:
                kept += out[: keep - len(kept)]
            if total > limit:
                return None
            data = inflater.unconsumed_tail
    return bytes(kept)


def _check_deflated_size(path: Path, limits: DecodeLimits) -> None:
    """Inflate a deflated dataset in bounded chunks first: pydicom inflates it all at once."""
    try:
        from pydicom.filereader import _read_file_meta_info, read_preamble
    except ImportError:  # private helper moved: pydicom still reads the file, just unguarded
        return
    with path.open("rb") as fp:
        read_preamble(fp, False)
        _read_file_meta_info(fp)
        if inflated_prefix(fp, limits.max_file_bytes) is None:
            raise DecodeError(ReasonCode.BAD_SIZE,
                              f"{path}: the deflated dataset inflates to more than {limits.max_file_bytes} bytes")


def _decode_png(path: Path, limits: DecodeLimits) -> DecodedImage:
    from PIL import Image

    with _as_decode_error(ReasonCode.UNREADABLE_FILE, f"{path}: not a readable PNG"):
        with Image.open(path) as im:
            width, height = im.size
            if min(width, height) < limits.min_side or max(width, height) > limits.max_side or width * height > limits.max_pixels:
                raise DecodeError(ReasonCode.BAD_SIZE, f"{path}: {height} x {width} px is outside the limits {limits}")
            arr = np.asarray(im.convert("I;16") if im.mode not in ("L", "I;16") else im)
    top = 65535.0 if arr.dtype == np.uint16 else 255.0
    return DecodedImage(pixels=arr.astype(np.float32) / top, pixel_spacing_mm=None, spacing_source="unknown",
                        photometric="MONOCHROME2", sop_instance_uid="", patient_sex=None)


def decode_file(path: str | Path, limits: DecodeLimits = DEFAULT_LIMITS) -> DecodedImage:
    """Decode a DICOM file, or a grey PNG (for site training data without DICOM).

    Raises only :class:`DecodeError`.
    """
    path = Path(path)
    _check_file_size(path, limits)
    if path.suffix.lower() == ".png":
        return _decode_png(path, limits)
    return decode_dataset(read_dataset(path, limits), limits)


def _check_file_size(path: Path, limits: DecodeLimits) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DecodeError(ReasonCode.UNREADABLE_FILE, f"{path}: cannot read the file ({exc})") from exc
    if size > limits.max_file_bytes:
        raise DecodeError(ReasonCode.BAD_SIZE, f"{path}: {size} bytes is larger than any image within the limits ({limits.max_file_bytes} bytes)")


def read_dataset(path: str | Path, limits: DecodeLimits = DEFAULT_LIMITS) -> Dataset:
    """Read a DICOM file with the guards decoding relies on: file size, deflate bombs and
    truncated encapsulated pixel data. Raises only :class:`DecodeError`."""
    path = Path(path)
    _check_file_size(path, limits)
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        if meta.get("TransferSyntaxUID") == dicom_uid.DeflatedExplicitVRLittleEndian:
            _check_deflated_size(path, limits)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path)
    except DecodeError:
        raise
    except OSError as exc:
        raise DecodeError(ReasonCode.UNREADABLE_FILE, f"{path}: cannot read the file ({exc})") from exc
    except MemoryError as exc:
        raise DecodeError(ReasonCode.BAD_SIZE, f"{path}: out of memory while reading ({exc})") from exc
    except Exception as exc:
        raise DecodeError(ReasonCode.NOT_DICOM, f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    truncated = [str(w.message) for w in caught if "End of file" in str(w.message)]
    if truncated and "PixelData" not in ds:
        # pydicom drops an encapsulated Pixel Data element cut off by the end of the file.
        raise DecodeError(ReasonCode.CORRUPT_PIXEL_DATA, f"{path}: corrupt pixel data: the file is truncated ({truncated[0]})")
    return ds
