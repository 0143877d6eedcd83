"""A Grayscale Softcopy Presentation State that draws the result on the source image.

Many viewers and PACS (Weasis, most web PACS) do not render SR spatial coordinates but do
apply a GSPS: this object shows the six ROI outlines, the sixteen landmarks and one line of
text with the L1-L4 result, in three graphic layers that a reader can switch off.

Coordinates follow :mod:`screener.report.sr`: pipeline (x, y) + 0.5 = DICOM PIXEL (column,
row). ROI graphics carry the same Tracking UID as the matching SR measurement group, so a
viewer that reads both can link them. The display (VOI window, polarity) follows the source so
that the image looks as it does without the overlay.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import numpy as np
from highdicom import PresentationLUTTransformation
from highdicom.color import CIELabColor
from highdicom.enum import PresentationLUTShapeValues
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    SoftcopyVOILUTTransformation,
    TextJustificationValues,
    TextObject,
)
from pydicom.dataset import Dataset

from screener.pipeline.estimate import BmdEstimate
from screener.pipeline.rois import LOCAL_ROI_NAMES
from screener.report import encoding as enc
from screener.report.sr import (
    MANUFACTURER,
    MODEL_NAME,
    UTF8,
    closed_roi_outline,
    landmark_circle,
    report_uids,
    software_versions,
    source_header,
    stamp_creation,
    summary_text,
    tracking_uid,
)

__all__ = ["build_gsps", "PR_SERIES_NUMBER", "LAYER_ROIS", "LAYER_LANDMARKS", "LAYER_TEXT"]

PR_SERIES_NUMBER = 9902
LAYER_ROIS = "BMD_ROIS"
LAYER_LANDMARKS = "BMD_LANDMARKS"
LAYER_TEXT = "BMD_SUMMARY"
#: Landmark circle radius as a share of the longer image side (about 6 px on a 2k image).
LANDMARK_RADIUS = 0.003
#: Where the summary line sits, in DISPLAY units (fraction of the displayed area).
TEXT_BOX = (0.01, 0.01, 0.99, 0.05)
#: Recommended grayscale value of every layer: white (P-value 0xFFFF).
LAYER_GREY = 0xFFFF


def _layer(name: str, order: int, description: str, colour: CIELabColor) -> GraphicLayer:
    """A graphic layer with a recommended colour, and white for grayscale-only displays."""
    layer = GraphicLayer(name, order=order, description=description, display_color=colour)
    layer.GraphicLayerRecommendedDisplayGrayscaleValue = LAYER_GREY
    return layer


@dataclass(frozen=True)
class _Graphic:
    """One outline or circle of the overlay, in DICOM pixel coordinates."""

    graphic_type: GraphicTypeValues
    points: np.ndarray
    tracking_id: str | None = None
    tracking_uid: str | None = None


def _roi_graphics(header: Dataset, estimate: BmdEstimate) -> list[_Graphic]:
    columns, rows = int(header.Columns), int(header.Rows)
    graphics = []
    for name, quad in zip(estimate.rois.names, estimate.rois.corners):
        if name not in LOCAL_ROI_NAMES:
            continue
        outline = closed_roi_outline(quad, columns, rows)
        if outline is None:
            continue
        identifier = f"ROI {name}"
        graphics.append(_Graphic(GraphicTypeValues.POLYLINE, outline, identifier,
                                 tracking_uid(header.SOPInstanceUID, estimate.model_id, identifier)))
    return graphics


def _landmark_graphics(header: Dataset, estimate: BmdEstimate) -> list[_Graphic]:
    """Small circles: a POINT is drawn as a single pixel or not at all by many viewers."""
    columns, rows = int(header.Columns), int(header.Rows)
    radius = max(2.0, LANDMARK_RADIUS * max(columns, rows))
    return [_Graphic(GraphicTypeValues.CIRCLE, landmark_circle(xy, radius, columns, rows)) for xy in estimate.landmarks.points]


def _hd_annotations(header: Dataset, layers: list[GraphicLayer], graphics: list[list[_Graphic]],
                    text: str) -> list[GraphicAnnotation]:
    """The annotations as highdicom builds them (the reference for :func:`_annotation_bytes`)."""
    annotations = [
        GraphicAnnotation([header], layer, graphic_objects=[
            GraphicObject(graphic_type=g.graphic_type, graphic_data=g.points, units=AnnotationUnitsValues.PIXEL,
                          tracking_id=g.tracking_id, tracking_uid=g.tracking_uid) for g in objects])
        for layer, objects in zip(layers, graphics) if objects
    ]
    annotations.append(GraphicAnnotation([header], layers[len(graphics)], text_objects=[TextObject(
        text_value=text, units=AnnotationUnitsValues.DISPLAY, bounding_box=TEXT_BOX,
        text_justification=TextJustificationValues.LEFT)]))
    return annotations


def _annotation_bytes(header: Dataset, layers: list[GraphicLayer], graphics: list[list[_Graphic]], text: str) -> bytes:
    """The same annotations written directly: highdicom checks every referenced image against
    the standard's IOD tables for each annotation, most of the GSPS's time."""
    reference = enc.sop_reference(0x00081140, str(header.SOPClassUID), str(header.SOPInstanceUID))

    def graphic(g: _Graphic) -> bytes:
        elements = [(0x00700005, enc.text(0x00700005, "CS", "PIXEL")), (0x00700020, enc.us(0x00700020, 2)),
                    (0x00700021, enc.us(0x00700021, len(g.points))), (0x00700022, enc.fl(0x00700022, g.points)),
                    (0x00700023, enc.text(0x00700023, "CS", g.graphic_type.value)),
                    (0x00700024, enc.text(0x00700024, "CS", "N"))]
        if g.tracking_id is not None and g.tracking_uid is not None:
            elements += [(0x00620020, enc.text(0x00620020, "UT", g.tracking_id)),
                         (0x00620021, enc.text(0x00620021, "UI", g.tracking_uid))]
        return enc.item(*elements)

    items = [enc.item(reference, (0x00700002, enc.text(0x00700002, "CS", layer.GraphicLayer)),
                      (0x00700009, enc.sequence(0x00700009, [graphic(g) for g in objects])))
             for layer, objects in zip(layers, graphics) if objects]
    text_object = enc.item((0x00700003, enc.text(0x00700003, "CS", "DISPLAY")),
                           (0x00700006, enc.text(0x00700006, "ST", text)),
                           (0x00700010, enc.fl(0x00700010, np.array(TEXT_BOX[:2]))),
                           (0x00700011, enc.fl(0x00700011, np.array(TEXT_BOX[2:]))),
                           (0x00700012, enc.text(0x00700012, "CS", "LEFT")))
    items.append(enc.item(reference, (0x00700002, enc.text(0x00700002, "CS", layers[len(graphics)].GraphicLayer)),
                          (0x00700008, enc.sequence(0x00700008, [text_object]))))
    return b"".join(items)


def _voi(source: Dataset) -> list[SoftcopyVOILUTTransformation] | None:
    """The source's own window when it has one (highdicom copies it); else one from the pixels.

    Without any VOI a viewer maps the full stored range, which for CR is mostly unused and
    gives a washed-out image; the 0.5-99.5 percentile window matches what the pipeline sees.
    """
    if "WindowCenter" in source or "VOILUTSequence" in source:
        return None
    try:
        from pydicom.pixels import apply_modality_lut

        values = apply_modality_lut(source.pixel_array, source).astype(np.float64)
    except Exception:  # no or undecodable pixel data: leave the viewer's default
        return None
    low, high = np.percentile(values, [0.5, 99.5])
    width = max(float(high - low), 1.0)
    return [SoftcopyVOILUTTransformation(window_center=float(low + high) / 2.0, window_width=width)]


def _presentation_lut(source: Dataset) -> PresentationLUTTransformation:
    """A GSPS replaces the image's polarity: MONOCHROME1 must be inverted to look as intended."""
    inverse = str(source.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    shape = PresentationLUTShapeValues.INVERSE if inverse else PresentationLUTShapeValues.IDENTITY
    return PresentationLUTTransformation(presentation_lut_shape=shape)


def build_gsps(
    source: Dataset,
    estimate: BmdEstimate,
    *,
    now: datetime.datetime | None = None,
    institution_name: str | None = None,
    full_check: bool = False,
) -> GrayscaleSoftcopyPresentationState:
    """GSPS over ``source`` with ROI outlines, landmarks and the one-line summary.

    ``now`` fixes every date and time in the object (tests pass a constant). The graphic
    annotations are written directly (:mod:`screener.report.encoding`); ``full_check=True``
    builds them with highdicom's checked classes instead, to the same bytes (a test compares).
    """
    now = now if now is not None else datetime.datetime.now().astimezone()
    header = source_header(source)
    if int(header.get("SamplesPerPixel", 1)) != 1:
        raise ValueError("source SamplesPerPixel (0028,0002) must be 1 for a grayscale presentation state")
    for keyword, tag in (("Rows", "(0028,0010)"), ("Columns", "(0028,0011)")):
        if keyword not in header:
            raise ValueError(f"source dataset has no {keyword} {tag}: cannot place graphics on it")
    uids = report_uids(header.SOPInstanceUID, estimate.model_id)

    layers = [
        _layer(LAYER_ROIS, 1, "ROIs used by the BMD model", CIELabColor(97.1, -21.6, 94.5)),  # yellow
        _layer(LAYER_LANDMARKS, 2, "Anatomical landmarks", CIELabColor(91.1, -48.1, -14.1)),  # cyan
        _layer(LAYER_TEXT, 3, "BMD estimate summary", CIELabColor(100.0, 0.0, 0.0)),  # white
    ]
    graphics = [_roi_graphics(header, estimate), _landmark_graphics(header, estimate)]
    text = summary_text(estimate)
    description = "CXR BMD estimate overlay" + (" (DEMO, not for clinical use)" if estimate.demo else "")
    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=[header],
        series_instance_uid=uids.pr_series_uid,
        series_number=PR_SERIES_NUMBER,
        sop_instance_uid=uids.pr_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=software_versions(estimate.algorithm),
        device_serial_number="",
        content_label="BMD_DEMO" if estimate.demo else "BMD_ESTIMATE",  # CS, 16 chars
        content_description=description,
        graphic_annotations=_hd_annotations(header, layers, graphics, text) if full_check else None,
        graphic_layers=layers,
        institution_name=institution_name,
        voi_lut_transformations=_voi(source),
        presentation_lut_transformation=_presentation_lut(source),
        series_description="BMD estimate overlay (DEMO)" if estimate.demo else "BMD estimate overlay",
        series_date=now.date(),
        series_time=now.time().replace(microsecond=0, tzinfo=None),
    )
    _copy_body_part(header, gsps)
    stamp_creation(gsps, now)
    gsps.PresentationCreationDate = now.strftime("%Y%m%d")
    gsps.PresentationCreationTime = now.strftime("%H%M%S")
    gsps.SpecificCharacterSet = UTF8  # as the SR (sr.build_sr)
    if not full_check:
        enc.set_raw_sequence(gsps, "GraphicAnnotationSequence",
                             _annotation_bytes(header, layers, graphics, text))
    return gsps


def _copy_body_part(header: Dataset, gsps: Dataset) -> None:
    """General Series Laterality is 2C: needed for paired body parts, absent for unpaired ones.

    Copying the source's Body Part Examined (a chest is unpaired) and Laterality lets readers
    and validators decide; when the source says neither, Laterality is present and empty,
    which is what the standard allows when it is unknown.
    """
    for keyword in ("BodyPartExamined", "Laterality"):
        if str(header.get(keyword, "") or "").strip():
            setattr(gsps, keyword, header[keyword].value)
    if "BodyPartExamined" not in gsps and "Laterality" not in gsps:
        gsps.Laterality = ""
