"""The result image (Secondary Capture), the PDF report (Encapsulated PDF) and the IHE AIR
requirements on the SR, built from the real Philips CR with the estimate of test_report
(tests/support/report.py).

Each AIR line of docs/viewers.md has a test here named after it. The validators (dciodvfy)
and poppler's pdftotext are CI dependencies: missing, the test fails with an install hint.
"""

from __future__ import annotations

import datetime
import io
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, EncapsulatedPDFStorage, SecondaryCaptureImageStorage

from screener.pipeline.decode import decode_file
from screener.pipeline.landmarks import LANDMARK_NAMES
from screener.pipeline.rois import LOCAL_ROI_NAMES
from screener.pipeline.tscore import SITES
from screener.report.overlay import build_gsps
from screener.report.pdf import PDF_SERIES_NUMBER, build_pdf
from screener.report.result_image import MAX_SIDE, RESULT_IMAGE_SERIES_NUMBER, build_result_image
from screener.report.sr import build_sr, device_uid, report_uids
from tests.support import validators
from tests.support.common import rg1_file
from tests.support.report import MODEL_ID, NOW, code_of, encode, geometry, groups, make_estimate, source, walk

__all__ = ["geometry", "source"]  # fixtures from tests/support/report.py, as in test_report

OTHER_MODEL = "cxr-bmd-test@1.0.1+fedcba987654"


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return decode_file(rg1_file()).pixels


def pdftotext(document: bytes) -> str:
    exe = shutil.which("pdftotext")
    if exe is None:
        raise validators.ValidatorNotInstalled("pdftotext not found: run .ci/run or `apt-get install poppler-utils`")
    proc = subprocess.run([exe, "-layout", "-", "-"], input=document, capture_output=True, timeout=60, check=True)
    return proc.stdout.decode()


def read_back(ds: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(encode(ds)))


# --------------------------------------------------------------------------- result image


def test_result_image_is_a_derived_secondary_capture_in_the_source_study(source, geometry, pixels) -> None:
    estimate = make_estimate(geometry, demo=True)
    sc = read_back(build_result_image(source, estimate, pixels, now=NOW))
    uids = report_uids(source.SOPInstanceUID, MODEL_ID)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert (sc.StudyInstanceUID, sc.SeriesInstanceUID, sc.SOPInstanceUID) == (
        source.StudyInstanceUID, uids.image_series_uid, uids.image_instance_uid)
    assert int(sc.SeriesNumber) == RESULT_IMAGE_SERIES_NUMBER and sc.SeriesDescription == "BMD result image (DEMO)"
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"] and sc.BurnedInAnnotation == "YES"
    assert "not for primary diagnosis" in sc.DerivationDescription and "DEMO" in sc.DerivationDescription
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.LossyImageCompression == "01"
    for keyword in ("PatientID", "PatientName", "PatientSex", "AccessionNumber"):
        assert sc[keyword].value == source[keyword].value
    rgb = sc.pixel_array
    # the film, reduced to MAX_SIDE, with the results panel beside it
    scale = min(1.0, MAX_SIDE / max(source.Rows, source.Columns))
    assert rgb.shape[0] == round(source.Rows * scale) and rgb.shape[1] > round(source.Columns * scale) * 1.3
    film_w = round(source.Columns * scale)
    panel = rgb[:, film_w:]
    red = (panel[..., 0] > 170) & (panel[..., 1] < 40) & (panel[..., 2] < 40)
    assert red[: rgb.shape[0] // 8].mean() > 0.1  # the demo banner heads the panel
    assert (panel.max(axis=2) > 200).mean() > 0.005  # and text follows


def test_result_image_without_demo_has_no_banner_and_is_reproducible(source, geometry, pixels) -> None:
    estimate = make_estimate(geometry, demo=False)
    first, second = (encode(build_result_image(source, estimate, pixels, now=NOW)) for _ in range(2))
    assert first == second
    rgb = read_back(build_result_image(source, estimate, pixels, now=NOW)).pixel_array
    panel = rgb[:, round(source.Columns * min(1.0, MAX_SIDE / max(source.Rows, source.Columns))):]
    assert ((panel[..., 0] > 170) & (panel[..., 1] < 40) & (panel[..., 2] < 40)).mean() < 0.001


@pytest.mark.parametrize("demo, sex", [(True, "F"), (False, None)], ids=["demo-female", "real-unknown-sex"])
@pytest.mark.dicom3tools
def test_result_image_and_pdf_pass_dciodvfy(source, geometry, pixels, tmp_path, demo, sex) -> None:
    estimate = make_estimate(geometry, demo=demo, sex=sex)
    for name, ds in (("sc", build_result_image(source, estimate, pixels, now=NOW)),
                     ("pdf", build_pdf(source, estimate, pixels, now=NOW))):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        errors, warnings = validators.dciodvfy(path)
        assert errors == [], (name, errors)


# --------------------------------------------------------------------------- PDF


def test_pdf_report_carries_identifiers_results_method_and_demo_banner(source, geometry, pixels) -> None:
    estimate = make_estimate(geometry, demo=True, sex="F")
    doc = read_back(build_pdf(source, estimate, pixels, now=NOW))
    uids = report_uids(source.SOPInstanceUID, MODEL_ID)
    assert doc.SOPClassUID == EncapsulatedPDFStorage and doc.Modality == "DOC"
    assert (doc.StudyInstanceUID, doc.SeriesInstanceUID, doc.SOPInstanceUID) == (
        source.StudyInstanceUID, uids.pdf_series_uid, uids.pdf_instance_uid)
    assert int(doc.SeriesNumber) == PDF_SERIES_NUMBER and doc.MIMETypeOfEncapsulatedDocument == "application/pdf"
    document = bytes(doc.EncapsulatedDocument)[: int(doc.EncapsulatedDocumentLength)]
    assert document.startswith(b"%PDF-") and document.rstrip().endswith(b"%%EOF")
    assert doc.SourceInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    text = pdftotext(document)
    assert "DEMO MODEL - NOT FOR CLINICAL USE" in text
    assert str(source.PatientID) in text and str(source.AccessionNumber) in text
    t = estimate.tscores
    assert t.tscore is not None and t.category is not None
    for site in SITES:
        row = [line for line in text.splitlines() if line.strip().startswith(site + " ") or line.strip() == site]
        assert any(f"{t.bmd[site]:.3f}" in line and f"{t.tscore[site]:.2f}" in line for line in row), (site, row)
    assert t.category.value.capitalize() in text
    assert "not a DXA measurement" in text and "Method:" in text and "Limits:" in text
    assert estimate.algorithm.model_id in text.replace("\n", " ")


def test_pdf_report_is_reproducible_and_says_no_demo_for_a_real_model(source, geometry, pixels) -> None:
    estimate = make_estimate(geometry, demo=False, sex=None)
    first, second = (encode(build_pdf(source, estimate, pixels, now=NOW)) for _ in range(2))
    assert first == second
    doc = read_back(build_pdf(source, estimate, pixels, now=NOW))
    text = pdftotext(bytes(doc.EncapsulatedDocument)[: int(doc.EncapsulatedDocumentLength)])
    assert "DEMO" not in text
    assert "patient sex unknown" in text.lower()


# --------------------------------------------------------------------------- IHE AIR checklist
# One test per line of the checklist in docs/viewers.md ("IHE AI Results").


def _sr(source, geometry, model_id: str = MODEL_ID) -> Dataset:
    return read_back(build_sr(source, make_estimate(geometry, demo=True, model_id=model_id), now=NOW))


def test_air_sop_class_is_comprehensive_3d_sr_with_tid_1500(source, geometry) -> None:
    sr = _sr(source, geometry)
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert code_of(sr) == ("126000", "DCM")


def test_air_device_observer_context(source, geometry) -> None:
    sr = _sr(source, geometry)
    items = {code_of(i): i for i in sr.ContentSequence if i.RelationshipType == "HAS OBS CONTEXT"}
    assert code_of(items[("121005", "DCM")], "ConceptCodeSequence") == ("121007", "DCM")  # observer type: device
    algo = make_estimate(geometry, demo=True).algorithm
    assert items[("121012", "DCM")].UID == device_uid(algo)  # Device Observer UID
    assert items[("121013", "DCM")].TextValue == "cxr-bmd-test 1.0.0"  # Device Observer Name
    assert items[("121014", "DCM")].TextValue == "CXR-BMD Screener"  # Manufacturer
    assert items[("121015", "DCM")].TextValue  # Model Name


def test_air_every_group_identifies_the_algorithm_and_has_its_own_tracking_uid(source, geometry) -> None:
    sr = _sr(source, geometry)
    by_id = groups(sr)
    assert len(by_id) == len(SITES) + len(LOCAL_ROI_NAMES) + len(LANDMARK_NAMES)
    tracking_uids = []
    for identifier, group in by_id.items():
        found = {code_of(i): i for i in walk(group) if "ConceptNameCodeSequence" in i}
        assert found[("111001", "DCM")].TextValue == "cxr-bmd-test", identifier  # Algorithm Name
        assert found[("111003", "DCM")].TextValue == "1.0.0", identifier  # Algorithm Version
        tracking_uids.append(found[("112040", "DCM")].UID)
    assert len(set(tracking_uids)) == len(tracking_uids)


def test_air_contributing_equipment_names_the_algorithm_with_a_model_specific_device_uid(source, geometry) -> None:
    items = {}
    for model in (MODEL_ID, OTHER_MODEL):
        (item,) = [e for e in _sr(source, geometry, model).ContributingEquipmentSequence
                   if e.get("DeviceUID")]
        items[model] = item
    item = items[MODEL_ID]
    assert code_of(item, "PurposeOfReferenceCodeSequence") == ("109102", "DCM")  # Processing Equipment
    assert item.Manufacturer == "CXR-BMD Screener" and item.ManufacturerModelName == "cxr-bmd-test"
    assert "1.0.0" in list(item.SoftwareVersions)
    assert item.DeviceUID == device_uid(make_estimate(geometry, demo=True).algorithm)
    assert items[OTHER_MODEL].DeviceUID != item.DeviceUID  # new weights, new device


def test_air_image_library_and_evidence_list_the_source_image(source, geometry) -> None:
    sr = _sr(source, geometry)
    (library,) = [i for i in sr.ContentSequence if code_of(i) == ("111028", "DCM")]
    images = [i for i in walk(library) if i.ValueType == "IMAGE"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == [source.SOPInstanceUID]
    names = [code_of(c) for c in images[0].ContentSequence]
    assert ("121139", "DCM") in names  # Modality
    assert ("110910", "DCM") in names and ("110911", "DCM") in names  # Pixel Data Rows / Columns
    assert ("111026", "DCM") not in names  # no Horizontal Pixel Spacing from a 0\0 film
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    refs = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [r.ReferencedSOPInstanceUID for r in refs] == [source.SOPInstanceUID]


def test_air_result_is_a_new_series_in_the_source_study(source, geometry) -> None:
    sr = _sr(source, geometry)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID not in (source.SeriesInstanceUID,) and sr.Modality == "SR"
    assert sr.SeriesInstanceUID == report_uids(source.SOPInstanceUID, MODEL_ID).sr_series_uid


def test_air_content_date_time_is_when_the_analysis_ran(source, geometry) -> None:
    now = datetime.datetime(2026, 12, 1, 10, 11, 12)
    sr = read_back(build_sr(source, make_estimate(geometry, demo=True), now=now))
    assert (sr.ContentDate, sr.ContentTime) == ("20261201", "101112")


def test_pdf_and_result_image_carry_header_text_as_it_is(geometry, pixels) -> None:
    """A "$" in a study description is text, not TeX; a Latin-1 name is re-encoded as UTF-8 in
    every object the node writes."""
    source = pydicom.dcmread(rg1_file())
    source.SpecificCharacterSet = "ISO_IR 100"
    source.StudyDescription = "CHEST $$ SELF-PAY $$"
    source.PatientName = "Müller^Jürgen^Q^Dr"
    estimate = make_estimate(geometry, demo=False)
    doc = read_back(build_pdf(source, estimate, pixels, now=NOW))
    text = pdftotext(bytes(doc.EncapsulatedDocument)[: int(doc.EncapsulatedDocumentLength)])
    assert "CHEST $$ SELF-PAY $$" in text
    assert "Müller, Jürgen Q (Dr)" in text
    for ds in (doc, read_back(build_result_image(source, estimate, pixels, now=NOW)),
               read_back(build_sr(source, estimate, now=NOW)), read_back(build_gsps(source, estimate, now=NOW))):
        assert ds.SpecificCharacterSet == "ISO_IR 192" and str(ds.PatientName) == "Müller^Jürgen^Q^Dr"
