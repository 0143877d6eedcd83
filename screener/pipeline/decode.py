"""DICOM (or PNG) radiograph -> display-value grey image that keeps the source geometry.

Display values are floats in [0, 1], bright = dense (bone), whatever the source's photometric
interpretation: modality LUT, then the VOI LUT or window when the file carries one (else a
robust percentile window), then MONOCHROME1 inversion. The pixel grid is the source's, so
points found on the decoded image are source pixel coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

__all__ = ["DecodeError", "DecodedImage", "decode_dataset", "decode_file"]

MIN_SIDE = 128


class DecodeError(ValueError):
    """The image cannot be decoded; ``code`` is a stable reason code for reports and audit."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (rows, columns) float32 display values in [0, 1]
    pixel_spacing_mm: tuple[float, float] | None  # (row, column) spacing, None = unknown
    spacing_source: str  # "PixelSpacing", "ImagerPixelSpacing", ... or "unknown"
    photometric: str
    sop_instance_uid: str
    patient_sex: str | None
    patient_age_years: float | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape  # type: ignore[return-value]


def _spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            try:
                row, col = float(value[0]), float(value[1])
            except (TypeError, ValueError):
                continue
            if row > 0 and col > 0:
                if keyword == "ImagerPixelSpacing" and ds.get("EstimatedRadiographicMagnificationFactor"):
                    mag = float(ds.EstimatedRadiographicMagnificationFactor)
                    if mag > 0:
                        return (row / mag, col / mag), "ImagerPixelSpacing/EstimatedRadiographicMagnificationFactor"
                return (row, col), keyword
    return None, "unknown"


def _age_years(ds: Dataset) -> float | None:
    text = str(ds.get("PatientAge", "") or "").strip().upper()
    if len(text) == 4 and text[:3].isdigit() and text[3] in "DWMY":
        return int(text[:3]) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[text[3]]
    return None


def decode_dataset(ds: Dataset) -> DecodedImage:
    if "PixelData" not in ds:
        raise DecodeError("no-pixel-data", "the dataset has no Pixel Data (7FE0,0010)")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DecodeError("colour", f"SamplesPerPixel is {ds.SamplesPerPixel}: only grey radiographs are supported")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise DecodeError("multi-frame", f"NumberOfFrames is {ds.NumberOfFrames}: only single-frame images are supported")
    try:
        raw = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for broken codestreams
        raise DecodeError("corrupt-pixel-data", f"corrupt pixel data: {exc}") from exc
    if raw.ndim != 2 or min(raw.shape) < MIN_SIDE:
        raise DecodeError("bad-size", f"image shape {raw.shape} is not a 2-D radiograph of at least {MIN_SIDE} px")
    values = apply_modality_lut(raw, ds).astype(np.float64)
    has_voi = "WindowCenter" in ds or "VOILUTSequence" in ds
    if has_voi:
        values = apply_voi_lut(values, ds, prefer_lut=True).astype(np.float64)
    lo, hi = np.percentile(values, [0.0, 100.0] if has_voi else [0.5, 99.5])
    pixels = np.clip((values - lo) / max(hi - lo, 1e-9), 0.0, 1.0)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels
    spacing, source = _spacing(ds)
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return DecodedImage(
        pixels=pixels.astype(np.float32),
        pixel_spacing_mm=spacing,
        spacing_source=source,
        photometric=photometric,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        patient_sex=sex if sex in ("M", "F") else None,
        patient_age_years=_age_years(ds),
    )


def decode_file(path: str | Path) -> DecodedImage:
    """Decode a DICOM file, or a grey PNG (for site training data without DICOM)."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("I;16") if im.mode not in ("L", "I;16") else im)
        top = 65535.0 if arr.dtype == np.uint16 else 255.0
        return DecodedImage(arr.astype(np.float32) / top, None, "unknown", "MONOCHROME2", "", None, None)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise DecodeError("not-dicom", f"{path}: not a readable DICOM file ({exc})") from exc
    return decode_dataset(ds)
