"""The DICOM Structured Report for one BMD estimate (TID 1500, Comprehensive SR).

What the SR says is fixed by METHOD.md section 6. Layout of the content tree::

    Imaging Measurement Report (DCM 126000), procedure reported: Imaging procedure (SCT 363679005)
      Observation context: device observer "CXR-BMD Screener"
      Imaging Measurements (DCM 126010)
        5 x TID 1501 group: L1, L2, L3, L4, L1-L4 (finding site), BMD (LN 24966-4, g/cm2),
            T-score (LN 38267-1, {T-score}); the L1-L4 group adds the WHO category
        6 x TID 1410 group: each local ROI as a closed POLYLINE on the source image
        1 x TID 1501 group: the 16 landmarks as SCOORD POINTs
      Qualitative Evaluations (UMLS C0034375)
        Comment: estimated from a chest radiograph by software, not a DXA measurement
        Comment: DEMO MODEL - NOT FOR CLINICAL USE ...  (demo bundles only)
        Comment: why there is no T-score             (patient sex unknown only)

The demo statement also goes into SeriesDescription and the GSPS text line, so that it shows
in PACS series lists and on the image, not only to those who open the SR.

Spatial coordinates: the pipeline puts the centre of the top-left pixel at (0, 0); DICOM SCOORD
and presentation-state PIXEL coordinates put it at (0.5, 0.5), so every point gets +0.5.

Every UID is derived from (source SOP Instance UID, model id, what the UID names), so that
processing the same image with the same model again produces a byte-identical object (given
the same ``now``) that a PACS recognises as a duplicate.
"""

from __future__ import annotations

import copy
import datetime
import uuid
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
import pydicom.config
import pydicom.tag
import pydicom.valuerep
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    ComprehensiveSR,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    ScoordContentItem,
    SourceImageForMeasurement,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

import screener
from screener.pipeline.estimate import AlgorithmInfo, BmdEstimate
from screener.pipeline.landmarks import LANDMARK_NAMES, LANDMARK_SCHEME
from screener.pipeline.rois import LOCAL_ROI_NAMES
from screener.pipeline.tscore import SITES, WhoCategory

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
    "summary_text",
    "stamp_creation",
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
MANUFACTURER = "CXR-BMD Screener"
MODEL_NAME = "cxr-bmd-screener"

#: Fixed namespace for our uuid5-derived UIDs. Never change it: that would change every UID
#: and make PACS store re-processed results as new objects.
UID_NAMESPACE = uuid.UUID("355decaa-349a-488c-8351-3a08897e5c94")

# --- codes. DCM and SCT codes that DICOM PS3.16 lists (anatomy, Normal, Imaging procedure,
# Comment, Clinical Interpretation) match pydicom's PS3.16 dictionary (a test checks it);
# Osteopenia/Osteoporosis (SNOMED CT disorders) and the two LOINC codes are not in DICOM and were
# checked against public SNOMED CT / LOINC tables. DICOM's anatomy list (CID 4) has no "rib
# cage", so the rib-cage ROIs use Rib (113197003) with laterality.
BMD_CONCEPT = Code("24966-4", "LN", "DXA Lumbar spine [Mass/Area] Bone density")
TSCORE_CONCEPT = Code("38267-1", "LN", "DXA Lumbar spine [T-score] Bone density")
G_PER_CM2 = Code("g/cm2", "UCUM", "g/cm2")
T_SCORE_UNIT = Code("{T-score}", "UCUM", "T-score")
IMAGING_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
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

ESTIMATE_STATEMENT = (
    "The values in this report (lumbar bone mineral density and, where given, T-scores and WHO "
    "category) are estimated by software ({name} {version}) from a frontal chest radiograph. "
    "They are not a DXA measurement."
)
DEMO_PREFIX = "DEMO MODEL - NOT FOR CLINICAL USE."


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


def report_uids(source_sop_instance_uid: str, model_id: str) -> ReportUids:
    """Deterministic UIDs: the same image and model always give the same SR and GSPS UIDs."""
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
    )


def tracking_uid(source_sop_instance_uid: str, model_id: str, tracking_identifier: str) -> str:
    """Tracking UID of one measurement group; the GSPS graphic of the same ROI shares it."""
    return _uid(str(source_sop_instance_uid), str(model_id), "tracking", tracking_identifier)


DEVICE_OBSERVER_UID = _uid("device", MANUFACTURER)


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
        header.add(copy.deepcopy(element))
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


# --------------------------------------------------------------------------- text


def summary_text(estimate: BmdEstimate) -> str:
    """One line for people: L1-L4 BMD, T-score and category, and how it was obtained."""
    t = estimate.tscores
    text = f"L1-L4 BMD {t.bmd['L1-L4']:.3f} g/cm2"
    if t.tscore is not None and t.category is not None:
        # two decimals, as stored in the SR: one decimal could show -2.5 beside "osteopenia"
        text += f", T {t.tscore['L1-L4']:.2f} {t.category.value}"
    else:
        text += ", no T-score (patient sex unknown)"
    text += " (estimated from CXR by software"
    text += "; DEMO model, not for clinical use)" if estimate.demo else ")"
    return text


def _statements(estimate: BmdEstimate) -> list[str]:
    algo = estimate.algorithm
    out = [ESTIMATE_STATEMENT.format(name=algo.name, version=algo.version)]
    if algo.demo:
        out.append(f"{DEMO_PREFIX} {algo.demo_statement}".strip())
    if estimate.tscores.tscore is None and estimate.tscores.reason:
        out.append(estimate.tscores.reason)
    return out


# --------------------------------------------------------------------------- content


def _algorithm_id(algo: AlgorithmInfo) -> AlgorithmIdentification:
    params = [f"model_id={algo.model_id}", f"demo={'true' if algo.demo else 'false'}"]
    return AlgorithmIdentification(name=algo.name, version=algo.version, parameters=params)


def _tracking(header: Dataset, algo: AlgorithmInfo, identifier: str) -> TrackingIdentifier:
    return TrackingIdentifier(
        uid=tracking_uid(header.SOPInstanceUID, algo.model_id, identifier), identifier=identifier
    )


def _site_group(header: Dataset, estimate: BmdEstimate, site: str) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one site: BMD, and T-score (+ WHO category for L1-L4) when sex is known."""
    t = estimate.tscores
    algo = estimate.algorithm
    site_code = [FindingSite(SITE_CODES[site])]

    def source() -> list[SourceImageForMeasurement]:
        return [SourceImageForMeasurement(header.SOPClassUID, header.SOPInstanceUID)]

    measurements = [
        Measurement(name=BMD_CONCEPT, value=round(float(t.bmd[site]), 3), unit=G_PER_CM2,
                    finding_sites=site_code, referenced_images=source()),
    ]
    evaluations: list[QualitativeEvaluation] = []
    if t.tscore is not None:
        measurements.append(
            Measurement(name=TSCORE_CONCEPT, value=round(float(t.tscore[site]), 2), unit=T_SCORE_UNIT,
                        finding_sites=site_code, referenced_images=source())
        )
        if site == "L1-L4" and t.category is not None:
            evaluations.append(QualitativeEvaluation(WHO_CATEGORY_CONCEPT, WHO_CODES[t.category]))
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(header, algo, f"BMD {site}"),
        algorithm_id=_algorithm_id(algo),
        finding_sites=site_code,
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
        source_images=[SourceImageForMeasurementGroup(header.SOPClassUID, header.SOPInstanceUID)],
    )


def _roi_groups(header: Dataset, estimate: BmdEstimate) -> list[PlanarROIMeasurementsAndQualitativeEvaluations]:
    """TID 1410 per local ROI: where the network looked, as a closed outline on the image."""
    groups = []
    corners = estimate.rois.corners
    for name, quad in zip(estimate.rois.names, corners):
        if name not in LOCAL_ROI_NAMES:
            continue  # the whole-image ROI outlines the image itself: nothing to show
        outline = closed_roi_outline(quad, int(header.Columns), int(header.Rows))
        if outline is None:
            continue
        anatomy, laterality = ROI_FINDING_SITES[name]
        region = ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=outline,
            source_image=SourceImageForRegion(header.SOPClassUID, header.SOPInstanceUID),
        )
        groups.append(
            PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(header, estimate.algorithm, f"ROI {name}"),
                referenced_region=region,
                algorithm_id=_algorithm_id(estimate.algorithm),
                finding_sites=[FindingSite(anatomy, laterality=laterality)],
            )
        )
    return groups


def landmark_code(index: int) -> Code:
    """Private code naming landmark ``index`` (meaning = its name in LANDMARK_NAMES)."""
    return Code(f"CXR16-{index + 1:02d}", LANDMARK_SCHEME_DESIGNATOR, LANDMARK_NAMES[index])


def _landmark_group(header: Dataset, estimate: BmdEstimate) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 holding the 16 landmarks as SCOORD POINTs (row 10c), each SELECTED FROM the image."""
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(header, estimate.algorithm, f"Landmarks {LANDMARK_SCHEME}"),
        algorithm_id=_algorithm_id(estimate.algorithm),
    )
    columns, rows = int(header.Columns), int(header.Rows)
    for i, xy in enumerate(estimate.landmarks.points):
        point = ScoordContentItem(
            name=landmark_code(i),
            graphic_type=hd.sr.GraphicTypeValues.POINT,
            graphic_data=clip_point(xy, columns, rows)[None, :],
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
        point.ContentSequence = [SourceImageForRegion(header.SOPClassUID, header.SOPInstanceUID)]
        group[0].ContentSequence.append(point)
    return group


def _qualitative_container(estimate: BmdEstimate) -> ContainerContentItem:
    """TID 1500 row 12: the statements every reader must see, as TEXT items."""
    container = ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    # No TID 4019 here: every measurement group carries it, and validators read TEXT items in
    # this container as row 14 (CONTAINS), so its HAS CONCEPT MOD items would be flagged.
    container.ContentSequence = []
    for text in _statements(estimate):
        container.ContentSequence.append(
            TextContentItem(name=COMMENT, value=text, relationship_type=RelationshipTypeValues.CONTAINS)
        )
    return container


def _content(header: Dataset, estimate: BmdEstimate) -> MeasurementReport:
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=DEVICE_OBSERVER_UID,
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME,
        ),
    )
    groups: list = [_site_group(header, estimate, site) for site in SITES]
    groups += _roi_groups(header, estimate)
    groups.append(_landmark_group(header, estimate))
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=groups,
        title=IMAGING_MEASUREMENT_REPORT,
    )
    # TID 1500 row 12 comes after the measurements (row 6): template order is significant.
    report[0].ContentSequence.append(_qualitative_container(estimate))
    return report


# --------------------------------------------------------------------------- document


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now if now is not None else datetime.datetime.now().astimezone()


def series_description(estimate: BmdEstimate) -> str:
    return "BMD estimate (DEMO)" if estimate.demo else "BMD estimate"


def software_versions(algo: AlgorithmInfo) -> list[str]:
    """Our version and the model id, each cut to the 64 characters of LO."""
    return [screener.__version__[:64], algo.model_id[:64]]


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
) -> ComprehensiveSR:
    """The Comprehensive SR for ``estimate`` on ``source``, in the source's study, own series.

    ``now`` fixes content, series and instance creation date/time (tests pass a constant so
    that the object is reproducible); the default is the current local time.
    """
    now = _now(now)
    header = source_header(source)
    uids = report_uids(header.SOPInstanceUID, estimate.model_id)
    coding_scheme = CodingSchemeIdentificationItem(
        designator=LANDMARK_SCHEME_DESIGNATOR,
        name="CXR-BMD Screener landmarks",
        responsible_organization=MANUFACTURER,
    )
    sr = ComprehensiveSR(
        evidence=[header],
        content=_content(header, estimate),
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
    )
    stamp_creation(sr, now)
    return sr
