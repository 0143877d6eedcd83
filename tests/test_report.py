"""SR and GSPS built from a real CR chest image: content, determinism, headers, validators.

The estimate is made without a trained model: hand-placed landmarks (the synthetic JSRT-like
contours scaled to the image), real ROI extraction and real T-scores. Nothing here needs
../shared; the validators (dciodvfy, dsrdump, PixelMed) must be installed, and a missing one
fails the test with an install hint instead of skipping it.
"""

from __future__ import annotations

import copy
import dataclasses
import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID

import screener
from screener.pipeline.decode import decode_file
from screener.pipeline.landmarks import LANDMARK_NAMES, Landmarks
from screener.pipeline.rois import LOCAL_ROI_NAMES, extract_rois
from screener.pipeline.tscore import SITES, ReferenceTable, WhoCategory, compute_tscores
from screener.report import sr as srmod
from screener.report.overlay import PR_SERIES_NUMBER, build_gsps
from screener.report.text import ROI_LABELS
from screener.report.sr import (
    BMD_CONCEPT,
    ROI_FINDING_SITES,
    SITE_CODES,
    TSCORE_CONCEPT,
    WHO_CODES,
    build_sr,
    clip_polygon,
    report_uids,
    tracking_uid,
)
from tests.support import validators
from tests.support.common import rg1_file
from tests.support.report import (
    BMD,
    DEMO_STATEMENT,
    MODEL_ID,
    NOW,
    children,
    code_of,
    encode,
    geometry,
    groups,
    make_estimate,
    source,
    walk,
)

__all__ = ["geometry", "source"]  # fixtures from tests/support/report.py

# --------------------------------------------------------------------------- content-tree helpers


def key(code) -> tuple[str, str]:
    return code.value, code.scheme_designator


def texts(report: Dataset) -> list[str]:
    return [item.TextValue for item in walk(report) if item.ValueType == "TEXT"]


def num(group: Dataset, concept) -> Dataset:
    (item,) = children(group, key(concept), "NUM")
    return item


def value_of(item: Dataset) -> float:
    return float(item.MeasuredValueSequence[0].NumericValue)


def unit_of(item: Dataset) -> tuple[str, str]:
    return code_of(item.MeasuredValueSequence[0], "MeasurementUnitsCodeSequence")


def finding_sites(item: Dataset) -> list[tuple[str, str]]:
    return [code_of(c, "ConceptCodeSequence") for c in children(item, ("363698007", "SCT"), "CODE")]


def closed_outline(corners: np.ndarray) -> np.ndarray:
    pts = np.asarray(corners, float) + 0.5
    return np.vstack([pts, pts[:1]])


# --------------------------------------------------------------------------- UIDs


def test_report_uids_are_deterministic_distinct_and_model_specific() -> None:
    a = report_uids("1.2.3.4", "model@1+aaa")
    assert a == report_uids("1.2.3.4", "model@1+aaa")
    values = [a.sr_series_uid, a.sr_instance_uid, a.pr_series_uid, a.pr_instance_uid]
    assert len(set(values)) == 4
    for uid in values:
        assert uid.startswith("2.25.") and len(uid) <= 64 and UID(uid).is_valid
    b = report_uids("1.2.3.4", "model@1+bbb")
    c = report_uids("1.2.3.5", "model@1+aaa")
    assert not set(values) & {b.sr_series_uid, b.sr_instance_uid, b.pr_series_uid, b.pr_instance_uid}
    assert not set(values) & {c.sr_series_uid, c.sr_instance_uid, c.pr_series_uid, c.pr_instance_uid}
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        report_uids("", "model")


def test_sr_is_reproducible_and_uids_follow_the_model(source, geometry) -> None:
    estimate = make_estimate(geometry, demo=True)
    first, second = build_sr(source, estimate, now=NOW), build_sr(source, estimate, now=NOW)
    assert encode(first) == encode(second)
    uids = report_uids(source.SOPInstanceUID, MODEL_ID)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (uids.sr_instance_uid, uids.sr_series_uid)
    other = build_sr(source, make_estimate(geometry, demo=True, model_id="cxr-bmd-test@1.0.1+ffff"), now=NOW)
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert other.SeriesInstanceUID != first.SeriesInstanceUID


# --------------------------------------------------------------------------- header


def _variant(source: Dataset, geometry, kind: str):
    """A source and estimate that take another branch of the SR and GSPS writers."""
    landmarks, rois = geometry
    if kind == "clipped":  # landmarks pushed left: ROIs reach past column 0 and are clipped
        landmarks = Landmarks(points=landmarks.points - [380.0, 0.0], confidence=landmarks.confidence)
        rois = extract_rois(decode_file(rg1_file()).pixels, landmarks, 32)
        assert (rois.corners[:, :, 0] < -0.5).any()
    if kind == "spacing":  # Image Library descriptors, areas in mm2
        source = copy.deepcopy(source)  # Dataset.copy() shares the elements
        source.PixelSpacing = [0.143, 0.143]
        source.ImagerPixelSpacing = [0.15, 0.15]
        source.PatientOrientation = ["L", "F"]
        source.Modality = "DX"
    estimate = make_estimate((landmarks, rois), demo=kind != "real", sex=None if kind == "unknown-sex" else "F")
    if kind == "osteoporosis":
        low = (0.55, 0.56, 0.57, 0.58)
        estimate = dataclasses.replace(estimate, bmd=low, tscores=compute_tscores(low, "F", ReferenceTable.default()))
    if kind == "unicode":  # a site's own model name in UTF-8
        estimate = dataclasses.replace(estimate, algorithm=dataclasses.replace(estimate.algorithm, name="modèle-øst"))
    return source, estimate


VARIANTS = ["demo", "real", "unknown-sex", "osteoporosis", "clipped", "spacing", "unicode"]


@pytest.mark.parametrize("kind", VARIANTS)
def test_direct_sr_and_gsps_writers_match_highdicom_byte_for_byte(source, geometry, kind) -> None:
    """The SR's tree and the GSPS's annotations are written directly; highdicom's checked
    classes (full_check=True) must give the very same bytes, in every branch of the writers."""
    source, estimate = _variant(source, geometry, kind)
    fast = build_sr(source, estimate, now=NOW, institution_name="Hôpital")
    assert encode(fast) == encode(build_sr(source, estimate, now=NOW, institution_name="Hôpital", full_check=True))
    assert groups(fast)  # and the raw tree reads back in memory
    gsps = build_gsps(source, estimate, now=NOW)
    assert encode(gsps) == encode(build_gsps(source, estimate, now=NOW, full_check=True))
    assert len(gsps.GraphicAnnotationSequence) == 3


def test_sr_header_copies_patient_and_study(source, geometry) -> None:
    estimate = make_estimate(geometry, demo=True)
    sr = build_sr(source, estimate, now=NOW, institution_name="Test Hospital")
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "AccessionNumber", "StudyID", "StudyDate", "StudyTime"):
        assert sr[keyword].value == source[keyword].value, keyword
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage  # IHE AIR's SR class
    assert (sr.Modality, int(sr.SeriesNumber), int(sr.InstanceNumber)) == ("SR", 9901, 1)
    assert sr.Manufacturer == "CXR-BMD Screener"
    assert sr.ManufacturerModelName
    assert list(sr.SoftwareVersions) == [screener.__version__, MODEL_ID]
    assert sr.InstitutionName == "Test Hospital"
    assert "BMD estimate (DEMO)" in sr.SeriesDescription
    assert (str(sr.ContentDate), str(sr.ContentTime)) == ("20240506", "070809")
    assert (str(sr.InstanceCreationDate), str(sr.InstanceCreationTime)) == ("20240506", "070809")
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (source.SOPClassUID, source.SOPInstanceUID)
    real = build_sr(source, make_estimate(geometry, demo=False), now=NOW)
    assert "DEMO" not in real.SeriesDescription


def _fresh_source(*keywords: str) -> Dataset:
    """A new copy of RG1 without ``keywords``."""
    ds = pydicom.dcmread(rg1_file())
    for keyword in keywords:
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def test_missing_type2_source_attributes_become_empty(geometry) -> None:
    missing = ("AccessionNumber", "PatientName", "StudyID", "PatientBirthDate", "PatientSex",
               "ReferringPhysicianName", "StudyDate", "StudyTime", "PatientID")
    source = _fresh_source(*missing)
    source.PatientSex = "U"  # not a DICOM value: must not crash highdicom
    estimate = make_estimate(geometry, demo=False, sex=None)
    for obj in (build_sr(source, estimate, now=NOW), build_gsps(source, estimate, now=NOW)):
        for keyword in missing:
            assert keyword in obj and not obj[keyword].value, keyword
        pydicom.dcmread(io.BytesIO(encode(obj)))  # writes and reads back


def test_missing_sop_instance_uid_is_named(geometry) -> None:
    source = _fresh_source("SOPInstanceUID")
    with pytest.raises(ValueError, match=r"SOPInstanceUID \(0008,0018\)"):
        build_sr(source, make_estimate(geometry, demo=False), now=NOW)


# --------------------------------------------------------------------------- SR content


def test_sr_root_and_site_measurements(source, geometry) -> None:
    estimate = make_estimate(geometry, demo=False, sex="F")
    sr = build_sr(source, estimate, now=NOW)
    assert code_of(sr) == ("126000", "DCM")
    (procedure,) = children(sr, ("121058", "DCM"), "CODE")
    assert code_of(procedure, "ConceptCodeSequence") == ("363679005", "SCT")
    by_id = groups(sr)
    t = estimate.tscores
    assert t.tscore is not None and t.category is not None
    for site in SITES:
        group = by_id[f"BMD {site}"]
        assert finding_sites(group) == [key(SITE_CODES[site])]
        (name,) = [c for c in walk(group) if c.ValueType == "TEXT" and code_of(c) == ("111001", "DCM")]
        assert name.TextValue == "cxr-bmd-test"
        bmd = num(group, BMD_CONCEPT)
        assert value_of(bmd) == pytest.approx(round(t.bmd[site], 3), abs=1e-9)
        assert unit_of(bmd) == ("g/cm2", "UCUM")
        assert finding_sites(bmd) == [key(SITE_CODES[site])]
        tscore = num(group, TSCORE_CONCEPT)
        assert value_of(tscore) == pytest.approx(t.tscore[site], abs=0.005 + 1e-9)
        assert unit_of(tscore) == ("{T-score}", "UCUM")
        category = [c for c in children(group, value_type="CODE")
                    if code_of(c, "ConceptCodeSequence") in {key(v) for v in WHO_CODES.values()}]
        if site == "L1-L4":
            assert [code_of(c, "ConceptCodeSequence") for c in category] == [key(WHO_CODES[t.category])]
        else:
            assert category == []
    assert value_of(num(by_id["BMD L1-L4"], BMD_CONCEPT)) == pytest.approx(round(float(np.mean(BMD)), 3))


def inferred_from(item: Dataset) -> list[Dataset]:
    """The SCOORDs a NUM is INFERRED FROM, each checked to reference the source image."""
    out = []
    for coord in children(item, value_type="SCOORD"):
        assert coord.RelationshipType == "INFERRED FROM"
        (image,) = children(coord, value_type="IMAGE")
        assert image.RelationshipType == "SELECTED FROM"
        out.append(coord)
    return out


def comments(group: Dataset) -> list[str]:
    return [c.TextValue for c in children(group, ("121106", "DCM"), "TEXT")]


def test_sr_site_values_are_inferred_from_stacked_markers_and_named_for_viewers(source, geometry) -> None:
    """OHIF draws a group only where it has a region and writes its values beside it: each
    site's NUMs are INFERRED FROM a short mark on the right image edge, one below the other,
    and the group's first TEXT names the site (what a viewer prints first)."""
    estimate = make_estimate(geometry, demo=True, sex="F")
    by_id = groups(build_sr(source, estimate, now=NOW))
    centres = []
    for site in SITES:
        group = by_id[f"BMD {site}"]
        assert group.ContentTemplateSequence[0].TemplateIdentifier == "1501"
        assert children(group, value_type="SCOORD") == []  # the values belong to the image, not a place
        marks = [inferred_from(num(group, concept)) for concept in (BMD_CONCEPT, TSCORE_CONCEPT)]
        for (mark,) in marks:
            assert mark.GraphicType == "POLYLINE"
            data = np.asarray(mark.GraphicData, float).reshape(-1, 2)
            assert len(data) == 3 and np.allclose(data[:, 0], source.Columns - 0.5)
            assert (data[:, 1] >= 0).all() and (data[:, 1] <= source.Rows).all()
        np.testing.assert_array_equal(marks[0][0].GraphicData, marks[1][0].GraphicData)
        centres.append(float(np.asarray(marks[0][0].GraphicData).reshape(-1, 2)[1, 1]))
        texts_here = comments(group)
        if site == "L1-L4":
            assert texts_here == [f"L1-L4 (WHO: {estimate.tscores.category.value})", "Estimated from CXR, not DXA",
                                  "DEMO - NOT FOR CLINICAL USE"]
        else:
            assert texts_here == [f"{site} vertebra"]
    # far enough apart for three-line text boxes at a typical zoom (about 0.07 of the height)
    gaps = np.diff(sorted(centres))
    assert gaps.min() >= 0.06 * source.Rows, centres


def test_sr_rois_are_named_areas_inferred_from_closed_outlines(source, geometry) -> None:
    estimate = make_estimate(geometry, demo=False)
    by_id = groups(build_sr(source, estimate, now=NOW))
    assert "ROI whole_image" not in by_id
    corners = dict(zip(estimate.rois.names, estimate.rois.corners))
    for name in LOCAL_ROI_NAMES:
        group = by_id[f"ROI {name}"]
        assert group.ContentTemplateSequence[0].TemplateIdentifier == "1501"
        assert comments(group) == [ROI_LABELS[name]]  # "Left clavicle ROI", not a code number
        area = num(group, srmod.AREA)
        (outline,) = inferred_from(area)
        assert outline.GraphicType == "POLYLINE"
        data = np.asarray(outline.GraphicData, float).reshape(-1, 2)
        np.testing.assert_array_equal(data[0], data[-1])
        # every corner is on the outline, and the edges carry midpoints: 9 points, not the 5 that
        # OHIF would take for its own rectangle tool
        assert len(data) == 9
        np.testing.assert_allclose(data[::2], closed_outline(corners[name]), rtol=1e-6, atol=1e-3)
        # RG1 says Pixel Spacing 0\0: the area is in pixels, never in made-up millimetres
        assert unit_of(area) == ("{pixels}", "UCUM")
        x, y = data[:, 0], data[:, 1]
        assert value_of(area) == pytest.approx(abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2, abs=0.1)
        (site,) = children(group, ("363698007", "SCT"), "CODE")
        anatomy, laterality = ROI_FINDING_SITES[name]
        assert code_of(site, "ConceptCodeSequence") == key(anatomy)
        lat = children(site, ("272741003", "SCT"), "CODE")
        assert [code_of(c, "ConceptCodeSequence") for c in lat] == ([key(laterality)] if laterality else [])


def test_roi_area_is_in_mm2_when_the_pixel_spacing_is_known(geometry) -> None:
    spaced = pydicom.dcmread(rg1_file())
    spaced.PixelSpacing = [0.2, 0.25]
    by_id = groups(build_sr(spaced, make_estimate(geometry, demo=False), now=NOW))
    in_pixels = groups(build_sr(pydicom.dcmread(rg1_file()), make_estimate(geometry, demo=False), now=NOW))
    for name in LOCAL_ROI_NAMES:
        area = num(by_id[f"ROI {name}"], srmod.AREA)
        assert unit_of(area) == ("mm2", "UCUM")
        pixels = value_of(num(in_pixels[f"ROI {name}"], srmod.AREA))
        assert value_of(area) == pytest.approx(pixels * 0.05, abs=0.1)


def test_sr_landmarks_are_sixteen_small_circles_named_by_their_finding(source, geometry) -> None:
    estimate = make_estimate(geometry, demo=False)
    by_id = groups(build_sr(source, estimate, now=NOW))
    for i, name in enumerate(LANDMARK_NAMES):
        group = by_id[f"Landmark {name}"]
        assert group.ContentTemplateSequence[0].TemplateIdentifier == "1410"
        (finding,) = children(group, ("121071", "DCM"), "CODE")
        assert code_of(finding, "ConceptCodeSequence") == (f"CXR16-{i + 1:02d}", "99CXRBMD")
        assert finding.ConceptCodeSequence[0].CodeMeaning == name
        (region,) = children(group, ("111030", "DCM"), "SCOORD")
        assert region.GraphicType == "CIRCLE"  # a POINT would be drawn as a labelled arrow
        centre, edge = np.asarray(region.GraphicData, float).reshape(2, 2)
        np.testing.assert_allclose(centre, estimate.landmarks.points[i] + 0.5, rtol=1e-6, atol=1e-3)
        radius = float(np.hypot(*(edge - centre)))
        assert 0 < radius <= 0.01 * max(source.Rows, source.Columns)
        (image,) = children(region, value_type="IMAGE")
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert [c for c in children(group) if c.ValueType == "NUM"] == []  # unlabelled on the image


def test_demo_statement_only_for_demo_models(source, geometry) -> None:
    demo = texts(build_sr(source, make_estimate(geometry, demo=True), now=NOW))
    real = texts(build_sr(source, make_estimate(geometry, demo=False), now=NOW))
    assert any("DEMO MODEL - NOT FOR CLINICAL USE" in t and DEMO_STATEMENT in t for t in demo)
    assert not any("DEMO" in t or DEMO_STATEMENT in t for t in real)
    for found in (demo, real):
        assert any("estimated by software" in t and "chest radiograph" in t for t in found)


def test_unknown_sex_reports_bmd_and_the_reason_only(source, geometry) -> None:
    estimate = make_estimate(geometry, demo=False, sex=None)
    sr = build_sr(source, estimate, now=NOW)
    by_id = groups(sr)
    for site in SITES:
        assert value_of(num(by_id[f"BMD {site}"], BMD_CONCEPT)) == pytest.approx(round(estimate.tscores.bmd[site], 3))
    items = list(walk(sr))
    assert not [i for i in items if "ConceptNameCodeSequence" in i and code_of(i) == key(TSCORE_CONCEPT)]
    who = {key(v) for v in WHO_CODES.values()}
    assert not [i for i in items if i.ValueType == "CODE" and code_of(i, "ConceptCodeSequence") in who]
    assert estimate.tscores.reason in texts(sr)


def test_highdicom_reads_the_sr_back(source, geometry) -> None:
    sr = build_sr(source, make_estimate(geometry, demo=True), now=NOW)
    parsed = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(encode(sr))))
    assert len(parsed.content.get_planar_roi_measurement_groups()) == len(LANDMARK_NAMES)
    assert len(parsed.content.get_image_measurement_groups()) == len(SITES) + len(LOCAL_ROI_NAMES)


def test_dicom_codes_match_part16() -> None:
    """Every code DICOM itself lists is spelled as in PS3.16 (pydicom's copy of it)."""
    from pydicom.sr.codedict import codes

    expected = {
        SITE_CODES["L1"]: codes.SCT.L1Vertebra, SITE_CODES["L2"]: codes.SCT.L2Vertebra,
        SITE_CODES["L3"]: codes.SCT.L3Vertebra, SITE_CODES["L4"]: codes.SCT.L4Vertebra,
        SITE_CODES["L1-L4"]: codes.SCT.LumbarSpine, srmod.IMAGING_PROCEDURE: codes.SCT.ImagingProcedure,
        ROI_FINDING_SITES["left_clavicle"][0]: codes.SCT.Clavicle,
        ROI_FINDING_SITES["cervical_spine"][0]: codes.SCT.CervicalSpine,
        ROI_FINDING_SITES["left_ribcage"][0]: codes.SCT.Rib, ROI_FINDING_SITES["t12"][0]: codes.SCT.T12Vertebra,
        srmod.LEFT: codes.SCT.Left, srmod.RIGHT: codes.SCT.Right, WHO_CODES[WhoCategory.NORMAL]: codes.SCT.Normal,
        srmod.COMMENT: codes.DCM.Comment, srmod.WHO_CATEGORY_CONCEPT: codes.DCM.ClinicalInterpretation,
        srmod.IMAGING_MEASUREMENT_REPORT: codes.DCM.ImagingMeasurementReport,
    }
    for ours, standard in expected.items():
        assert (ours.value, ours.scheme_designator, ours.meaning) == (
            standard.value, standard.scheme_designator, standard.meaning)


# --------------------------------------------------------------------------- geometry


def test_clip_polygon_keeps_inside_and_cuts_outside() -> None:
    square = np.array([[10.0, 10.0], [20.0, 10.0], [20.0, 20.0], [10.0, 20.0]])
    np.testing.assert_allclose(clip_polygon(square, 100, 100), square)
    half_out = square - [15.0, 0.0]  # x from -5 to 5
    clipped = clip_polygon(half_out, 100, 100)
    assert clipped[:, 0].min() == 0.0 and clipped[:, 0].max() == 5.0
    assert clipped[:, 1].min() == 10.0 and clipped[:, 1].max() == 20.0
    assert len(clip_polygon(square + 500.0, 100, 100)) == 0
    outline = srmod.closed_roi_outline(half_out - 0.5, 100, 100)
    assert outline is not None and (outline[0] == outline[-1]).all() and outline.min() >= 0.0


# --------------------------------------------------------------------------- GSPS


def _graphics(gsps: Dataset, layer: str) -> list[Dataset]:
    out = []
    for annotation in gsps.GraphicAnnotationSequence:
        if annotation.GraphicLayer == layer:
            out += list(annotation.get("GraphicObjectSequence", [])) + list(annotation.get("TextObjectSequence", []))
    return out


def test_gsps_draws_rois_landmarks_and_summary(source, geometry) -> None:
    estimate = make_estimate(geometry, demo=True)
    gsps = build_gsps(source, estimate, now=NOW)
    uids = report_uids(source.SOPInstanceUID, MODEL_ID)
    assert (gsps.SOPInstanceUID, gsps.SeriesInstanceUID) == (uids.pr_instance_uid, uids.pr_series_uid)
    assert int(gsps.SeriesNumber) == PR_SERIES_NUMBER and gsps.Modality == "PR"
    assert gsps.StudyInstanceUID == source.StudyInstanceUID and gsps.PatientID == source.PatientID
    assert encode(gsps) == encode(build_gsps(source, estimate, now=NOW))
    ref = gsps.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == source.SeriesInstanceUID
    assert ref.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    rois = _graphics(gsps, "BMD_ROIS")
    corners = dict(zip(estimate.rois.names, estimate.rois.corners))
    assert [g.TrackingID for g in rois] == [f"ROI {n}" for n in LOCAL_ROI_NAMES]
    for graphic in rois:
        name = graphic.TrackingID.removeprefix("ROI ")
        assert graphic.GraphicType == "POLYLINE" and graphic.GraphicAnnotationUnits == "PIXEL"
        np.testing.assert_allclose(np.reshape(graphic.GraphicData, (-1, 2)), closed_outline(corners[name]),
                                   rtol=1e-6, atol=1e-3)
        assert graphic.TrackingUID == tracking_uid(source.SOPInstanceUID, MODEL_ID, graphic.TrackingID)
    landmarks = _graphics(gsps, "BMD_LANDMARKS")
    assert len(landmarks) == len(LANDMARK_NAMES)
    centres = np.array([np.reshape(g.GraphicData, (-1, 2))[0] for g in landmarks])
    np.testing.assert_allclose(centres, estimate.landmarks.points + 0.5, rtol=1e-6, atol=1e-3)
    (text,) = _graphics(gsps, "BMD_SUMMARY")
    t = estimate.tscores
    assert text.UnformattedTextValue.startswith(
        f"L1-L4 BMD {t.bmd['L1-L4']:.3f} g/cm2, T {t.tscore['L1-L4']:.2f} {t.category.value}"
    )
    assert "DEMO" in text.UnformattedTextValue and "by software" in text.UnformattedTextValue

    voi = gsps.SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (float(source.WindowCenter), float(source.WindowWidth))
    assert gsps.PresentationLUTShape == "INVERSE"  # the source is MONOCHROME1


def test_gsps_window_from_pixels_when_the_source_has_none(geometry) -> None:
    source = _fresh_source("WindowCenter", "WindowWidth")
    gsps = build_gsps(source, make_estimate(geometry, demo=False), now=NOW)
    voi = gsps.SoftcopyVOILUTSequence[0]
    stored = source.pixel_array
    assert stored.min() < float(voi.WindowCenter) < stored.max()
    assert 0 < float(voi.WindowWidth) <= float(stored.max()) - float(stored.min())


def test_rois_off_the_image_edge_are_clipped(source, geometry) -> None:
    """Landmarks pushed left: the right clavicle and rib-cage ROIs reach past column 0."""
    landmarks, _ = geometry
    shifted = Landmarks(points=landmarks.points - [380.0, 0.0], confidence=landmarks.confidence)
    rois = extract_rois(decode_file(rg1_file()).pixels, shifted, 32)
    assert (rois.corners[:, :, 0] < -0.5).any()
    estimate = make_estimate((shifted, rois), demo=False)
    gsps = build_gsps(source, estimate, now=NOW)
    for graphic in _graphics(gsps, "BMD_ROIS"):
        data = np.reshape(graphic.GraphicData, (-1, 2))
        assert data.min() >= 0.0 and data[:, 0].max() <= source.Columns and data[:, 1].max() <= source.Rows
        np.testing.assert_array_equal(data[0], data[-1])
    sr_groups = groups(build_sr(source, estimate, now=NOW))
    assert {f"ROI {n}" for n in LOCAL_ROI_NAMES} <= set(sr_groups)


def test_gsps_summary_without_sex_or_demo(source, geometry) -> None:
    gsps = build_gsps(source, make_estimate(geometry, demo=False, sex=None), now=NOW)
    (text,) = _graphics(gsps, "BMD_SUMMARY")
    assert "no T-score" in text.UnformattedTextValue and "DEMO" not in text.UnformattedTextValue


# --------------------------------------------------------------------------- validators


def _report(tool: str, errors: list[str], warnings: list[str]) -> None:
    for line in warnings:
        print(f"{tool} warning: {line}")
    assert errors == [], f"{tool} errors:\n" + "\n".join(errors)


@pytest.mark.parametrize("demo, sex", [(True, "F"), (False, None)], ids=["demo-female", "real-unknown-sex"])
@pytest.mark.dicom3tools
@pytest.mark.dcmtk
@pytest.mark.java
def test_sr_passes_dciodvfy_dsrdump_and_pixelmed(source, geometry, tmp_path, demo, sex) -> None:
    path = tmp_path / "sr.dcm"
    build_sr(source, make_estimate(geometry, demo=demo, sex=sex), now=NOW).save_as(path, enforce_file_format=True)
    _report("dciodvfy", *validators.dciodvfy(path))
    _report("dsrdump", *validators.dsrdump(path))
    _report("pixelmed", *validators.pixelmed_sr(path))


@pytest.mark.parametrize("demo", [True, False], ids=["demo", "real"])
@pytest.mark.dicom3tools
def test_gsps_passes_dciodvfy(source, geometry, tmp_path, demo) -> None:
    path = tmp_path / "pr.dcm"
    build_gsps(source, make_estimate(geometry, demo=demo), now=NOW).save_as(path, enforce_file_format=True)
    _report("dciodvfy", *validators.dciodvfy(path))


def test_missing_validator_fails_with_install_hint(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(validators.shutil, "which", lambda name: None)
    with pytest.raises(AssertionError, match=r"\.ci/run.*apt-get install dicom3tools"):
        validators.dciodvfy(tmp_path / "x.dcm")


def test_values_breaking_their_vr_are_blanked_not_fatal(tmp_path) -> None:
    """Anonymisers write hashes into dates and short strings (seen in a real Canon DX file)."""
    import pydicom

    from screener.report.sr import source_header

    ds = pydicom.dcmread(rg1_file(), stop_before_pixels=True)
    ds.PatientBirthDate = "d14a028c2a3a2bc9476102bb288234c4"
    ds.StudyTime = "not-a-time"
    ds.AccessionNumber = "d14a028c2a3a2bc9476102bb288234c415a2b01f828ea62ac5b3e42f"  # SH: max 16
    header = source_header(ds)
    assert header.PatientBirthDate == "" and header.StudyTime == "" and header.AccessionNumber == ""
    assert header.StudyDate == ds.StudyDate  # valid values are kept


def test_direct_writer_codes_keep_their_meaning_and_utf8_is_required() -> None:
    """pydicom's Code compares without its meaning: the writer's cache must not."""
    from pydicom.sr.coding import Code

    from screener.report import encoding

    assert encoding.code_item(Code("123", "99X", "Alpha")) != encoding.code_item(Code("123", "99X", "Beta"))
    assert b"Beta" in encoding.content_item("CONTAINS", "TEXT", Code("123", "99X", "Beta"))
    latin = Dataset()
    latin.SpecificCharacterSet = "ISO_IR 100"
    with pytest.raises(ValueError, match="ISO_IR 192"):
        encoding.set_raw_sequence(latin, "ContentSequence", b"")
