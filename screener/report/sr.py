"""The DICOM Structured Report for one BMD estimate (TID 1500, Comprehensive 3D SR).

What the SR says is fixed by METHOD.md section 6; how it is laid out so that viewers (OHIF 3)
draw it, and the IHE AI Results checklist it meets, are in docs/viewers.md. The tree::

    Imaging Measurement Report (DCM 126000), procedure reported: Imaging procedure (SCT 363679005)
      Observation context: device observer = the algorithm (its Device UID follows the model)
      Image Library (TID 1600): the source film
      Imaging Measurements (DCM 126010)
        5 x TID 1501: L1, L2, L3, L4, L1-L4 (finding site), BMD (LN 24966-4, g/cm2) and T-score
            (LN 38267-1, {T-score}) each INFERRED FROM a marker on the right image edge; the
            L1-L4 group adds the WHO category; TEXT lines name the site (what viewers print)
        6 x TID 1501: each local ROI, its Area INFERRED FROM its closed outline, named by TEXT
        16 x TID 1410: each landmark as a small CIRCLE, named by its Finding (private code)
      Qualitative Evaluations (UMLS C0034375)
        Comment: estimated from a chest radiograph by software, not a DXA measurement
        Comment: DEMO MODEL - NOT FOR CLINICAL USE ...  (demo bundles only)
        Comment: why there is no T-score             (patient sex unknown only)

The demo statement also goes into SeriesDescription and the GSPS text line, so that it shows
in PACS series lists and on the image, not only to those who open the SR.

Spatial coordinates: the pipeline puts the centre of the top-left pixel at (0, 0); DICOM SCOORD
and presentation-state PIXEL coordinates put it at (0.5, 0.5), so every point gets +0.5.

How it is written: highdicom builds the document and the root's context and Image Library;
the measurement tree is written straight to bytes by :class:`_Writer` (screener.report.encoding),
because building ~870 checked items and walking them with pydicom's writer took 0.4 s an
image. ``build_sr(full_check=True)`` builds the same tree with highdicom's classes, and a test
holds the two to the same bytes: highdicom stays the definition, the writer the fast way.

Every UID is derived from (source SOP Instance UID, model id, what the UID names), so that
processing the same image with the same model again produces a byte-identical object (given
the same ``now``) that a PACS recognises as a duplicate.
"""

from __future__ import annotations

import copy
import datetime
import functools
import uuid
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
import pydicom.config
import pydicom.tag
import pydicom.valuerep
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr.templates import DEFAULT_LANGUAGE
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    ImageContentItem,
    NumContentItem,
    Comprehensive3DSR,
    ContainerContentItem,
    CoordinatesForMeasurement,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageRegion,
    LanguageOfContentItemAndDescendants,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

import screener
from screener.pipeline.decode import pixel_spacing
from screener.pipeline.estimate import AlgorithmInfo, BmdEstimate
from screener.pipeline.landmarks import LANDMARK_NAMES
from screener.pipeline.rois import LOCAL_ROI_NAMES
from screener.pipeline.tscore import SITES, WhoCategory
from screener.report import encoding as enc
from screener.report.text import DEMO_PREFIX, ESTIMATE_STATEMENT, ROI_LABELS, statements, summary_text

__all__ = [
    "ReportUids",
    "report_uids",
    "tracking_uid",
    "build_sr",
    "source_header",
    "dicom_points",
    "clip_polygon",
    "closed_roi_outline",
    "clip_point",
    "landmark_circle",
    "summary_text",
    "stamp_creation",
    "device_uid",
    "algorithm_equipment",
    "bmd_marker",
    "densify",
    "ESTIMATE_STATEMENT",
    "DEMO_PREFIX",
    "SR_SERIES_NUMBER",
    "MANUFACTURER",
    "MODEL_NAME",
    "SITE_CODES",
    "WHO_CODES",
    "ROI_FINDING_SITES",
    "BMD_CONCEPT",
    "TSCORE_CONCEPT",
]

SR_SERIES_NUMBER = 9901
#: Specific Character Set of everything the node writes.
UTF8 = "ISO_IR 192"
MANUFACTURER = screener.MANUFACTURER
MODEL_NAME = "cxr-bmd-screener"

#: Fixed namespace for our uuid5-derived UIDs. Never change it: that would change every UID
#: and make PACS store re-processed results as new objects.
UID_NAMESPACE = uuid.UUID("355decaa-349a-488c-8351-3a08897e5c94")

# --- codes. DCM and SCT codes that DICOM PS3.16 lists (anatomy, Normal, Imaging procedure,
# Comment, Clinical Interpretation) match pydicom's PS3.16 dictionary (a test checks it);
# Osteopenia/Osteoporosis (SNOMED CT disorders) and the two LOINC codes are not in DICOM and were
# checked against public SNOMED CT / LOINC tables. DICOM's anatomy list (CID 4) has no "rib
# cage", so the rib-cage ROIs use Rib (113197003) with laterality.
# Code Meanings are display text (PS3.3 8.3), not matched on: LOINC's long names ("DXA Lumbar
# spine [Mass/Area] Bone density") run off the side of a viewer's text box and say "DXA" of a
# value that is not one, so the meanings are short. The codes are LOINC's.
BMD_CONCEPT = Code("24966-4", "LN", "Lumbar spine BMD")
TSCORE_CONCEPT = Code("38267-1", "LN", "T-score")
G_PER_CM2 = Code("g/cm2", "UCUM", "g/cm2")
T_SCORE_UNIT = Code("{T-score}", "UCUM", "T-score")
IMAGING_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
IMAGING_MEASUREMENTS_CODE = "126010"  # the container highdicom writes for imaging_measurements
COMMENT = Code("121106", "DCM", "Comment")
#: Concept name of the WHO category (a qualitative evaluation of the L1-L4 T-score).
WHO_CATEGORY_CONCEPT = Code("122147", "DCM", "Clinical Interpretation")

SITE_CODES: dict[str, Code] = {
    "L1": Code("66794005", "SCT", "L1 vertebra"),
    "L2": Code("14293000", "SCT", "L2 vertebra"),
    "L3": Code("36470004", "SCT", "L3 vertebra"),
    "L4": Code("11994002", "SCT", "L4 vertebra"),
    "L1-L4": Code("122496007", "SCT", "Lumbar spine"),
}
WHO_CODES: dict[WhoCategory, Code] = {
    WhoCategory.NORMAL: Code("17621005", "SCT", "Normal"),
    WhoCategory.OSTEOPENIA: Code("312894000", "SCT", "Osteopenia"),
    WhoCategory.OSTEOPOROSIS: Code("64859006", "SCT", "Osteoporosis"),
}
LEFT = Code("7771000", "SCT", "Left")
RIGHT = Code("24028007", "SCT", "Right")
#: Anatomy of each local ROI: (finding site, laterality). Left/right are the patient's.
ROI_FINDING_SITES: dict[str, tuple[Code, Code | None]] = {
    "left_clavicle": (Code("51299004", "SCT", "Clavicle"), LEFT),
    "right_clavicle": (Code("51299004", "SCT", "Clavicle"), RIGHT),
    "cervical_spine": (Code("122494005", "SCT", "Cervical spine"), None),
    "left_ribcage": (Code("113197003", "SCT", "Rib"), LEFT),
    "right_ribcage": (Code("113197003", "SCT", "Rib"), RIGHT),
    "t12": (Code("23215003", "SCT", "T12 vertebra"), None),
}

#: Private coding scheme for the landmark names (DICOM has no codes for these points).
LANDMARK_SCHEME_DESIGNATOR = "99CXRBMD"



# --------------------------------------------------------------------------- UIDs


def _uid(*parts: str) -> str:
    """``2.25.<uuid5>``: a UID that is a pure function of its parts (PS3.5 B.2)."""
    return "2.25." + str(uuid.uuid5(UID_NAMESPACE, "\x1f".join(parts)).int)


@dataclass(frozen=True)
class ReportUids:
    """UIDs of everything the report stage writes for one (source image, model).

    Series are per (source SOP instance, model), not per source series: each source image is
    processed independently (possibly by different workers, in any order) and the
    deterministic-UID promise must not depend on which other images of a series were seen.
    """

    sr_series_uid: str
    sr_instance_uid: str
    pr_series_uid: str
    pr_instance_uid: str
    image_series_uid: str
    image_instance_uid: str
    pdf_series_uid: str
    pdf_instance_uid: str


def report_uids(source_sop_instance_uid: str, model_id: str) -> ReportUids:
    """Deterministic UIDs: the same image and model always give the same UIDs for every object."""
    if not source_sop_instance_uid:
        raise ValueError("report_uids needs the source SOPInstanceUID (0008,0018)")
    if not model_id:
        raise ValueError("report_uids needs a model id")
    key = (str(source_sop_instance_uid), str(model_id))
    return ReportUids(
        sr_series_uid=_uid(*key, "sr-series"),
        sr_instance_uid=_uid(*key, "sr-instance"),
        pr_series_uid=_uid(*key, "pr-series"),
        pr_instance_uid=_uid(*key, "pr-instance"),
        image_series_uid=_uid(*key, "image-series"),
        image_instance_uid=_uid(*key, "image-instance"),
        pdf_series_uid=_uid(*key, "pdf-series"),
        pdf_instance_uid=_uid(*key, "pdf-instance"),
    )


def tracking_uid(source_sop_instance_uid: str, model_id: str, tracking_identifier: str) -> str:
    """Tracking UID of one measurement group; the GSPS graphic of the same ROI shares it."""
    return _uid(str(source_sop_instance_uid), str(model_id), "tracking", tracking_identifier)


def device_uid(algo: AlgorithmInfo) -> str:
    """Device UID of the algorithm (IHE AIR): one per model id, so it changes with the weights."""
    return _uid("device", MANUFACTURER, algo.model_id)


# --------------------------------------------------------------------------- source header

#: Type 1 in the source: without these no reference to the image can be made.
_REQUIRED = (
    ("SOPClassUID", "(0008,0016)"),
    ("SOPInstanceUID", "(0008,0018)"),
    ("StudyInstanceUID", "(0020,000D)"),
    ("SeriesInstanceUID", "(0020,000E)"),
)
#: Type 2 in the objects we write; highdicom reads them from the source unguarded.
_TYPE2_EMPTY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_PATIENT_SEX = ("M", "F", "O")
#: Checked before: the report cannot exist without them, so they are never blanked.
_KEEP_TAGS = {pydicom.tag.Tag(k) for k, _ in _REQUIRED}


def source_header(source: Dataset) -> Dataset:
    """A copy of the source without pixel data and with every type 2 attribute present.

    highdicom copies patient and study from the evidence and reads some of it without a
    fallback, so a source without AccessionNumber or PatientName would crash it. Missing type 2
    attributes become empty, as the standard asks; missing type 1 UIDs are an error.
    """
    for keyword, tag in _REQUIRED:
        if not str(source.get(keyword, "") or "").strip():
            raise ValueError(f"source dataset has no {keyword} {tag}: cannot reference it in a report")
    header = Dataset()
    for element in source:
        if element.tag.group >= 0x7FE0 or element.tag.group == 0xFFFC:
            continue  # pixel data and trailing padding
        # values are replaced, never changed in place: only sequences (Datasets) need copying
        header.add(copy.deepcopy(element) if element.VR == "SQ" else copy.copy(element))
    for keyword in _TYPE2_EMPTY:
        if keyword not in header or header[keyword].value is None:
            setattr(header, keyword, "")
    _blank_invalid_values(header)
    # highdicom only accepts M/F/O; anything else (e.g. "U", lower case) must not crash us.
    if str(header.PatientSex).strip().upper() not in _PATIENT_SEX:
        header.PatientSex = ""
    else:
        header.PatientSex = str(header.PatientSex).strip().upper()
    return header


_CHECKED_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UI"}


def _blank_invalid_values(header: Dataset) -> None:
    """Empty every top-level value that breaks its VR, e.g. an anonymiser's 56-character hash in
    AccessionNumber (SH, at most 16) or in PatientBirthDate (DA), both seen in a real Canon DX
    file. highdicom refuses some of them and validators reject all of them; the copied
    attributes are type 2 or optional in what we write, and empty is the standard's 'unknown'.
    """
    for element in header:
        if element.VR not in _CHECKED_VRS or element.value in (None, "") or element.tag in _KEEP_TAGS:
            continue
        values = element.value if element.VM > 1 else [element.value]
        try:
            for value in values:
                pydicom.valuerep.validate_value(element.VR, str(value), pydicom.config.RAISE)  # the text as stored
        except (ValueError, TypeError):
            element.value = ""


# --------------------------------------------------------------------------- geometry


def dicom_points(xy: np.ndarray) -> np.ndarray:
    """Pipeline (x, y) with the top-left pixel centre at (0, 0) -> DICOM (column, row) at 0.5."""
    return np.asarray(xy, dtype=np.float64).reshape(-1, 2) + 0.5


def clip_polygon(points: np.ndarray, columns: int, rows: int) -> np.ndarray:
    """Clip a polygon (DICOM pixel coordinates) to the image, [0, columns] x [0, rows].

    ROIs near the edge can reach past the image (the crop is padded there); presentation
    states reject negative coordinates, and only the part on the image can be shown anyway.
    Sutherland-Hodgman against the four image edges; returns an open polygon.
    """
    poly = [tuple(p) for p in np.asarray(points, dtype=np.float64)]
    edges = ((0, 0.0, True), (0, float(columns), False), (1, 0.0, True), (1, float(rows), False))
    for axis, bound, keep_above in edges:
        if not poly:
            break

        def inside(p: tuple[float, float]) -> bool:
            return p[axis] >= bound if keep_above else p[axis] <= bound

        def cross(p: tuple[float, float], q: tuple[float, float]) -> tuple[float, float]:
            t = (bound - p[axis]) / (q[axis] - p[axis])
            x, y = p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])
            return (bound, y) if axis == 0 else (x, bound)

        out: list[tuple[float, float]] = []
        for i, cur in enumerate(poly):
            prev = poly[i - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(cross(prev, cur))
                out.append(cur)
            elif inside(prev):
                out.append(cross(prev, cur))
        poly = out
    return np.asarray(poly, dtype=np.float64).reshape(-1, 2)


def closed_roi_outline(corners: np.ndarray, columns: int, rows: int) -> np.ndarray | None:
    """Closed POLYLINE of one ROI on the image (first point repeated), or None if off-image."""
    poly = clip_polygon(dicom_points(corners), columns, rows)
    if len(poly) < 3:
        return None
    return np.vstack([poly, poly[:1]])


def clip_point(xy: np.ndarray, columns: int, rows: int) -> np.ndarray:
    """One landmark in DICOM pixel coordinates, kept on the image."""
    p = dicom_points(xy)[0]
    return np.array([np.clip(p[0], 0.0, float(columns)), np.clip(p[1], 0.0, float(rows))])


def landmark_circle(xy: np.ndarray, radius: float, columns: int, rows: int) -> np.ndarray:
    """A CIRCLE around one landmark (DICOM pixel coordinates): its centre, kept on the image,
    and the point on it to the right, or to the left at the image's right edge."""
    centre = clip_point(xy, columns, rows)
    edge = np.array([centre[0] + radius if centre[0] + radius <= columns else centre[0] - radius, centre[1]])
    return np.vstack([centre, edge])


# --------------------------------------------------------------------------- content

#: Where the BMD groups' markers sit on the right image edge, as shares of the image height
#: (L1, L2, L3, L4, L1-L4). A viewer writes each group's values beside its marker, so they are
#: far enough apart that those text boxes do not overlap (5 lines for L1-L4, 3 for each
#: vertebra), and clear of where the ROIs' own labels usually stand when a ROI reaches the
#: right edge (left clavicle about 0.2, left rib cage about 0.5 of the height): the L1-L4
#: summary at the top, the vertebrae in the lower third.
MARKER_HEIGHTS = (0.62, 0.69, 0.76, 0.83, 0.08)
MARKER_HALF_LENGTH = 0.012
LANDMARK_RADIUS = 0.004
AREA = Code("42798000", "SCT", "Area")
MM2 = Code("mm2", "UCUM", "mm2")
PIXELS = Code("{pixels}", "UCUM", "Pixels")  # a count of pixels (an area in pixel units)


def _algorithm_id(algo: AlgorithmInfo) -> AlgorithmIdentification:
    return AlgorithmIdentification(name=algo.name, version=algo.version, parameters=_algorithm_parameters(algo))


def _algorithm_parameters(algo: AlgorithmInfo) -> list[str]:
    return [f"model_id={algo.model_id}", f"demo={'true' if algo.demo else 'false'}", f"precision={algo.precision}"]


def _tracking(header: Dataset, algo: AlgorithmInfo, identifier: str) -> TrackingIdentifier:
    return TrackingIdentifier(
        uid=tracking_uid(header.SOPInstanceUID, algo.model_id, identifier), identifier=identifier
    )


def _source(header: Dataset) -> SourceImageForRegion:
    return SourceImageForRegion(header.SOPClassUID, header.SOPInstanceUID)


def densify(closed: np.ndarray) -> np.ndarray:
    """A closed polyline with the midpoint of every edge added (first point repeated at the end).

    A closed 4-corner box is 5 points, which OHIF takes for one of its own rectangle tools and
    then offers to 'track', dropping every other result; 9 points draw the same box."""
    pts = np.asarray(closed, dtype=np.float64)
    out = []
    for a, b in zip(pts[:-1], pts[1:]):
        out += [a, (a + b) / 2.0]
    out.append(pts[-1])
    return np.asarray(out)


def bmd_marker(site_index: int, columns: int, rows: int) -> np.ndarray:
    """A short vertical mark on the right image edge that carries one site's values.

    The estimate belongs to the image as a whole (it is computed from the six ROIs and the
    whole film), not to a place on it; a viewer draws a group's values beside its region, so
    each site gets its own mark, one below the other, and the values line up like a table.
    """
    x = float(columns) - 0.5
    half = MARKER_HALF_LENGTH * max(columns, rows)
    y = MARKER_HEIGHTS[site_index] * rows
    ys = np.clip([y - half, y, y + half], 0.0, float(rows))
    return np.array([[x, ys[0]], [x, ys[1]], [x, ys[2]]])


def _site_labels(estimate: BmdEstimate, site: str) -> list[str]:
    """The group's first lines in a viewer: the site and, for L1-L4, category and caveats."""
    if site != "L1-L4":
        return [f"{site} vertebra"]
    t = estimate.tscores
    # short lines: they stand in the margin beside the film
    first = f"L1-L4 (WHO: {t.category.value})" if t.category is not None else "L1-L4 (no T-score: sex unknown)"
    out = [first, "Estimated from CXR, not DXA"]
    if estimate.demo:
        out.append("DEMO - NOT FOR CLINICAL USE")
    return out


def pixel_area_mm2(header: Dataset) -> float | None:
    """Area of one pixel in mm2 in the patient, from the spacing the pipeline uses (Pixel
    Spacing, else Imager Pixel Spacing over the magnification); None when the film has none."""
    spacing, _ = pixel_spacing(header)
    return None if spacing is None else spacing[0] * spacing[1]


def _polygon_area(closed: np.ndarray) -> float:
    x, y = closed[:, 0], closed[:, 1]
    return float(abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2.0)


def landmark_code(index: int) -> Code:
    """Private code naming landmark ``index`` (meaning = its name in LANDMARK_NAMES)."""
    return Code(f"CXR16-{index + 1:02d}", LANDMARK_SCHEME_DESIGNATOR, LANDMARK_NAMES[index])


# What each measurement group says, worked out once and written by either of two writers:
# highdicom's classes (the reference, full_check=True) or the direct encoder (the default).


@dataclass(frozen=True)
class _SiteGroup:
    """TID 1501 for one site: BMD and (sex known) T-score, each INFERRED FROM the site's marker;
    the L1-L4 group adds the WHO category. TEXT comments name the site for viewers."""

    site: str
    marker: np.ndarray
    values: tuple[tuple[Code, float, Code], ...]  # (concept, value, unit)
    category: Code | None
    labels: tuple[str, ...]


def _site_groups(header: Dataset, estimate: BmdEstimate) -> list[_SiteGroup]:
    t = estimate.tscores
    groups = []
    for index, site in enumerate(SITES):
        values = [(BMD_CONCEPT, round(float(t.bmd[site]), 3), G_PER_CM2)]
        if t.tscore is not None:
            values.append((TSCORE_CONCEPT, round(float(t.tscore[site]), 2), T_SCORE_UNIT))
        category = WHO_CODES[t.category] if site == "L1-L4" and t.tscore is not None and t.category is not None else None
        groups.append(_SiteGroup(site, bmd_marker(index, int(header.Columns), int(header.Rows)), tuple(values),
                                 category, tuple(_site_labels(estimate, site))))
    return groups


@dataclass(frozen=True)
class _RoiGroup:
    """TID 1501 per local ROI: its area INFERRED FROM its outline on the image, the anatomy as
    finding site, and its name as the first thing a viewer shows ("Left clavicle ROI")."""

    name: str
    outline: np.ndarray  # closed, densified, DICOM pixel coordinates
    area: float
    unit: Code


def _roi_groups(header: Dataset, estimate: BmdEstimate) -> list[_RoiGroup]:
    groups = []
    pixel_mm2 = pixel_area_mm2(header)
    for name, quad in zip(estimate.rois.names, estimate.rois.corners):
        if name not in LOCAL_ROI_NAMES:
            continue  # the whole-image ROI outlines the image itself: nothing to show
        outline = closed_roi_outline(quad, int(header.Columns), int(header.Rows))
        if outline is None:
            continue
        outline = densify(outline)
        area = _polygon_area(outline)
        value, unit = (round(area * pixel_mm2, 1), MM2) if pixel_mm2 is not None else (round(area, 1), PIXELS)
        groups.append(_RoiGroup(name, outline, value, unit))
    return groups


def _landmark_circles(header: Dataset, estimate: BmdEstimate) -> list[np.ndarray]:
    """TID 1410 per landmark: a small circle around the point (centre, a point on it).

    One group per point (a viewer draws one region per group), circles rather than POINTs
    (a viewer draws a POINT as a labelled arrow, and OHIF offers to 'track' single points,
    dropping everything else), and no measurement: the sixteen marks stay unlabelled on the
    image, their names are in the Finding and the Tracking Identifier."""
    columns, rows = int(header.Columns), int(header.Rows)
    radius = LANDMARK_RADIUS * max(columns, rows)
    return [landmark_circle(xy, radius, columns, rows) for xy in estimate.landmarks.points]


def _comment(text: str) -> TextContentItem:
    # TID 1501 row 13 (CONTAINS TEXT $QualitativeEvaluation): free text a reader sees first
    return TextContentItem(name=COMMENT, value=text[:1024], relationship_type=RelationshipTypeValues.CONTAINS)


def _hd_groups(header: Dataset, estimate: BmdEstimate) -> list:
    """The measurement groups as highdicom builds them."""
    algo = estimate.algorithm
    source_images = [SourceImageForMeasurementGroup(header.SOPClassUID, header.SOPInstanceUID)]
    groups: list = []
    for s in _site_groups(header, estimate):
        site_code = [FindingSite(SITE_CODES[s.site])]
        measurements = [
            Measurement(name=concept, value=value, unit=unit, finding_sites=site_code,
                        referenced_coordinates=[CoordinatesForMeasurement(hd.sr.GraphicTypeValues.POLYLINE, s.marker, _source(header))])
            for concept, value, unit in s.values
        ]
        evaluations = [QualitativeEvaluation(WHO_CATEGORY_CONCEPT, s.category)] if s.category is not None else None
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(header, algo, f"BMD {s.site}"), algorithm_id=_algorithm_id(algo),
            finding_sites=site_code, measurements=measurements, qualitative_evaluations=evaluations,
            source_images=source_images,
        )
        group[0].ContentSequence.extend(_comment(text) for text in s.labels)
        groups.append(group)
    for r in _roi_groups(header, estimate):
        anatomy, laterality = ROI_FINDING_SITES[r.name]
        measurement = Measurement(
            name=AREA, value=r.area, unit=r.unit,
            referenced_coordinates=[CoordinatesForMeasurement(hd.sr.GraphicTypeValues.POLYLINE, r.outline, _source(header))],
        )
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(header, algo, f"ROI {r.name}"), algorithm_id=_algorithm_id(algo),
            finding_sites=[FindingSite(anatomy, laterality=laterality)], measurements=[measurement],
            source_images=source_images,
        )
        group[0].ContentSequence.append(_comment(ROI_LABELS[r.name]))
        groups.append(group)
    for i, circle in enumerate(_landmark_circles(header, estimate)):
        region = ImageRegion(graphic_type=hd.sr.GraphicTypeValues.CIRCLE, graphic_data=circle, source_image=_source(header))
        groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(header, algo, f"Landmark {LANDMARK_NAMES[i]}"),
            referenced_region=region, finding_type=landmark_code(i), algorithm_id=_algorithm_id(algo),
        ))
    return groups


#: Modality codes (CID 29) of the images we analyse.
_MODALITY_CODES = {"CR": Code("CR", "DCM", "Computed Radiography"), "DX": Code("DX", "DCM", "Digital Radiography")}


def _image_library(header: Dataset) -> ContainerContentItem:
    """TID 1600 with one TID 1601 entry: the source film and the TID 1603 descriptors it has.

    highdicom's ImageLibrary requires Patient Orientation and Imager Pixel Spacing of every
    projection radiograph; many real films lack one or both (RG1 has neither), so the entry is
    built here and each descriptor is written only when the film states it."""
    acq = RelationshipTypeValues.HAS_ACQ_CONTEXT
    descriptors: list = []
    modality = _MODALITY_CODES.get(str(header.get("Modality", "")).strip())
    if modality is not None:
        descriptors.append(CodeContentItem(name=codes.DCM.Modality, value=modality, relationship_type=acq))
    descriptors += [
        NumContentItem(name=codes.DCM.PixelDataRows, value=int(header.Rows), unit=PIXELS, relationship_type=acq),
        NumContentItem(name=codes.DCM.PixelDataColumns, value=int(header.Columns), unit=PIXELS, relationship_type=acq),
    ]
    orientation = header.get("PatientOrientation")
    if orientation is not None and not isinstance(orientation, str) and len(orientation) == 2 and all(orientation):
        descriptors += [
            TextContentItem(name=codes.DCM.PatientOrientationRow, value=str(orientation[0]), relationship_type=acq),
            TextContentItem(name=codes.DCM.PatientOrientationColumn, value=str(orientation[1]), relationship_type=acq),
        ]
    spacing = _valid_spacing(header)
    if spacing is not None:
        descriptors += [
            NumContentItem(name=codes.DCM.HorizontalPixelSpacing, value=spacing[1], unit=codes.UCUM.Millimeter,
                           relationship_type=acq),
            NumContentItem(name=codes.DCM.VerticalPixelSpacing, value=spacing[0], unit=codes.UCUM.Millimeter,
                           relationship_type=acq),
        ]
    image = ImageContentItem(name=Code("260753009", "SCT", "Source"), referenced_sop_class_uid=header.SOPClassUID,
                             referenced_sop_instance_uid=header.SOPInstanceUID,
                             relationship_type=RelationshipTypeValues.CONTAINS)
    image.ContentSequence = descriptors
    group = ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=RelationshipTypeValues.CONTAINS)
    group.ContentSequence = [image]
    library = ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS)
    library.ContentSequence = [group]
    return library


def _valid_spacing(header: Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm as TID 1603 describes it: Imager Pixel Spacing, else Pixel
    Spacing; None if neither holds two positive numbers (a real Philips CR says 0\\0)."""
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        value = header.get(keyword)
        try:
            row, col = float(value[0]), float(value[1])  # type: ignore[index]
        except (TypeError, ValueError, IndexError):
            continue
        if row > 0 and col > 0 and np.isfinite(row) and np.isfinite(col):
            return row, col
    return None


def _qualitative_container(estimate: BmdEstimate) -> ContainerContentItem:
    """TID 1500 row 12: the statements every reader must see, as TEXT items."""
    container = ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    # No TID 4019 here: every measurement group carries it, and validators read TEXT items in
    # this container as row 14 (CONTAINS), so its HAS CONCEPT MOD items would be flagged.
    container.ContentSequence = []
    for text in statements(estimate):
        container.ContentSequence.append(
            TextContentItem(name=COMMENT, value=text, relationship_type=RelationshipTypeValues.CONTAINS)
        )
    return container


def _observation_context(algo: AlgorithmInfo) -> ObservationContext:
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid(algo),
            name=f"{algo.name} {algo.version}"[:64],
            manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME,
        ),
    )
    return ObservationContext(observer_device_context=device)


def _content(header: Dataset, estimate: BmdEstimate) -> MeasurementReport:
    """The whole tree as highdicom builds it (the reference the direct writer is held to)."""
    report = MeasurementReport(
        observation_context=_observation_context(estimate.algorithm),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=_hd_groups(header, estimate),  # the L1 group first: OHIF opens its image
        title=IMAGING_MEASUREMENT_REPORT,
    )
    # TID 1600 Image Library (IHE AIR: the analysed image), before Imaging Measurements (row 5).
    items = report[0].ContentSequence
    position = next(i for i, item in enumerate(items) if item.ConceptNameCodeSequence[0].CodeValue == IMAGING_MEASUREMENTS_CODE)
    items.insert(position, _image_library(header))
    # TID 1500 row 12 comes after the measurements (row 6): template order is significant.
    report[0].ContentSequence.append(_qualitative_container(estimate))
    return report


@functools.lru_cache(maxsize=16)
def _root_context(algo: AlgorithmInfo) -> bytes:
    """The root's first items as MeasurementReport writes them: language, observer context
    (the algorithm as device) and procedure reported; encoded once per model."""
    items = [*LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE), *_observation_context(algo),
             CodeContentItem(name=codes.DCM.ProcedureReported, value=IMAGING_PROCEDURE,
                             relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD)]
    return enc.encode_items(items)


# --------------------------------------------------------------------------- direct writer

# Concept names of the items highdicom's templates write, as PS3.16 names them.
_TRACKING_IDENTIFIER = Code("112039", "DCM", "Tracking Identifier")
_TRACKING_UID = Code("112040", "DCM", "Tracking Unique Identifier")
_FINDING_SITE = Code("363698007", "SCT", "Finding Site")
_LATERALITY = Code("272741003", "SCT", "Laterality")
_ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
_ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
_ALGORITHM_PARAMETERS = Code("111002", "DCM", "Algorithm Parameters")
_SOURCE_CODE = Code("260753009", "SCT", "Source")
_SOURCE_OF_MEASUREMENT = Code("121112", "DCM", "Source of Measurement")
_MEASUREMENT_GROUP = Code("125007", "DCM", "Measurement Group")
_FINDING = Code("121071", "DCM", "Finding")
_IMAGE_REGION = Code("111030", "DCM", "Image Region")
_IMAGING_MEASUREMENTS = Code(IMAGING_MEASUREMENTS_CODE, "DCM", "Imaging Measurements")
_CONTENT_SEQUENCE = 0x0040A730


def _w_text(relationship: str, name: Code, value: str) -> bytes:
    return enc.content_item(relationship, "TEXT", name, (0x0040A160, enc.text(0x0040A160, "UT", value)))


def _w_code(relationship: str, name: Code, value: Code, children: tuple[bytes, ...] = ()) -> bytes:
    elements = [(0x0040A168, enc.sequence(0x0040A168, [enc.code_item(value)]))]
    if children:
        elements.append((_CONTENT_SEQUENCE, enc.sequence(_CONTENT_SEQUENCE, children)))
    return enc.content_item(relationship, "CODE", name, *elements)


def _w_container(relationship: str, name: Code, children: list[bytes], template: str | None = None) -> bytes:
    elements = [(0x0040A050, enc.text(0x0040A050, "CS", "CONTINUOUS")),
                (_CONTENT_SEQUENCE, enc.sequence(_CONTENT_SEQUENCE, children))]
    if template is not None:
        elements.append((0x0040A504, enc.sequence(0x0040A504, [enc.item(
            (0x00080105, enc.text(0x00080105, "CS", "DCMR")), (0x0040DB00, enc.text(0x0040DB00, "CS", template)))])))
    return enc.content_item(relationship, "CONTAINER", name, *elements)


class _Writer:
    """Writes the Imaging Measurements and Qualitative Evaluations containers of one SR."""

    def __init__(self, header: Dataset, estimate: BmdEstimate) -> None:
        self.header, self.estimate = header, estimate
        self.algorithm = _w_algorithm(estimate.algorithm)
        reference = enc.sop_reference(0x00081199, str(header.SOPClassUID), str(header.SOPInstanceUID))
        self.selected_from = enc.content_item("SELECTED FROM", "IMAGE", _SOURCE_CODE, reference)
        self.source_of_measurement = enc.content_item("CONTAINS", "IMAGE", _SOURCE_OF_MEASUREMENT, reference)

    def tracking(self, identifier: str) -> list[bytes]:
        uid = tracking_uid(self.header.SOPInstanceUID, self.estimate.model_id, identifier)
        return [_w_text("HAS OBS CONTEXT", _TRACKING_IDENTIFIER, identifier),
                enc.content_item("HAS OBS CONTEXT", "UIDREF", _TRACKING_UID, (0x0040A124, enc.text(0x0040A124, "UI", uid)))]

    def scoord(self, relationship: str, name: Code, graphic_type: str, points: np.ndarray) -> bytes:
        return enc.content_item(
            relationship, "SCOORD", name,
            (_CONTENT_SEQUENCE, enc.sequence(_CONTENT_SEQUENCE, [self.selected_from])),
            (0x00700022, enc.fl(0x00700022, points)),
            (0x00700023, enc.text(0x00700023, "CS", graphic_type)),
        )

    def num(self, name: Code, value: float, unit: Code, children: list[bytes]) -> bytes:
        measured = enc.item((0x004008EA, enc.sequence(0x004008EA, [enc.code_item(unit)])),
                            (0x0040A161, enc.fd(0x0040A161, value)), (0x0040A30A, enc.ds(0x0040A30A, value)))
        return enc.content_item("CONTAINS", "NUM", name, (0x0040A300, enc.sequence(0x0040A300, [measured])),
                                (_CONTENT_SEQUENCE, enc.sequence(_CONTENT_SEQUENCE, children)))

    def group(self, template: str, children: list[bytes]) -> bytes:
        return _w_container("CONTAINS", _MEASUREMENT_GROUP, children, template)

    def measurements(self) -> bytes:
        groups = []
        for s in _site_groups(self.header, self.estimate):
            site = _w_code("HAS CONCEPT MOD", _FINDING_SITE, SITE_CODES[s.site])
            children = [*self.tracking(f"BMD {s.site}"), site, *self.algorithm]
            children += [self.num(concept, value, unit, [site, self.scoord("INFERRED FROM", _SOURCE_CODE, "POLYLINE", s.marker)])
                         for concept, value, unit in s.values]
            if s.category is not None:
                children.append(_w_code("CONTAINS", WHO_CATEGORY_CONCEPT, s.category))
            children.append(self.source_of_measurement)
            children += [_w_text("CONTAINS", COMMENT, text[:1024]) for text in s.labels]
            groups.append(self.group("1501", children))
        for r in _roi_groups(self.header, self.estimate):
            anatomy, laterality = ROI_FINDING_SITES[r.name]
            lateral = (_w_code("HAS CONCEPT MOD", _LATERALITY, laterality),) if laterality is not None else ()
            children = [*self.tracking(f"ROI {r.name}"), _w_code("HAS CONCEPT MOD", _FINDING_SITE, anatomy, lateral),
                        *self.algorithm,
                        self.num(AREA, r.area, r.unit, [self.scoord("INFERRED FROM", _SOURCE_CODE, "POLYLINE", r.outline)]),
                        self.source_of_measurement, _w_text("CONTAINS", COMMENT, ROI_LABELS[r.name])]
            groups.append(self.group("1501", children))
        for i, circle in enumerate(_landmark_circles(self.header, self.estimate)):
            children = [*self.tracking(f"Landmark {LANDMARK_NAMES[i]}"), _w_code("CONTAINS", _FINDING, landmark_code(i)),
                        *self.algorithm, self.scoord("CONTAINS", _IMAGE_REGION, "CIRCLE", circle)]
            groups.append(self.group("1410", children))
        return _w_container("CONTAINS", _IMAGING_MEASUREMENTS, groups)

    def qualitative(self) -> bytes:
        return _w_container("CONTAINS", QUALITATIVE_EVALUATIONS,
                            [_w_text("CONTAINS", COMMENT, text) for text in statements(self.estimate)])


@functools.lru_cache(maxsize=16)
def _w_algorithm(algo: AlgorithmInfo) -> tuple[bytes, ...]:
    """TID 4019 as highdicom writes it; the same in every group of every SR of one model."""
    return (_w_text("HAS CONCEPT MOD", _ALGORITHM_NAME, algo.name),
            _w_text("HAS CONCEPT MOD", _ALGORITHM_VERSION, algo.version),
            *(_w_text("HAS CONCEPT MOD", _ALGORITHM_PARAMETERS, p) for p in _algorithm_parameters(algo)))


# --------------------------------------------------------------------------- document


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now if now is not None else datetime.datetime.now().astimezone()


def series_description(estimate: BmdEstimate) -> str:
    return "BMD estimate (DEMO)" if estimate.demo else "BMD estimate"


def software_versions(algo: AlgorithmInfo) -> list[str]:
    """Our version and the model id, each cut to the 64 characters of LO."""
    return [screener.__version__[:64], algo.model_id[:64]]


#: IHE AIR names the algorithm's Contributing Equipment item (Newcode1, 99IHE, "Processing
#: Algorithm"), a placeholder that DICOM never published; CID 7005's Processing Equipment is
#: the standard code for software that processed the images (docs/viewers.md, AIR checklist).
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")


def algorithm_equipment(algo: AlgorithmInfo, now: datetime.datetime) -> hd.ContributingEquipment:
    """Contributing Equipment item for the algorithm (IHE AIR): manufacturer, model (the
    algorithm's name), software version (its version) and a Device UID of these weights."""
    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=algo.name[:64],
        software_versions=[algo.version[:64], algo.model_id[:64]],
        contribution_datetime=now.strftime("%Y%m%d%H%M%S"),
        contribution_description=(f"Estimated lumbar BMD with {algo.name} {algo.version}"
                                  + (" (DEMO model, not for clinical use)" if algo.demo else ""))[:1024],
    )
    item.DeviceUID = device_uid(algo)
    return item


def stamp_creation(dataset: Dataset, now: datetime.datetime) -> None:
    """Replace highdicom's wall-clock timestamps with ``now`` so objects are reproducible."""
    dataset.InstanceCreationDate = now.strftime("%Y%m%d")
    dataset.InstanceCreationTime = now.strftime("%H%M%S")
    for item in dataset.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")


def build_sr(
    source: Dataset,
    estimate: BmdEstimate,
    *,
    institution_name: str | None = None,
    now: datetime.datetime | None = None,
    full_check: bool = False,
) -> Comprehensive3DSR:
    """The Comprehensive 3D SR (IHE AIR's SOP class) for ``estimate`` on ``source``, in the
    source's study, own series.

    ``now`` fixes content, series and instance creation date/time (tests pass a constant so
    that the object is reproducible); the default is the current local time.

    The tree is written by :class:`_Writer` straight to bytes (0.4 s per image through
    highdicom and pydicom's writer, a few ms this way); highdicom builds the document around
    it: the root's context, procedure and Image Library, the header, evidence and equipment.
    ``full_check=True`` builds the whole tree with highdicom instead, checking every item; a
    test holds the two to the same bytes.
    """
    now = _now(now)
    header = source_header(source)
    uids = report_uids(header.SOPInstanceUID, estimate.model_id)
    coding_scheme = CodingSchemeIdentificationItem(
        designator=LANDMARK_SCHEME_DESIGNATOR,
        name="CXR-BMD Screener landmarks",
        responsible_organization=MANUFACTURER,
    )
    if full_check:
        content = _content(header, estimate)[0]
    else:  # highdicom is given the root with the Image Library (the evidence), the rest goes in after
        content = ContainerContentItem(name=IMAGING_MEASUREMENT_REPORT, template_id="1500")
        content.ContentSequence = [_image_library(header)]
    sr = Comprehensive3DSR(
        evidence=[header],
        content=content,
        series_instance_uid=uids.sr_series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sr_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=True,
        institution_name=institution_name,
        manufacturer_model_name=MODEL_NAME,
        software_versions=software_versions(estimate.algorithm),
        series_description=series_description(estimate),
        content_date=now.date(),
        content_time=now.time().replace(microsecond=0, tzinfo=None),
        series_date=now.date(),
        series_time=now.time().replace(microsecond=0, tzinfo=None),
        coding_schemes=[coding_scheme],
        contributing_equipment=[algorithm_equipment(estimate.algorithm, now)],
    )
    stamp_creation(sr, now)
    # highdicom takes the source's character set; ours is UTF-8, as for every object we send
    # (the conformance statement): a Latin-1 film may get a report whose text Latin-1 lacks.
    sr.SpecificCharacterSet = UTF8
    if not full_check:
        writer = _Writer(header, estimate)
        enc.set_raw_sequence(sr, "ContentSequence", _root_context(estimate.algorithm) + enc.encode_items(sr.ContentSequence)
                             + writer.measurements() + writer.qualitative())
    return sr
