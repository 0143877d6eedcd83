"""The result image: the radiograph with ROIs, landmarks and the results burned in.

Most PACS viewers (and OHIF) show neither SR coordinates nor presentation states, but every
one of them shows an image. This Secondary Capture puts the source radiograph (as displayed,
reduced to at most :data:`MAX_SIDE` pixels) beside a results panel: BMD and T-score per
lumbar site, the WHO category, the model, the caveats and, for a demo model, a red banner.
The picture is never shown over anatomy: the panel is added to the right of the film.

It is a new instance in the source's study, in its own series, marked as derived
(ImageType DERIVED\\SECONDARY, Source Image Sequence, Derivation Description, Burned In
Annotation YES) and as lossy (JPEG baseline: it is a picture for reading the result, not a
copy of the radiograph for diagnosis). UIDs are deterministic, as for the SR.
"""

from __future__ import annotations

import datetime
import io
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

from screener.pipeline.estimate import BmdEstimate
from screener.pipeline.rois import LOCAL_ROI_NAMES
from screener.report.common import new_instance, source_reference
from screener.report.sr import MANUFACTURER, report_uids, source_header
from screener.report.text import (
    DEMO_PREFIX,
    NOT_FOR_DIAGNOSIS,
    ROI_SHORT_LABELS,
    category_text,
    result_rows,
)

__all__ = [
    "RESULT_IMAGE_SERIES_NUMBER",
    "MAX_SIDE",
    "render_film",
    "render_result",
    "build_result_image",
    "font",
]

RESULT_IMAGE_SERIES_NUMBER = 9903
#: Longer side of the film part of the picture: legible on a reading monitor, small in PACS.
MAX_SIDE = 2048
JPEG_QUALITY = 90

ROI_COLOUR = {
    "left_clavicle": (255, 200, 0), "right_clavicle": (255, 200, 0),
    "left_ribcage": (0, 210, 255), "right_ribcage": (0, 210, 255),
    "cervical_spine": (255, 90, 255), "t12": (255, 90, 255),
}
LANDMARK_COLOUR = (255, 60, 60)
DEMO_RED = (200, 0, 0)

@lru_cache(maxsize=64)
def font(size: int, bold: bool = False, mono: bool = False) -> ImageFont.FreeTypeFont:
    """DejaVu Sans (or Sans Mono) as matplotlib ships it: the same face everywhere, no system
    fonts needed."""
    import matplotlib

    name = "DejaVuSans" + ("Mono" if mono else "") + ("-Bold" if bold else "") + ".ttf"
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), max(8, int(size)))


def _film(pixels: np.ndarray, max_side: int) -> tuple[Image.Image, float]:
    """The displayed radiograph as RGB, reduced to ``max_side``; returns it and the scale."""
    h, w = pixels.shape
    scale = min(1.0, max_side / max(h, w))
    grey = np.clip(pixels, 0.0, 1.0)  # round(clip(p) * 255) in one temporary: full-size passes add up
    grey *= 255
    img = Image.fromarray(np.round(grey, out=grey).astype(np.uint8))
    if scale < 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
    return img.convert("RGB"), scale


def _panel_lines(estimate: BmdEstimate) -> list[tuple[str, str, tuple[int, int, int]]]:
    """(text, style, colour) lines of the results panel; style: title, head, body, small."""
    algo = estimate.algorithm
    white, grey = (255, 255, 255), (190, 190, 190)
    lines: list[tuple[str, str, tuple[int, int, int]]] = [
        ("Lumbar BMD estimate", "title", white),
        ("from this chest radiograph", "body", grey),
        ("", "body", white),
        (f"{'Site':<7}{'BMD g/cm2':>10}{'T-score':>9}", "head", white),
    ]
    for row in result_rows(estimate):
        lines.append((f"{row.site:<7}{row.bmd_text:>10}{row.tscore_text:>9}", "mono", white))
    if estimate.tscores.tscore is None:
        lines.append(("No T-score: patient sex unknown.", "small", grey))
    lines += [
        ("", "body", white),
        ("WHO category (L1-L4):", "body", grey),
        (category_text(estimate), "title", white),
        ("", "body", white),
        ("Software estimate, not DXA.", "body", white),
        (NOT_FOR_DIAGNOSIS + ".", "body", white),
        ("", "body", white),
        (f"Model: {algo.name} {algo.version}", "small", grey),
        (f"{MANUFACTURER}", "small", grey),
    ]
    return lines


def render_film(pixels: np.ndarray, estimate: BmdEstimate, max_side: int = MAX_SIDE) -> tuple[Image.Image, float]:
    """The film with the labelled ROI outlines and the landmarks; returns it and its scale."""
    film, scale = _film(pixels, max_side)
    fw, fh = film.size
    unit = max(fw, fh) / 1000.0  # drawing sizes scale with the picture
    draw = ImageDraw.Draw(film)

    def px(xy: np.ndarray) -> list[tuple[float, float]]:
        # pipeline coordinates put the top-left pixel centre at (0, 0)
        return [((x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5) for x, y in np.asarray(xy, float).reshape(-1, 2)]

    label_font = font(round(14 * unit), bold=True)
    for name, quad in zip(estimate.rois.names, estimate.rois.corners):
        if name not in LOCAL_ROI_NAMES:
            continue
        corners = px(quad)
        colour = ROI_COLOUR[name]
        draw.line(corners + corners[:1], fill=colour, width=max(2, round(2.5 * unit)))
        top = min(corners, key=lambda p: (p[1], p[0]))
        label = ROI_SHORT_LABELS[name]
        left, _, right, bottom = draw.textbbox((0, 0), label, font=label_font, anchor="ld")
        # above the box's top corner, kept on the film (a box can reach past its edge)
        x = min(max(top[0], -left), fw - right)
        y = min(max(top[1] - 3 * unit, label_font.size * 1.2), fh - bottom)
        draw.text((x, y), label, fill=colour, font=label_font, anchor="ld",
                  stroke_width=max(1, round(unit)), stroke_fill=(0, 0, 0))
    r = max(3.0, 4.0 * unit)
    for x, y in px(estimate.landmarks.points):
        draw.ellipse([x - r, y - r, x + r, y + r], outline=LANDMARK_COLOUR, width=max(1, round(1.5 * unit)))
    return film, scale


def render_result(pixels: np.ndarray, estimate: BmdEstimate, max_side: int = MAX_SIDE) -> Image.Image:
    """The picture of the result image: the film (render_film) with the results panel right."""
    film, _ = render_film(pixels, estimate, max_side)
    fw, fh = film.size
    panel_w = max(420, round(0.42 * fw))
    size = panel_w / 24.0  # about 24 characters of body text across the panel
    picture = Image.new("RGB", (fw + panel_w, max(fh, round(size * 30))), (0, 0, 0))
    picture.paste(film, (0, 0))
    draw = ImageDraw.Draw(picture)
    x, y = fw + size, size
    if estimate.demo:
        banner_h = size * 3.2
        draw.rectangle([fw, 0, fw + panel_w, banner_h], fill=DEMO_RED)
        draw.text((x, size * 0.5), "DEMO MODEL", fill=(255, 255, 255), font=font(round(size * 1.2), True))
        draw.text((x, size * 1.9), DEMO_PREFIX.split(" - ", 1)[1].rstrip("."), fill=(255, 255, 255),
                  font=font(round(size * 0.85), True))
        y = banner_h + size
    styles = {
        "title": (font(round(size * 1.15), True), 1.5),
        "head": (font(round(size * 0.95), True, mono=True), 1.35),
        "mono": (font(round(size * 0.95), mono=True), 1.3),
        "body": (font(round(size * 0.85)), 1.3),
        "small": (font(round(size * 0.7)), 1.3),
    }
    for text, style, colour in _panel_lines(estimate):
        face, spacing = styles[style]
        if text:
            draw.text((x, y), text, fill=colour, font=face)
        y += face.size * spacing
    return picture


def _jpeg(picture: Image.Image) -> bytes:
    out = io.BytesIO()
    # 4:2:0 would smear the coloured outlines and small text; 4:2:2 is what DICOM names here.
    picture.save(out, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:2", optimize=False)
    return out.getvalue()


def build_result_image(
    source: Dataset,
    estimate: BmdEstimate,
    pixels: np.ndarray,
    *,
    institution_name: str | None = None,
    now: datetime.datetime | None = None,
) -> Dataset:
    """The Secondary Capture result image for ``estimate`` on ``source``; ``pixels`` are the
    decoded display values of the source (``DecodedImage.pixels``)."""
    now = now if now is not None else datetime.datetime.now().astimezone()
    header = source_header(source)
    uids = report_uids(header.SOPInstanceUID, estimate.model_id)
    picture = render_result(pixels, estimate)
    frame = _jpeg(picture)

    ds = new_instance(header, estimate, sop_class_uid=SecondaryCaptureImageStorage,
                      sop_instance_uid=uids.image_instance_uid, series_instance_uid=uids.image_series_uid,
                      series_number=RESULT_IMAGE_SERIES_NUMBER, series_description="BMD result image",
                      modality="OT", transfer_syntax_uid=JPEGBaseline8Bit, now=now,
                      institution_name=institution_name)
    ds.Laterality = header.get("Laterality", "") or ""  # type 2C in the SC's General Series
    ds.PatientOrientation = header.get("PatientOrientation", "") or ""
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.RecognizableVisualFeatures = "NO"
    ds.DerivationDescription = (
        f"{NOT_FOR_DIAGNOSIS}. Source radiograph with BMD estimate ROIs, landmarks and results by "
        f"{estimate.algorithm.name} {estimate.algorithm.version}"
        + ("; DEMO model, not for clinical use" if estimate.demo else "")
    )[:1024]
    ds.ImageComments = ds.DerivationDescription
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.LossyImageCompressionRatio = round(picture.width * picture.height * 3 / len(frame), 2)
    ds.SourceImageSequence = [source_reference(header)]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = picture.height, picture.width
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return ds
