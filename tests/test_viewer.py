"""What the radiologist sees: our results opened in the OHIF Viewer, in a real browser.

Real chest films are processed by the pipeline; the films and every result object (SR, GSPS,
result image, PDF) are stored in a real Orthanc with its DICOMweb plugin; the prebuilt OHIF
Viewer 3.13 (npm @ohif/app) is served in front of it; Debian's Chromium opens each study and
loads the SR, the result image and the PDF into the viewport, as a reader double-clicks them.
The assertions read the page: no error boundary or error toast, every BMD value, T-score,
the WHO category, the caveats and the ROI names drawn over the image, the landmarks drawn.
Screenshots land in out/viewer/<case>/ (SCREENER_UPDATE_SCREENSHOTS=1 also copies the main
case's into docs/screenshots/ for the README).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from screener.pipeline.bundle import ModelBundle
from screener.pipeline.eligibility import EligibilityRules
from screener.process import Outcome, Processor
from screener.report.text import ROI_LABELS
from tests.support.common import ROOT, SHARED, rg1_file
from tests.support.orthanc import Orthanc
from tests.support.viewer import OhifServer, open_study

pytestmark = [pytest.mark.browser, pytest.mark.orthanc]

ARTIFACTS = ROOT / "out" / "viewer"
SCREENSHOTS = ROOT / "docs" / "screenshots"
CANON = SHARED / "dicom" / "canon_dx_chest_j2k.dcm"


@dataclass(frozen=True)
class Case:
    name: str
    source: Path
    outcome: Outcome

    @property
    def study_uid(self) -> str:
        return str(pydicom.dcmread(self.source, stop_before_pixels=True).StudyInstanceUID)


def _with_pixel_spacing(tmp: Path) -> Path:
    """The Philips CR with a plausible Pixel Spacing instead of its 0\\0 (which OHIF cannot
    place on screen), in a study of its own: the case where every object can be drawn."""
    ds = pydicom.dcmread(rg1_file())
    ds.PixelSpacing = [0.175, 0.175]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, getattr(ds, keyword) + ".175")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp / "philips_cr_spacing.dcm"
    ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OhifServer, dict[str, Case]]]:
    tmp = tmp_path_factory.mktemp("viewer")
    sources = {"philips_cr": _with_pixel_spacing(tmp), "philips_cr_spacing_0": rg1_file()}
    bundle = ModelBundle.load()
    outcomes = list(Processor(bundle, tmp / "out", batch_size=4).run(list(sources.values())))
    if CANON.is_file():  # ../shared (CI has it); the other two cases need only pydicom-data
        # The shipped gate refuses this film (its left clavicle is not found beside the
        # herniation: roi-landmarks-unsure, tests/test_gate.py); let through here only to see
        # OHIF draw an SR on another vendor's JPEG 2000 DX without PatientSex.
        lenient = EligibilityRules(min_roi_landmark_confidence=0.0)
        sources["canon_dx_j2k"] = CANON
        outcomes += list(Processor(bundle, tmp / "out", batch_size=4, rules=lenient).run([CANON]))
    cases = {}
    for (name, source), outcome in zip(sources.items(), outcomes, strict=True):
        assert outcome.status == "reported", (name, outcome.code, outcome.reason)
        cases[name] = Case(name, source, outcome)
    orthanc = Orthanc(tmp, dicomweb=True)
    server = None
    try:
        for case in cases.values():
            orthanc.upload(case.source)
            for output in case.outcome.outputs.values():
                orthanc.upload(Path(output.path))
        server = OhifServer(orthanc.http)
        yield server, cases
    finally:
        if server is not None:
            server.stop()
        orthanc.stop()


def _steps(case: Case) -> list[dict[str, str]]:
    demo = " (DEMO)" if case.outcome.estimate and case.outcome.estimate.demo else ""
    return [{"name": "sr", "open": f"BMD estimate{demo}", "waitText": "Lumbar spine BMD: "},
            {"name": "result-image", "open": f"BMD result image{demo}"},
            {"name": "pdf", "open": f"BMD report PDF{demo}"}]


def _run(server: OhifServer, case: Case) -> dict[str, dict]:
    out = ARTIFACTS / case.name
    shutil.rmtree(out, ignore_errors=True)
    result = open_study(server.study_url(case.study_uid), _steps(case), out)
    steps = {step["name"]: step for step in result["steps"]}
    for step in steps.values():
        assert step["found"], f"{case.name}: no series '{step['open']}' in the study browser"
        assert not step["errorBoundary"], f"{case.name} {step['name']}: error boundary shown"
        errors = [t for t in step["toasts"] if t["type"] == "error"]
        assert errors == [], f"{case.name} {step['name']}: error toast {errors}"
        assert Path(step["screenshot"]).is_file()
    return steps


def _red_pixels(png: str) -> int:
    """Pixels of the demo banner's red (200, 0, 0) in a screenshot: the result image and the PDF
    both open with it, so it is seen only when the object is actually drawn."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int(((rgb[..., 0] > 170) & (rgb[..., 1] < 40) & (rgb[..., 2] < 40)).sum())


def _check_pictures(steps: dict[str, dict]) -> None:
    image, pdf = steps["result-image"], steps["pdf"]
    assert "BMD result image" in image["viewportText"]  # the viewer's overlay names the series
    assert _red_pixels(image["screenshot"]) > 2000, "the result image (and its demo banner) is not on screen"
    assert pdf["pdfObjects"] and pdf["pdfObjects"][0]["data"].startswith("blob:"), pdf["pdfObjects"]
    assert "No online PDF viewer" not in pdf["pageText"]
    assert _red_pixels(pdf["screenshot"]) > 2000, "the PDF page (and its demo banner) is not on screen"


def _as_ohif(value: float, stored: int) -> str:
    """What OHIF prints for a value the SR stores with ``stored`` decimals: JavaScript's
    toFixed(2) of it, which rounds a tie away from zero (Python's format rounds it to even:
    1.125 is "1.13" in the viewer and "1.12" in Python)."""
    from decimal import ROUND_HALF_UP, Decimal

    return str(Decimal(round(value, stored)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def test_ohif_shows_every_number_label_and_caveat_of_the_sr(site: tuple[OhifServer, dict[str, Case]]) -> None:
    server, cases = site
    case = cases["philips_cr"]
    steps = _run(server, case)
    sr = steps["sr"]
    texts = set(sr["svgTexts"])
    estimate = case.outcome.estimate
    assert estimate is not None and estimate.tscores.tscore is not None and estimate.tscores.category is not None
    for site_name in ("L1", "L2", "L3", "L4", "L1-L4"):
        # OHIF prints two decimals; the SR holds three (BMD) and two (T-score)
        assert f"Lumbar spine BMD: {_as_ohif(estimate.tscores.bmd[site_name], 3)} g/cm2" in texts, (site_name, texts)
        assert f"T-score: {_as_ohif(estimate.tscores.tscore[site_name], 2)} {{T-score}}" in texts, (site_name, texts)
    for vertebra in ("L1", "L2", "L3", "L4"):
        assert f"{vertebra} vertebra:" in texts
    assert f"L1-L4 (WHO: {estimate.tscores.category.value}):" in texts
    assert "Estimated from CXR, not DXA:" in texts
    assert "DEMO - NOT FOR CLINICAL USE:" in texts
    for label in ROI_LABELS.values():
        assert f"{label}:" in texts, (label, texts)
    assert sr["shapes"]["ellipse"] >= 16, sr["shapes"]  # the landmarks, one circle each
    assert sr["shapes"]["polyline"] >= 6 + 5, sr["shapes"]  # six ROI outlines, five BMD markers
    assert not [e for e in sr["consoleErrors"] if "TypeError" in e], sr["consoleErrors"]
    _check_pictures(steps)
    if os.environ.get("SCREENER_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for name in ("sr", "result-image", "pdf"):
            shutil.copyfile(steps[name]["screenshot"], SCREENSHOTS / f"ohif-{name}.png")


def test_ohif_opens_our_objects_on_a_film_with_pixel_spacing_0(site: tuple[OhifServer, dict[str, Case]]) -> None:
    """The real Philips CR says Pixel Spacing 0\\0: OHIF cannot draw the film itself, but the SR
    must load without an error and the result image and PDF must show."""
    server, cases = site
    steps = _run(server, cases["philips_cr_spacing_0"])
    assert "L1-L4 (WHO: " in " ".join(steps["sr"]["svgTexts"])
    _check_pictures(steps)


def test_ohif_shows_a_jpeg2000_dx_from_another_vendor(site: tuple[OhifServer, dict[str, Case]]) -> None:
    server, cases = site
    if "canon_dx_j2k" not in cases:
        pytest.skip(f"{CANON} not present (../shared is not beside this checkout)")
    case = cases["canon_dx_j2k"]
    steps = _run(server, case)
    texts = set(steps["sr"]["svgTexts"])
    estimate = case.outcome.estimate
    assert estimate is not None and estimate.tscores.tscore is None  # the film has no PatientSex
    assert "L1-L4 (no T-score: sex unknown):" in texts
    for site_name in ("L1", "L2", "L3", "L4", "L1-L4"):
        assert f"Lumbar spine BMD: {_as_ohif(estimate.tscores.bmd[site_name], 3)} g/cm2" in texts
    assert not any(t.startswith("T-score:") for t in texts)
    _check_pictures(steps)
