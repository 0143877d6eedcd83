"""Eligibility gates: header rules, landmark geometry, inverted grey scale."""

from __future__ import annotations

import math

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from screener.pipeline.eligibility import (
    CR_IMAGE_STORAGE,
    DX_PRESENTATION_STORAGE,
    DX_PROCESSING_STORAGE,
    Decision,
    EligibilityRules,
    check_header,
    check_image,
    check_landmarks,
    patient_age,
)
from screener.pipeline.landmarks import LANDMARK_NAMES, Landmarks
from tests.support.common import edit_dataset, SHARED, rg1_file, synthetic_contours, synthetic_film
from training.jsrt import landmarks_from_contours

# ---------------------------------------------------------------------------------------------
# header


def _header(**changes: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientAge = "064Y"
    return edit_dataset(ds, **changes)


def _refused(decision: Decision, code: str, *named: str) -> None:
    assert not decision.eligible and decision.code == code, decision
    for text in named:
        assert text in decision.reason, (text, decision.reason)


def test_frontal_adult_chest_is_eligible() -> None:
    d = check_header(_header())
    assert d == Decision(True, "eligible", d.reason) and "CR" in d.reason and "age 64" in d.reason


@pytest.mark.parametrize("sop", [CR_IMAGE_STORAGE, DX_PRESENTATION_STORAGE, DX_PROCESSING_STORAGE])
def test_radiograph_sop_classes_are_eligible(sop: str) -> None:
    assert check_header(_header(SOPClassUID=sop, Modality="DX")).eligible


@pytest.mark.parametrize(
    "sop, code, name",
    [
        ("1.2.840.10008.5.1.4.1.1.88.33", "sop-class-not-image", "Comprehensive SR Storage"),
        ("1.2.840.10008.5.1.4.1.1.88.22", "sop-class-not-image", "Enhanced SR Storage"),
        ("1.2.840.10008.5.1.4.1.1.11.1", "sop-class-not-image", "Grayscale Softcopy Presentation State Storage"),
        ("1.2.840.10008.5.1.4.1.1.88.59", "sop-class-not-image", "Key Object Selection Document Storage"),
        ("1.2.840.10008.5.1.4.1.1.7", "secondary-capture", "Secondary Capture Image Storage"),
        ("1.2.840.10008.5.1.4.1.1.2", "sop-class-not-screened", "CT Image Storage"),
    ],
)
def test_non_radiograph_sop_classes_are_refused_by_name(sop: str, code: str, name: str) -> None:
    _refused(check_header(_header(SOPClassUID=sop)), code, "SOPClassUID", sop, name)


def test_secondary_capture_is_an_option_and_sop_class_is_required() -> None:
    sc = _header(SOPClassUID="1.2.840.10008.5.1.4.1.1.7")
    assert check_header(sc, EligibilityRules(accept_secondary_capture=True)).eligible
    _refused(check_header(_header(SOPClassUID=None)), "sop-class-missing", "SOPClassUID")


def test_modality() -> None:
    assert check_header(_header(Modality="DX")).eligible
    _refused(check_header(_header(Modality="CT")), "modality", "Modality", "'CT'")
    _refused(check_header(_header(Modality=None)), "modality-missing", "Modality")
    assert check_header(_header(Modality="MG"), EligibilityRules(modalities=("CR", "DX", "MG"))).eligible


def test_body_part() -> None:
    assert check_header(_header(BodyPartExamined="THORAX")).eligible
    _refused(check_header(_header(BodyPartExamined="ABDOMEN")), "body-part", "BodyPartExamined", "'ABDOMEN'")
    missing = check_header(_header(BodyPartExamined=None))
    assert missing.eligible and "BodyPartExamined (0018,0015) is missing" in missing.reason
    _refused(check_header(_header(BodyPartExamined=None), EligibilityRules(missing_body_part="reject")), "body-part-missing", "BodyPartExamined")


def test_view_position() -> None:
    assert check_header(_header(ViewPosition="AP")).eligible
    for view in ("LL", "RL", "LLD"):
        _refused(check_header(_header(ViewPosition=view)), "view-not-frontal", "ViewPosition", f"'{view}'")
    missing = check_header(_header(ViewPosition=None))
    assert missing.eligible and "ViewPosition (0018,5101) is missing" in missing.reason
    _refused(check_header(_header(ViewPosition=None), EligibilityRules(missing_view="reject")), "view-missing", "ViewPosition")


def test_view_code_sequence_is_read_when_view_position_is_empty() -> None:
    ds = _header(ViewPosition="")
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "R-10236", "SRT", "left lateral"
    ds.ViewCodeSequence = [code]
    _refused(check_header(ds), "view-not-frontal", "ViewCodeSequence", "LATERAL")
    code.CodeMeaning = "postero-anterior"
    assert check_header(ds).eligible


def test_image_type() -> None:
    assert check_header(_header(ImageType=["DERIVED", "PRIMARY"])).eligible  # how vendors label processed films
    assert check_header(_header(ImageType="ORIGINAL")).eligible  # a single value
    _refused(check_header(_header(ImageType=["DERIVED", "SECONDARY"])), "secondary-image", "ImageType", "DERIVED\\SECONDARY")
    _refused(
        check_header(_header(ImageType=["DERIVED", "PRIMARY"]), EligibilityRules(accept_derived_primary=False)),
        "derived-image",
        "ImageType",
    )
    missing = check_header(_header(ImageType=None))
    assert missing.eligible and "ImageType" in missing.reason


@pytest.mark.parametrize(
    "age, eligible",
    [("049Y", False), ("050Y", True), ("064Y", True), ("600M", True), ("599M", False), ("300W", False)],
)
def test_age_from_patient_age(age: str, eligible: bool) -> None:
    d = check_header(_header(PatientAge=age))
    assert d.eligible is eligible, d
    if not eligible and len(age) == 4:
        _refused(d, "age-below-minimum", "PatientAge", age)


def test_age_from_birth_date_and_study_date() -> None:
    day_before = _header(PatientAge=None, PatientBirthDate="19700615", StudyDate="20200614")
    _refused(check_header(day_before), "age-below-minimum", "49", "PatientBirthDate", "StudyDate")
    birthday = _header(PatientAge=None, PatientBirthDate="19700615", StudyDate="20200615")
    assert check_header(birthday).eligible
    acquisition = _header(PatientAge=None, PatientBirthDate="19600101", AcquisitionDate="20200101")
    assert patient_age(acquisition) == (60.0, "PatientBirthDate (0010,0030) 19600101 and AcquisitionDate 20200101")
    backwards = _header(PatientAge=None, PatientBirthDate="20210101", StudyDate="20200101")
    assert patient_age(backwards)[0] is None and "after StudyDate" in patient_age(backwards)[1]
    assert check_header(_header(PatientAge="045Y"), EligibilityRules(min_age=40)).eligible


def test_missing_age_policy() -> None:
    unknown = _header(PatientAge=None)
    accepted = check_header(unknown)
    assert accepted.eligible and "age unknown" in accepted.reason and "PatientAge" in accepted.reason
    _refused(check_header(unknown, EligibilityRules(missing_age="reject")), "age-missing", "PatientAge", "PatientBirthDate")
    garbled = _header(PatientAge="sixty")
    _refused(check_header(garbled, EligibilityRules(missing_age="reject")), "age-missing", "PatientAge (0010,1010) a value that is not a valid AS (not quoted) is not a valid age string")


def test_real_headers() -> None:
    # pydicom-data RG1: DERIVED\PRIMARY CR PA CHEST, no PatientAge, born 1940, studied 2004.
    rg1 = check_header(pydicom.dcmread(rg1_file(), stop_before_pixels=True))
    assert rg1.eligible and "age 64" in rg1.reason


@pytest.mark.skipif(not (SHARED / "dicom").is_dir(), reason="extended check: ../shared/data/dicom not present")
def test_shared_headers() -> None:
    # highdicom's DX test file is a 5-year-old's THORAX without ViewPosition (a veterinary film).
    dx = check_header(pydicom.dcmread(SHARED / "dicom" / "highdicom_dx_image.dcm", stop_before_pixels=True))
    _refused(dx, "age-below-minimum", "005Y")
    canon = check_header(pydicom.dcmread(SHARED / "dicom" / "canon_dx_chest_j2k.dcm", stop_before_pixels=True))
    assert canon.eligible and "age unknown" in canon.reason


def test_rules_validate_their_values() -> None:
    with pytest.raises(ValueError, match="missing_age"):
        EligibilityRules(missing_age="maybe")
    with pytest.raises(ValueError, match="min_landmark_confidence"):
        EligibilityRules(min_landmark_confidence=1.5)
    with pytest.raises(ValueError, match="views"):
        EligibilityRules(views=["PA"])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# landmarks

SHAPE = (512, 512)


def _landmarks(points: np.ndarray | None = None, confidence: float = 0.6) -> Landmarks:
    pts = landmarks_from_contours(synthetic_contours()) if points is None else points
    return Landmarks(points=np.asarray(pts, float), confidence=np.full(len(LANDMARK_NAMES), confidence))


def _rotated(degrees: float) -> Landmarks:
    pts = _landmarks().points
    c = np.array([255.5, 255.5])
    a = math.radians(degrees)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return _landmarks((pts - c) @ rot.T + c)


def _moved(**moves: tuple[float, float]) -> Landmarks:
    pts = _landmarks().points.copy()
    for name, xy in moves.items():
        pts[LANDMARK_NAMES.index(name)] = xy
    return _landmarks(pts)


def test_plausible_landmarks_are_eligible() -> None:
    d = check_landmarks(_landmarks(), SHAPE)
    assert d.eligible and d.code == "eligible", d
    assert check_landmarks(_rotated(15), SHAPE).eligible  # a slightly rotated patient is fine


def test_low_median_confidence_is_refused_naming_the_least_sure_landmark() -> None:
    lm = _landmarks()
    threshold = EligibilityRules().min_landmark_confidence
    conf = np.full(16, threshold / 2)
    conf[LANDMARK_NAMES.index("t12")] = threshold / 10
    _refused(check_landmarks(Landmarks(lm.points, conf), SHAPE), "low-landmark-confidence", "median", "t12")
    assert check_landmarks(Landmarks(lm.points, conf), SHAPE, EligibilityRules(min_landmark_confidence=threshold / 4)).eligible


def test_one_unsure_derived_landmark_does_not_refuse_a_film() -> None:
    """The derived points (cervical spine, T12) are always the least sure; the median ignores one."""
    lm = _landmarks()
    conf = np.ones(16)
    conf[LANDMARK_NAMES.index("t12")] = 0.0
    conf[LANDMARK_NAMES.index("cervical_spine")] = 0.0
    assert check_landmarks(Landmarks(lm.points, conf), SHAPE).eligible


def test_rotated_films_fail_on_the_spine_axis() -> None:
    _refused(check_landmarks(_rotated(90), SHAPE), "spine-tilted", "90 degrees")
    _refused(check_landmarks(_rotated(40), SHAPE), "spine-tilted", "40 degrees")
    _refused(check_landmarks(_rotated(180), SHAPE), "spine-upside-down", "cervical", "below T12")
    assert check_landmarks(_rotated(40), SHAPE, EligibilityRules(max_spine_tilt_deg=45)).code != "spine-tilted"


def test_mirrored_film_fails_on_sides() -> None:
    pts = _landmarks().points.copy()
    pts[:, 0] = 511 - pts[:, 0]
    _refused(check_landmarks(_landmarks(pts), SHAPE), "sides-swapped", "clavicle_right_medial", "image's left")


def test_collapsed_and_non_finite_points() -> None:
    _refused(check_landmarks(_landmarks(np.full((16, 2), 256.0)), SHAPE), "landmarks-collapsed", "16 landmarks span")
    pts = _landmarks().points.copy()
    pts[3, 0] = np.nan
    _refused(check_landmarks(_landmarks(pts), SHAPE), "landmarks-not-finite")


def test_clavicles_must_be_above_the_lower_ribs() -> None:
    pts = _landmarks().points.copy()
    for name in ("clavicle_right_medial", "clavicle_right_mid", "clavicle_right_lateral"):
        pts[LANDMARK_NAMES.index(name), 1] = 430.0
    _refused(check_landmarks(_landmarks(pts), SHAPE), "clavicles-below-ribs", "clavicle_right", "80 %")


def test_rib_points_must_run_top_to_bottom() -> None:
    lm = _landmarks()
    r40, r60 = lm["ribcage_left_40"].copy(), lm["ribcage_left_60"].copy()
    _refused(check_landmarks(_moved(ribcage_left_40=tuple(r60), ribcage_left_60=tuple(r40)), SHAPE), "ribcage-order", "left rib-cage")


def test_flattened_thorax_is_refused() -> None:
    """A film cut to the lower chest: the detector squeezes the thorax flat."""
    lm = _landmarks()
    pts = lm.points.copy()
    centre_y = pts[:, 1].mean()
    pts[:, 1] = centre_y + (pts[:, 1] - centre_y) * 0.5
    _refused(check_landmarks(Landmarks(pts, lm.confidence), SHAPE), "thorax-aspect", "times as tall")


def test_thorax_width_fraction() -> None:
    # The same thorax on a 512 x 1400 image is only ~0.22 of its width.
    _refused(check_landmarks(_landmarks(), (512, 1400)), "thorax-width", "0.3")
    assert check_landmarks(_landmarks(), (512, 1400), EligibilityRules(min_thorax_width=0.1)).eligible


def test_rois_must_be_mostly_inside_the_image() -> None:
    pts = _landmarks().points.copy()
    pts[:, 1] -= 130  # the film is cut off at the neck: the cervical ROI hangs above the top
    _refused(check_landmarks(_landmarks(pts), SHAPE), "roi-outside-image", "ROI lies inside the image")


# ---------------------------------------------------------------------------------------------
# inverted grey scale


def test_synthetic_film_and_its_inverse() -> None:
    film, lm = synthetic_film(), _landmarks()
    assert check_image(film, lm).eligible
    _refused(check_image(1.0 - film, lm), "inverted", "lung fields", "PhotometricInterpretation")


# Hand-placed on RG1_UNCR (fractions of width, height), LANDMARK_NAMES order.
RG1_LANDMARKS = np.array(
    [[0.44, 0.19], [0.31, 0.165], [0.17, 0.145], [0.56, 0.19], [0.69, 0.165], [0.83, 0.14],
     [0.13, 0.25], [0.10, 0.38], [0.09, 0.52], [0.08, 0.66], [0.86, 0.25], [0.88, 0.38],
     [0.89, 0.52], [0.90, 0.66], [0.50, 0.10], [0.50, 0.72]]
)  # fmt: skip


def test_real_cr_displays_upright_and_its_inverse_does_not() -> None:
    from screener.pipeline.decode import decode_file

    pixels = decode_file(rg1_file()).pixels
    lm = _landmarks(RG1_LANDMARKS * [pixels.shape[1], pixels.shape[0]])
    assert check_landmarks(lm, pixels.shape).eligible
    assert check_image(pixels, lm).eligible
    _refused(check_image(1.0 - pixels, lm), "inverted")


# Hand-placed on the Rentgenprom film after np.flipud (the file is stored upside down too).
RENTGENPROM_LANDMARKS = np.array(
    [[0.42, 0.17], [0.30, 0.14], [0.16, 0.10], [0.58, 0.17], [0.70, 0.14], [0.84, 0.10],
     [0.12, 0.25], [0.08, 0.40], [0.07, 0.55], [0.07, 0.70], [0.88, 0.25], [0.92, 0.40],
     [0.94, 0.55], [0.95, 0.70], [0.53, 0.05], [0.55, 0.78]]
)  # fmt: skip


@pytest.mark.skipif(not (SHARED / "dicom").is_dir(), reason="extended check: ../shared/data/dicom not present")
def test_shared_monochrome2_film_that_displays_inverted() -> None:
    from screener.pipeline.decode import decode_file

    img = decode_file(SHARED / "dicom" / "rentgenprom_dx_chest_j2k_16bit.dcm")
    assert img.photometric == "MONOCHROME2"
    pixels = np.flipud(img.pixels)
    lm = _landmarks(RENTGENPROM_LANDMARKS * [pixels.shape[1], pixels.shape[0]])
    assert check_landmarks(lm, pixels.shape).eligible
    _refused(check_image(pixels, lm), "inverted", "brighter than the mediastinum")
    assert check_image(1.0 - pixels, lm).eligible


def _mirrored(pixels: np.ndarray, lm: Landmarks) -> tuple[np.ndarray, Landmarks]:
    """A film flipped left-right, with the landmarks a position-trained detector finds on it:
    each point mirrored and named by the side of the image it now lies on."""
    width = pixels.shape[1]
    points = lm.points.copy()
    points[:, 0] = width - 1 - points[:, 0]
    swapped = {n: n.replace("right", "@").replace("left", "right").replace("@", "left") for n in LANDMARK_NAMES}
    order = [LANDMARK_NAMES.index(swapped[n]) for n in LANDMARK_NAMES]
    return np.ascontiguousarray(pixels[:, ::-1]), Landmarks(points[order], lm.confidence[order])


def test_heart_shadow_on_the_image_left_is_a_mirrored_film() -> None:
    film, lm = synthetic_film(heart=True), _landmarks()  # the heart beside the spine
    assert film[:, : SHAPE[1] // 2].mean() < film[:, SHAPE[1] // 2 :].mean()  # on the image's right
    assert check_landmarks(lm, SHAPE).eligible and check_image(film, lm).eligible
    mirrored, found = _mirrored(film, lm)
    assert check_landmarks(found, SHAPE).eligible  # the geometry cannot tell
    _refused(check_image(mirrored, found), "heart-on-image-left", "mirrored", "dextrocardia")
    assert check_image(mirrored, found, EligibilityRules(min_heart_side_contrast=-1.0)).eligible  # the check off


def test_real_cr_mirrored_is_refused() -> None:
    from screener.pipeline.decode import decode_file
    from screener.pipeline.eligibility import heart_side_contrast

    pixels = decode_file(rg1_file()).pixels
    lm = _landmarks(RG1_LANDMARKS * [pixels.shape[1], pixels.shape[0]])
    assert heart_side_contrast(pixels, lm) > 0.02
    mirrored, found = _mirrored(pixels, lm)
    assert check_landmarks(found, pixels.shape).eligible
    _refused(check_image(mirrored, found), "heart-on-image-left")


def test_image_regions_outside_the_image() -> None:
    pts = _landmarks().points + [2000.0, 0.0]
    _refused(check_image(synthetic_film(), _landmarks(pts)), "lung-fields-outside-image")


def test_heart_side_needs_both_lower_zones_on_the_image() -> None:
    from screener.pipeline.eligibility import heart_side_contrast

    film, lm = synthetic_film(), _landmarks()
    assert heart_side_contrast(film, lm) is not None
    film[:, SHAPE[1] // 2 :] = np.nan  # the image's right half unreadable: no zone to compare
    assert heart_side_contrast(film, lm) is None
    _refused(check_image(film, lm), "lung-fields-outside-image", "which side the heart")
