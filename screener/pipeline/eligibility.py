"""Is this image one the model may be run on? Pure functions, no I/O.

Four gates, in the order the worker meets them:

1. :func:`check_header` (before decoding): SOP class, Modality, BodyPartExamined,
   ViewPosition, ImageType and patient age.
2. :func:`check_landmarks` (after the detector): confidence, the film turned by 180 degrees
   scoring higher (upside down), each ROI's landmarks found, and the geometry of the 16 points.
3. :func:`check_image` (with pixels and landmarks): a film that displays inverted, one with
   no mediastinum between two lungs (lateral-like), the heart shadow on the wrong side.
4. :func:`check_view` (when the bundle has a view classifier): the whole film's probability
   of being a frontal chest film the right way round; it catches the mirrored films whose
   heart shadow does not read clearly and films cut to their upper half, which pass 1-3.

Each returns a :class:`Decision`; ``code`` is a stable :class:`~screener.codes.ReasonCode` for audit queries and
``reason`` is a sentence for a person, naming the DICOM attribute and its value.

Policy decisions (all configurable in :class:`EligibilityRules`, documented where they are set):

- BodyPartExamined: CHEST and THORAX are both accepted. CHEST is the defined term in PS3.16
  CID 4031, but vendors (the highdicom/Fujifilm DX test file among them) send THORAX for the
  same examination. Missing is accepted: many DX systems leave it empty, and the landmark
  gate rejects a film that is not a chest.
- ViewPosition: PA and AP are screened; laterals (LL, RL), decubitus and obliques are not.
  Missing is accepted by default because CR readers often leave it empty (two of the real
  test files do); the landmark gate then has to confirm a frontal film (spine vertical,
  sides in order, thorax width), so a lateral still cannot get through unchecked.
- ImageType: value 2 SECONDARY (screenshots, reformats, annotated copies) is refused.
  DERIVED\\PRIMARY is accepted by default: vendors label their processed for-presentation
  CR/DX images that way (the Philips and Canon chest films in the test data both are), so
  insisting on ORIGINAL would refuse most real chest films. Missing ImageType is accepted.
- Age: the WHO T-score categories apply from 50 (post-menopause / men over 50), so the
  default minimum is 50, from PatientAge or else PatientBirthDate and the study date.
  Missing age is *accepted* by default: PACS routing rules already select the examinations,
  and de-identified or badly registered studies often lack age; dropping them silently would
  hide screening candidates. The reason says the age was unknown, and a site that screens
  strictly by age sets ``missing_age = "reject"``.
- SOP class: CR Image Storage and DX (for presentation and for processing) only. SR, PR and
  KO are never images (they come back from our own output in routing loops). Secondary
  Capture is refused by default: it is usually a screenshot or a re-photographed film,
  without calibrated pixels; ``accept_secondary_capture`` turns it on.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from screener import MANUFACTURER
from screener.codes import ReasonCode
from screener.safe_text import quote

if TYPE_CHECKING:  # the detector module pulls in torch; eligibility must stay light to import
    from screener.pipeline.landmarks import Landmarks

__all__ = [
    "heart_side_contrast",
    "CR_IMAGE_STORAGE",
    "DX_PRESENTATION_STORAGE",
    "DX_PROCESSING_STORAGE",
    "SECONDARY_CAPTURE_STORAGE",
    "Decision",
    "EligibilityRules",
    "check_header",
    "check_landmarks",
    "check_image",
    "check_film",
    "check_view",
    "ROI_LANDMARKS",
    "roi_landmark_confidence",
    "lung_and_mediastinum",
    "thorax_aspect",
    "patient_age",
]

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
_SECONDARY_CAPTURE_FAMILY = "1.2.840.10008.5.1.4.1.1.7"  # .7 and the multi-frame .7.x
_SR_FAMILY = "1.2.840.10008.5.1.4.1.1.88."  # every SR, and KO (.88.59)
_PR_FAMILY = "1.2.840.10008.5.1.4.1.1.11."  # presentation states
_POLICIES = ("accept", "reject")

ELIGIBLE = ReasonCode.ELIGIBLE


@dataclass(frozen=True)
class Decision:
    """One gate's answer: ``code`` is stable for audit; ``reason`` is for a person."""

    eligible: bool
    code: ReasonCode
    reason: str


@dataclass(frozen=True)
class EligibilityRules:
    """Every eligibility threshold and policy; the defaults are the documented decisions above."""

    # header
    sop_classes: tuple[str, ...] = (CR_IMAGE_STORAGE, DX_PRESENTATION_STORAGE, DX_PROCESSING_STORAGE)
    accept_secondary_capture: bool = False
    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST", "THORAX")
    missing_body_part: str = "accept"
    views: tuple[str, ...] = ("PA", "AP")
    missing_view: str = "accept"
    accept_derived_primary: bool = True
    min_age: float = 50.0
    missing_age: str = "accept"
    # landmarks: the median over the 16 points of the detector's heatmap mass within 2 cells
    # (soft_argmax). `screener-train landmarks calibrate` on the demo detector: frontal films
    # (JSRT validation + Philips CR + Canon DX) 0.100-0.45, p05 0.215; rotated, inverted,
    # blank and noise images at most 0.059. Upside-down and cropped films overlap and are
    # refused by the turned-by-180, ROI-landmark and geometry checks below.
    min_landmark_confidence: float = 0.08
    # The detector also scores each input turned by 180 degrees (Landmarks.turned_confidence).
    # A frontal film scores several times lower turned (calibrate: at most 0.37 of its own
    # median), an upside-down or top-to-bottom flipped one several times higher; refused
    # when the turned score reaches this share of the film's own.
    max_turned_confidence_ratio: float = 0.8
    # Each side's clavicle and rib-cage landmarks: the median confidence of the points that
    # place one ROI. A film where one structure is not found (a herniation filling a
    # hemithorax, a cut-off side) would get that ROI somewhere across the chest.
    min_roi_landmark_confidence: float = 0.02
    # thorax width (40 % rib points) over image width: JSRT films span 0.58-0.84
    min_thorax_width: float = 0.3
    max_thorax_width: float = 1.0
    # cervical-to-T12 length over thorax width (T12 placed by the spine rule): calibrate on the
    # demo detector gives frontal films 0.647-1.279 (5th percentile 0.958; the JSRT labels
    # themselves reach down to 0.642), films cut to the lower half 0.295-0.617
    min_thorax_aspect: float = 0.63
    max_thorax_aspect: float = 2.0
    max_spine_tilt_deg: float = 30.0
    # share of each local ROI inside the image: on JSRT the cervical box is >= 0.53 inside
    min_roi_inside: float = 0.5
    # image: lungs brighter than the mediastinum by more than this (display units) = inverted
    inverted_margin: float = 0.1  # JSRT films: lungs 0.02-0.46 darker; inverted test films 0.3-0.7 brighter
    # The heart shadow makes the lower zone beside the midline brighter on the patient's left
    # (the image's right) than on the right. A mirrored film (left-right flipped: the detector
    # still names the points by where they lie, so its left/right ROIs would be swapped) shows
    # it on the image's left. `calibrate --cv-dir` over 197 JSRT films: frontal median +0.153
    # (5th percentile +0.021), mirrored median -0.161 (95th percentile -0.035). This is the
    # threshold when the bundle has no view classifier (0: 9 of 197 mirrored films lie within
    # -0.02..0, so nothing lower is safe on its own).
    min_heart_side_contrast: float = 0.0
    # ... and with a view classifier (Landmarks.view) behind it: at 0 the check refused
    # frontal films with a central heart (JPCNN075 -0.006, JPCLN097 -0.016) that the
    # classifier reads as frontal; at -0.02 the two checks together let no further mirrored
    # film through on the same calibration (frontal 98.0 % -> 99.0 %).
    min_heart_side_contrast_with_view: float = -0.02
    # The midline band (mediastinum and spine) must be brighter than the lung fields beside
    # it by at least this; a lateral film, or a film of one hemithorax, has lung (or nothing)
    # where the detector puts the midline. Calibrate (demo detector): frontal films 0.020 at
    # the least (5th percentile 0.139); lateral-like images 95th percentile -0.008.
    min_mediastinum_contrast: float = 0.01
    # The view classifier's probability that the film is a frontal chest film the right way
    # round (Landmarks.view; bundles without a classifier skip the check). Set from
    # `screener-train landmarks calibrate --cv-dir ... --view-cv-dir ...`: see the README's
    # gate table for the acceptance per kind at this value.
    min_view_frontal_probability: float = 0.5

    def __post_init__(self) -> None:
        for name in ("missing_body_part", "missing_view", "missing_age"):
            if getattr(self, name) not in _POLICIES:
                raise ValueError(f"EligibilityRules.{name} = {getattr(self, name)!r}: use 'accept' or 'reject'")
        for name in ("sop_classes", "modalities", "body_parts", "views"):
            value = getattr(self, name)
            # An empty list would make nothing eligible: surely a mistake, so say so.
            if not isinstance(value, tuple) or not value or not all(isinstance(v, str) and v.strip() for v in value):
                raise ValueError(f"EligibilityRules.{name} = {value!r}: must be a non-empty list of non-empty strings")
        if not self.max_turned_confidence_ratio > 0.0:
            raise ValueError(f"EligibilityRules.max_turned_confidence_ratio = {self.max_turned_confidence_ratio}: must be > 0 "
                             "(a large value such as 100 turns the upside-down check off)")
        for name in ("min_landmark_confidence", "min_roi_inside", "min_roi_landmark_confidence", "min_view_frontal_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"EligibilityRules.{name} = {getattr(self, name)}: must be within 0..1")
        if not 0.0 <= self.min_thorax_width < self.max_thorax_width:
            raise ValueError(f"EligibilityRules.min_thorax_width/max_thorax_width = {self.min_thorax_width}/{self.max_thorax_width}: need 0 <= min < max")
        if not 0.0 < self.min_thorax_aspect < self.max_thorax_aspect:
            raise ValueError(f"EligibilityRules.min_thorax_aspect/max_thorax_aspect = {self.min_thorax_aspect}/{self.max_thorax_aspect}: need 0 < min < max")
        if not 0.0 < self.max_spine_tilt_deg <= 90.0:
            raise ValueError(f"EligibilityRules.max_spine_tilt_deg = {self.max_spine_tilt_deg}: must be within (0, 90]")
        if not 0.0 <= self.min_age <= 150.0:
            raise ValueError(f"EligibilityRules.min_age = {self.min_age}: must be within 0..150")
        if self.inverted_margin < 0.0:
            raise ValueError(f"EligibilityRules.inverted_margin = {self.inverted_margin}: must be >= 0")
        for name in ("min_heart_side_contrast", "min_heart_side_contrast_with_view"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"EligibilityRules.{name} = {getattr(self, name)}: must be within -1..1 "
                                 "(display values; -1 turns the check off)")
        if not -1.0 <= self.min_mediastinum_contrast <= 1.0:
            raise ValueError(f"EligibilityRules.min_mediastinum_contrast = {self.min_mediastinum_contrast}: must be within -1..1 "
                             "(display values; -1 turns the check off)")


# ---------------------------------------------------------------------------------------------
# header


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # an unparseable value counts as missing; the reason says so
        return ""
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__len__") and len(value) > 0 and not isinstance(value, bytes):
        value = value[0]
    return str(value).strip().upper()


def _raw(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    if value is None:
        return ""
    if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
        value = "\\".join(str(v) for v in value)
    return str(value).strip()


def _coded(ds: Dataset, keyword: str, tag: str, notes: list[str]) -> str:
    """A single coded value in its canonical form (upper case; ViewPosition without the dots
    or dashes of "P.A." / "A-P"), with a note when the sent form differed, so the report
    says what was read. A sent form that is not unambiguous stays as it is and is refused."""
    raw = _raw(ds, keyword)
    value = raw.upper()
    if keyword == "ViewPosition" and value not in ("PA", "AP"):
        squeezed = "".join(c for c in value if c not in ".-/ ")
        if squeezed in ("PA", "AP"):
            value = squeezed
    if value != raw and value:
        how = "in lower case" if raw.upper() == value else "with dots, dashes or spaces"
        notes.append(f"{keyword} {tag} read as '{value}' (sent {how})")
    return value


def _image_type(ds: Dataset, notes: list[str]) -> list[str]:
    """ImageType values; one value holding spaces ("ORIGINAL PRIMARY", a known vendor quirk:
    the separator should be a backslash) is split when its first word is a valid value 1."""
    values = _values(ds, "ImageType")
    if len(values) == 1 and " " in values[0]:
        words = values[0].split()
        if words[0] in ("ORIGINAL", "DERIVED") and all(quote(w, "CS").startswith("'") for w in words):
            joined = "\\".join(words)
            notes.append(f"ImageType (0008,0008) {quote(values[0], 'CS')} read as {joined} "
                         "(values separated by spaces instead of backslashes)")
            return words
    return values


def _values(ds: Dataset, keyword: str) -> list[str]:
    """All values of a multi-valued string attribute, upper case ([] when missing)."""
    try:
        value = ds.get(keyword)
    except Exception:
        return []
    if value is None or value == "":
        return []
    items = value.split("\\") if isinstance(value, str) else list(value)
    return [str(v).strip().upper() for v in items]


def _date(ds: Dataset, keyword: str) -> dt.date | None:
    text = _text(ds, keyword)
    if len(text) == 8 and text.isdigit():
        try:
            return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
        except ValueError:
            return None
    return None


def patient_age(ds: Dataset) -> tuple[float | None, str]:
    """(age in years or None, where it came from / why it is unknown)."""
    text = _text(ds, "PatientAge")
    if text:
        if len(text) == 4 and text[:3].isdigit() and text[3] in "DWMY":
            years = int(text[:3]) / {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[text[3]]
            return years, f"PatientAge (0010,1010) '{text}'"
        bad_age = f"PatientAge (0010,1010) {quote(text, 'AS')} is not a valid age string"
    else:
        bad_age = "PatientAge (0010,1010) is missing"
    birth = _date(ds, "PatientBirthDate")
    if birth is None:
        return None, f"{bad_age} and PatientBirthDate (0010,0030) is missing or invalid"
    for keyword in ("StudyDate", "AcquisitionDate", "ContentDate", "SeriesDate"):
        when = _date(ds, keyword)
        if when is not None:
            if when < birth:
                return None, f"{bad_age} and PatientBirthDate {birth:%Y%m%d} is after {keyword} {when:%Y%m%d}"
            years = when.year - birth.year - ((when.month, when.day) < (birth.month, birth.day))
            return float(years), f"PatientBirthDate (0010,0030) {birth:%Y%m%d} and {keyword} {when:%Y%m%d}"
    return None, f"{bad_age} and there is no StudyDate/AcquisitionDate to compute it from PatientBirthDate"


def _check_sop_class(ds: Dataset, rules: EligibilityRules) -> Decision | None:
    sop = _text(ds, "SOPClassUID")
    if not sop:
        return Decision(False, ReasonCode.SOP_CLASS_MISSING, "SOPClassUID (0008,0016) is missing: cannot tell whether this is an image")
    name = UID(sop).name
    label = f"SOPClassUID (0008,0016) {sop} ({name})" if name != sop else f"SOPClassUID (0008,0016) {sop}"
    if _text(ds, "Manufacturer") == MANUFACTURER.upper():
        # our own SR, GSPS, result image or PDF, come back through a routing loop
        return Decision(False, ReasonCode.OWN_OUTPUT, f"{label} was written by {MANUFACTURER} (Manufacturer (0008,0070)): "
                                             "our own result, never screened")
    if sop in rules.sop_classes:
        return None
    if sop.startswith((_SR_FAMILY, _PR_FAMILY)):
        return Decision(False, ReasonCode.SOP_CLASS_NOT_IMAGE, f"{label} is not an image (structured report, key object or presentation state)")
    if sop == _SECONDARY_CAPTURE_FAMILY or sop.startswith(_SECONDARY_CAPTURE_FAMILY + "."):
        if rules.accept_secondary_capture:
            return None
        return Decision(False, ReasonCode.SECONDARY_CAPTURE, f"{label} is a secondary capture (a screenshot or scanned copy, not a calibrated radiograph)")
    return Decision(False, ReasonCode.SOP_CLASS_NOT_SCREENED, f"{label} is not one of the screened image classes ({', '.join(rules.sop_classes)})")


def _view_from_code(ds: Dataset) -> str:
    """PA / AP / LATERAL from ViewCodeSequence meaning when ViewPosition is empty; '' if unknown."""
    try:
        items = ds.get("ViewCodeSequence") or []
        meaning = str(items[0].get("CodeMeaning", "")) if len(items) else ""
    except Exception:
        return ""
    flat = meaning.lower().replace("-", "").replace(" ", "")
    if "lateral" in flat:
        return "LATERAL"
    if "posteroanterior" in flat:
        return "PA"
    if "anteroposterior" in flat:
        return "AP"
    return ""


def check_header(ds: Dataset, rules: EligibilityRules = EligibilityRules()) -> Decision:
    """Header-only eligibility: no pixels needed, so it runs before decoding."""
    refused = _check_sop_class(ds, rules)
    if refused is not None:
        return refused
    notes: list[str] = []
    accepted: list[str] = []

    modality = _coded(ds, "Modality", "(0008,0060)", notes)
    allowed = {m.upper() for m in rules.modalities}
    if not modality:
        return Decision(False, ReasonCode.MODALITY_MISSING, f"Modality (0008,0060) is missing; screened modalities are {', '.join(rules.modalities)}")
    if modality not in allowed:
        return Decision(False, ReasonCode.MODALITY, f"Modality (0008,0060) is {quote(modality, 'CS')}; screened modalities are {', '.join(rules.modalities)}")
    accepted.append(modality)

    body_part = _coded(ds, "BodyPartExamined", "(0018,0015)", notes)
    if not body_part:
        if rules.missing_body_part == "reject":
            return Decision(False, ReasonCode.BODY_PART_MISSING, "BodyPartExamined (0018,0015) is missing and the missing_body_part policy is 'reject'")
        notes.append("BodyPartExamined (0018,0015) is missing (accepted; the landmark check must confirm a chest)")
    elif body_part not in {b.upper() for b in rules.body_parts}:
        return Decision(False, ReasonCode.BODY_PART, f"BodyPartExamined (0018,0015) is {quote(body_part, 'CS')}; screened body parts are {', '.join(rules.body_parts)}")
    else:
        accepted.append(body_part)

    view = _coded(ds, "ViewPosition", "(0018,5101)", notes)
    source = "ViewPosition (0018,5101)"
    if not view:
        view, source = _view_from_code(ds), "ViewCodeSequence (0054,0220) meaning"
    if not view:
        if rules.missing_view == "reject":
            return Decision(False, ReasonCode.VIEW_MISSING, "ViewPosition (0018,5101) is missing and the missing_view policy is 'reject'")
        notes.append("ViewPosition (0018,5101) is missing (accepted; the landmark check must confirm a frontal film)")
    elif view not in {v.upper() for v in rules.views}:
        return Decision(False, ReasonCode.VIEW_NOT_FRONTAL, f"{source} is {quote(view, 'CS')}; only {', '.join(rules.views)} films are screened")
    else:
        accepted.append(view)

    image_type = _image_type(ds, notes)
    if not image_type:
        notes.append("ImageType (0008,0008) is missing (accepted)")
    else:
        value = "\\".join(image_type)
        if len(image_type) > 1 and image_type[1] == "SECONDARY":
            return Decision(False, ReasonCode.SECONDARY_IMAGE, f"ImageType (0008,0008) is {value}: a SECONDARY image is a copy or reformat, not the acquired film")
        if image_type[0] == "DERIVED" and not rules.accept_derived_primary:
            return Decision(False, ReasonCode.DERIVED_IMAGE, f"ImageType (0008,0008) is {value} and only ORIGINAL images are screened")
        if image_type[0] not in ("ORIGINAL", "DERIVED"):
            return Decision(False, ReasonCode.IMAGE_TYPE, f"ImageType (0008,0008) value 1 is {quote(image_type[0], 'CS')}: must be ORIGINAL or DERIVED")

    age, age_source = patient_age(ds)
    if age is None:
        if rules.missing_age == "reject":
            return Decision(False, ReasonCode.AGE_MISSING, f"patient age unknown: {age_source}; the missing_age policy is 'reject'")
        notes.append(f"patient age unknown: {age_source} (accepted by the missing_age policy; the WHO category assumes age >= {rules.min_age:g})")
    elif age < rules.min_age:
        return Decision(False, ReasonCode.AGE_BELOW_MINIMUM, f"patient age {age:.0f} years (from {age_source}) is below the minimum of {rules.min_age:g}")
    else:
        accepted.append(f"age {age:.0f} from {age_source}")

    reason = "eligible: " + ", ".join(accepted)
    if notes:
        reason += "; " + "; ".join(notes)
    return Decision(True, ELIGIBLE, reason)


# ---------------------------------------------------------------------------------------------
# landmarks

_RIGHT_LEFT_PAIRS = (
    ("clavicle_right_medial", "clavicle_left_medial"),
    ("clavicle_right_mid", "clavicle_left_mid"),
    ("clavicle_right_lateral", "clavicle_left_lateral"),
    ("ribcage_right_20", "ribcage_left_20"),
    ("ribcage_right_40", "ribcage_left_40"),
    ("ribcage_right_60", "ribcage_left_60"),
    ("ribcage_right_80", "ribcage_left_80"),
)
_CLAVICLE_POINTS = tuple(f"clavicle_{s}_{p}" for s in ("right", "left") for p in ("medial", "mid", "lateral"))
_RIB_LEVELS = (20, 40, 60, 80)
#: The landmarks that place each lateral ROI (the spine ROIs follow from these too).
ROI_LANDMARKS: dict[str, tuple[str, ...]] = {
    **{f"{s}_clavicle": tuple(f"clavicle_{s}_{p}" for p in ("medial", "mid", "lateral")) for s in ("right", "left")},
    **{f"{s}_ribcage": tuple(f"ribcage_{s}_{k}" for k in _RIB_LEVELS) for s in ("right", "left")},
}


def roi_landmark_confidence(landmarks: Landmarks) -> dict[str, float]:
    """Median confidence of the landmarks that place each lateral ROI (:data:`ROI_LANDMARKS`)."""
    from screener.pipeline.landmarks import LANDMARK_NAMES  # torch-heavy module, imported late

    index = {n: i for i, n in enumerate(LANDMARK_NAMES)}
    return {roi: float(np.median(landmarks.confidence[[index[n] for n in names]])) for roi, names in ROI_LANDMARKS.items()}


def thorax_aspect(landmarks: Landmarks) -> float:
    """Cervical-to-T12 length over the thorax width (between the 40 % rib-cage points)."""
    p = landmarks.__getitem__
    width = float(np.hypot(*(p("ribcage_left_40") - p("ribcage_right_40"))))
    return float(np.hypot(*(p("t12") - p("cervical_spine")))) / max(width, 1e-6)


def _roi_inside_fraction(box: Any, image_shape: tuple[int, int], n: int = 16) -> float:
    """Share of the box's area inside the image (pixel centres at integer coordinates)."""
    t = (np.arange(n) + 0.5) / n - 0.5
    uv = np.stack(np.meshgrid(t, t), axis=-1).reshape(-1, 2)
    xy = box.to_source(uv)
    rows, cols = image_shape
    inside = (xy[:, 0] >= -0.5) & (xy[:, 0] <= cols - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] <= rows - 0.5)
    return float(inside.mean())


def check_landmarks(landmarks: Landmarks, image_shape: tuple[int, int], rules: EligibilityRules = EligibilityRules()) -> Decision:
    """Are the 16 detected points confident and shaped like a frontal chest film?

    Checks run from the most basic to the most specific, so the first failure names the
    real problem: a film rotated by 90 degrees fails on the spine axis, not on a side swap.
    """
    from screener.pipeline.landmarks import LANDMARK_NAMES  # torch-heavy module, imported late

    p = landmarks.__getitem__
    rows, cols = int(image_shape[0]), int(image_shape[1])
    if not np.all(np.isfinite(landmarks.points)) or not np.all(np.isfinite(landmarks.confidence)):
        return Decision(False, ReasonCode.LANDMARKS_NOT_FINITE, "the landmark detector returned non-finite points or confidence")

    # The median, not the minimum: the two derived points (cervical spine, T12) sit on no edge
    # and are always the least certain, while a non-chest image leaves most heatmaps diffuse.
    median = float(np.median(landmarks.confidence))
    if median < rules.min_landmark_confidence:
        worst = int(np.argmin(landmarks.confidence))
        return Decision(
            False,
            ReasonCode.LOW_LANDMARK_CONFIDENCE,
            f"median landmark confidence {median:.3f} is below the minimum of {rules.min_landmark_confidence:.3f} "
            f"(least sure: {LANDMARK_NAMES[worst]} at {landmarks.confidence[worst]:.3f}): not a recognisable frontal chest film",
        )

    turned = float(landmarks.turned_confidence)
    if math.isfinite(turned) and turned >= rules.max_turned_confidence_ratio * median:
        return Decision(
            False,
            ReasonCode.UPSIDE_DOWN,
            f"the detector finds a chest in this image turned by 180 degrees (median confidence {turned:.3f}) at least "
            f"{rules.max_turned_confidence_ratio:g} times as readily as in the image as it is ({median:.3f}): "
            "the film is upside down or flipped top to bottom",
        )

    for roi, roi_conf in roi_landmark_confidence(landmarks).items():
        if roi_conf < rules.min_roi_landmark_confidence:
            return Decision(
                False,
                ReasonCode.ROI_LANDMARKS_UNSURE,
                f"the {roi.replace('_', ' ')} landmarks have median confidence {roi_conf:.3f}, below the minimum of "
                f"{rules.min_roi_landmark_confidence:g}: the detector did not find that structure (an abnormal or "
                "cut-off film), so its ROI would be misplaced",
            )

    span = landmarks.points.max(axis=0) - landmarks.points.min(axis=0)
    if span[0] < 0.1 * cols or span[1] < 0.1 * rows:
        return Decision(
            False,
            ReasonCode.LANDMARKS_COLLAPSED,
            f"the 16 landmarks span only {span[0]:.0f} x {span[1]:.0f} px of a {cols} x {rows} image: no thorax was found",
        )

    axis = p("t12") - p("cervical_spine")
    tilt = math.degrees(math.atan2(abs(float(axis[0])), float(axis[1])))  # 0 = T12 straight below
    if tilt > 135.0:  # the cervical point is nearer the bottom than the sides: upside down
        return Decision(
            False,
            ReasonCode.SPINE_UPSIDE_DOWN,
            f"the cervical spine landmark (row {p('cervical_spine')[1]:.0f}) is below T12 (row {p('t12')[1]:.0f}): the film is upside down",
        )
    if tilt > rules.max_spine_tilt_deg:
        return Decision(
            False,
            ReasonCode.SPINE_TILTED,
            f"the spine axis (cervical to T12) is {tilt:.0f} degrees from vertical, more than {rules.max_spine_tilt_deg:g}: a rotated or lateral film",
        )

    for right, left in _RIGHT_LEFT_PAIRS:
        if p(right)[0] >= p(left)[0]:
            return Decision(
                False,
                ReasonCode.SIDES_SWAPPED,
                f"{right} (column {p(right)[0]:.0f}) is not left of {left} (column {p(left)[0]:.0f}) on the image: "
                "the patient's right must be on the image's left (a mirrored film or a lateral)",
            )

    lowest_clavicle = max(_CLAVICLE_POINTS, key=lambda n: p(n)[1])
    rib_floor = min(p("ribcage_right_80")[1], p("ribcage_left_80")[1])
    if p(lowest_clavicle)[1] >= rib_floor:
        return Decision(
            False,
            ReasonCode.CLAVICLES_BELOW_RIBS,
            f"{lowest_clavicle} (row {p(lowest_clavicle)[1]:.0f}) is not above the 80 % rib-cage points (row {rib_floor:.0f})",
        )

    for side in ("right", "left"):
        ys = [float(p(f"ribcage_{side}_{k}")[1]) for k in _RIB_LEVELS]
        if not all(a < b for a, b in zip(ys, ys[1:])):
            return Decision(
                False,
                ReasonCode.RIBCAGE_ORDER,
                f"the {side} rib-cage points (20/40/60/80 %) are not in order from top to bottom (rows {', '.join(f'{y:.0f}' for y in ys)})",
            )

    width = float(np.hypot(*(p("ribcage_left_40") - p("ribcage_right_40")))) / cols
    if not rules.min_thorax_width <= width <= rules.max_thorax_width:
        return Decision(
            False,
            ReasonCode.THORAX_WIDTH,
            f"the thorax (40 % rib-cage points) is {width:.2f} of the image width; expected {rules.min_thorax_width:g} to {rules.max_thorax_width:g}",
        )

    # Spine length over thorax width: a whole chest is about as tall as it is wide, while a
    # field cut to the lower chest and abdomen squeezes the detected thorax flat.
    aspect = thorax_aspect(landmarks)
    if not rules.min_thorax_aspect <= aspect <= rules.max_thorax_aspect:
        return Decision(
            False,
            ReasonCode.THORAX_ASPECT,
            f"the detected thorax is {aspect:.2f} times as tall (cervical spine to T12) as it is wide; expected "
            f"{rules.min_thorax_aspect:g} to {rules.max_thorax_aspect:g}: not a whole frontal chest",
        )

    from screener.pipeline.rois import LOCAL_ROI_NAMES, roi_boxes

    try:
        boxes = roi_boxes(landmarks, (rows, cols))
    except ValueError as exc:
        return Decision(False, ReasonCode.ROI_GEOMETRY, f"the ROIs cannot be placed from these landmarks: {exc}")
    for name in LOCAL_ROI_NAMES:
        inside = _roi_inside_fraction(boxes[name], (rows, cols))
        if inside < rules.min_roi_inside:
            return Decision(
                False,
                ReasonCode.ROI_OUTSIDE_IMAGE,
                f"only {inside:.0%} of the {name} ROI lies inside the image (minimum {rules.min_roi_inside:.0%}): the film is cut off",
            )
    return Decision(
        True,
        ELIGIBLE,
        f"eligible: median landmark confidence {np.median(landmarks.confidence):.2f}, spine {tilt:.0f} degrees from vertical, thorax {width:.2f} of the image width",
    )


# ---------------------------------------------------------------------------------------------
# image


def _sample(pixels: np.ndarray, xy: np.ndarray) -> np.ndarray:
    rows, cols = pixels.shape
    ix, iy = np.rint(xy[:, 0]).astype(np.int64), np.rint(xy[:, 1]).astype(np.int64)
    keep = (ix >= 0) & (ix < cols) & (iy >= 0) & (iy < rows)
    return pixels[iy[keep], ix[keep]]


def _midline_x(landmarks: Landmarks, y: np.ndarray) -> np.ndarray:
    top, bottom = landmarks["cervical_spine"], landmarks["t12"]
    s = (y - top[1]) / max(float(bottom[1] - top[1]), 1e-6)
    return top[0] + s * (bottom[0] - top[0])


def check_image(pixels: np.ndarray, landmarks: Landmarks, rules: EligibilityRules = EligibilityRules()) -> Decision:
    """Does the film display the right way round, with a mediastinum, and the heart on the left?

    Some MONOCHROME2 files are stored inverted (lungs bright, spine dark). Between the rib-cage
    border and the midline, at the 20-60 % levels, lies aerated lung; along the midline lies
    the mediastinum and spine. On a correctly displayed film the lungs are the darker of the
    two; when they are clearly brighter the grey scale is inverted, and the model, trained on
    bright bone, would read it upside down. When they are about as bright, there is no
    mediastinum between two lungs where the detector put it (a lateral or one side only).
    Call after :func:`check_landmarks` has passed.
    """
    if pixels.ndim != 2:
        return Decision(False, ReasonCode.IMAGE_SHAPE, f"expected a 2-D grey image, got shape {pixels.shape}")
    values = lung_and_mediastinum(pixels, landmarks)
    if values is None:
        return Decision(False, ReasonCode.LUNG_FIELDS_OUTSIDE_IMAGE, "the lung fields or the mediastinum fall outside the image: cannot check the grey scale")
    lung_value, centre_value = values
    if lung_value - centre_value > rules.inverted_margin:
        return Decision(
            False,
            ReasonCode.INVERTED,
            f"the lung fields (median display value {lung_value:.2f}) are brighter than the mediastinum and spine ({centre_value:.2f}): "
            "the image displays inverted; check PhotometricInterpretation (0028,0004) and PresentationLUTShape (2050,0020)",
        )
    if centre_value - lung_value < rules.min_mediastinum_contrast:
        return Decision(
            False,
            ReasonCode.NO_MEDIASTINUM,
            f"the band along the midline (median display value {centre_value:.2f}) is not brighter than the lung fields "
            f"({lung_value:.2f}) by at least {rules.min_mediastinum_contrast:g}: no mediastinum and spine between two lungs, "
            "as on a lateral film or a film of one side",
        )
    contrast = heart_side_contrast(pixels, landmarks)
    if contrast is None:
        return Decision(False, ReasonCode.LUNG_FIELDS_OUTSIDE_IMAGE,
                        "a lower lung zone beside the midline falls outside the image: cannot check on which side the heart lies")
    # with a view classifier behind it the check may be more lenient (EligibilityRules)
    least = rules.min_heart_side_contrast if landmarks.view is None else rules.min_heart_side_contrast_with_view
    if contrast < least:
        return Decision(
            False,
            ReasonCode.HEART_ON_IMAGE_LEFT,
            f"the lower zone beside the midline is {contrast:+.2f} brighter on the image's right than on its left "
            f"(at least {least:+.2f} expected): the heart shadow is not on the image's right, "
            "so the film is mirrored (or the patient has dextrocardia); the left/right ROIs would be swapped",
        )
    return Decision(True, ELIGIBLE, f"eligible: lung fields {lung_value:.2f} darker than the mediastinum {centre_value:.2f}, "
                    f"heart shadow on the image's right ({contrast:+.2f})")


def lung_and_mediastinum(pixels: np.ndarray, landmarks: Landmarks, min_samples: int = 20) -> tuple[float, float] | None:
    """Median display values of the lung fields and of the midline band (mediastinum and
    spine) at the 20-60 % rib-cage levels; None when either has under ``min_samples`` pixels
    on the image.

    The lungs: 25-60 % of the way from each rib-cage border to the midline; the band: 4 % of
    the thorax width either side of the cervical-to-T12 line.
    """
    width = float(np.hypot(*(landmarks["ribcage_left_40"] - landmarks["ribcage_right_40"])))
    fractions = np.linspace(0.25, 0.6, 8)  # of the way from the rib border to the midline
    lung_points = []
    for side in ("right", "left"):
        top = landmarks[f"ribcage_{side}_20"]
        bottom = landmarks[f"ribcage_{side}_60"]
        for level in np.linspace(0.0, 1.0, 12):
            border = top + level * (bottom - top)
            mid = np.array([_midline_x(landmarks, np.array([border[1]]))[0], border[1]])
            lung_points.append(border + fractions[:, None] * (mid - border))
    ys = np.linspace(
        (landmarks["ribcage_right_20"][1] + landmarks["ribcage_left_20"][1]) / 2,
        (landmarks["ribcage_right_60"][1] + landmarks["ribcage_left_60"][1]) / 2,
        24,
    )
    offsets = np.linspace(-0.04, 0.04, 5) * width
    mx = _midline_x(landmarks, ys)
    band = np.stack([np.repeat(mx, offsets.size) + np.tile(offsets, ys.size), np.repeat(ys, offsets.size)], axis=1)
    lungs = _sample(pixels, np.concatenate(lung_points))
    centre = _sample(pixels, band)
    lungs, centre = lungs[np.isfinite(lungs)], centre[np.isfinite(centre)]
    if lungs.size < min_samples or centre.size < min_samples:
        return None
    return float(np.median(lungs)), float(np.median(centre))


def check_view(landmarks: Landmarks, rules: EligibilityRules = EligibilityRules()) -> Decision:
    """Does the view classifier call the film a frontal chest film the right way round?

    Eligible when the bundle has no classifier (``landmarks.view`` is None). A film the
    classifier finds likeliest flipped left to right is refused as ``mirrored`` (its left and
    right ROIs would be swapped); any other kind as ``not-frontal-chest``.
    """
    scores = landmarks.view
    if scores is None:
        return Decision(True, ELIGIBLE, "eligible: no view classifier in this bundle")
    if not all(math.isfinite(p) for p in scores.probabilities):  # argmax would name a kind at random
        return Decision(False, ReasonCode.NOT_FRONTAL_CHEST, "the view classifier gave no finite probability for this film")
    if scores.frontal >= rules.min_view_frontal_probability:
        return Decision(True, ELIGIBLE, f"eligible: view classifier {scores.frontal:.2f} frontal")
    kind, p = scores.likeliest_other
    looks = kind.replace("_", " ")
    if kind == "mirrored":
        return Decision(False, ReasonCode.MIRRORED,
                        f"the view classifier finds the film flipped left to right ({p:.2f}; frontal {scores.frontal:.2f}, "
                        f"at least {rules.min_view_frontal_probability:g} needed): its left and right ROIs would be swapped; "
                        "check the laterality marker and the modality's image orientation (PatientOrientation (0020,0020))")
    return Decision(False, ReasonCode.NOT_FRONTAL_CHEST,
                    f"the view classifier does not find a frontal chest film the right way round (frontal {scores.frontal:.2f}, "
                    f"at least {rules.min_view_frontal_probability:g} needed); likeliest: {looks} ({p:.2f})")


def check_film(pixels: np.ndarray, landmarks: Landmarks, rules: EligibilityRules = EligibilityRules()) -> Decision:
    """The whole image gate: :func:`check_landmarks`, :func:`check_image`, :func:`check_view`,
    each only if the one before passed (so each film keeps the most specific reason)."""
    decision = check_landmarks(landmarks, pixels.shape, rules)
    if decision.eligible:
        decision = check_image(pixels, landmarks, rules)
    return check_view(landmarks, rules) if decision.eligible else decision


def heart_side_contrast(pixels: np.ndarray, landmarks: Landmarks, min_samples: int = 20) -> float | None:
    """Median display value of the lower zone beside the midline on the image's right (the
    patient's left, where the heart lies) minus that on the image's left; None when either
    zone has fewer than ``min_samples`` finite pixels on the image.

    The zone: the 60-80 % rib-cage levels, from 45 % to 80 % of the way from the rib border
    to the midline, on each side; the heart's left border crosses it on a frontal film.
    """
    medians = []
    for side in ("left", "right"):
        top, bottom = landmarks[f"ribcage_{side}_60"], landmarks[f"ribcage_{side}_80"]
        points = []
        for level in np.linspace(0.0, 1.0, 10):
            border = top + level * (bottom - top)
            mid = np.array([_midline_x(landmarks, np.array([border[1]]))[0], border[1]])
            points.append(border + np.linspace(0.45, 0.8, 8)[:, None] * (mid - border))
        values = _sample(pixels, np.concatenate(points))
        values = values[np.isfinite(values)]
        if values.size < min_samples:
            return None
        medians.append(float(np.median(values)))
    return medians[0] - medians[1]
