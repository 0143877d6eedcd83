"""The demo site of deploy/compose/, its processes started directly (compose itself cannot run
here): a modality stores a chest film in Orthanc (DICOMweb plugin on), Orthanc's shipped Lua
script routes it to `screener serve`, the node screens it and stores its results back in
Orthanc, and the OHIF viewer reading Orthanc's DICOMweb shows the SR's numbers in Chromium.
Nothing is uploaded to Orthanc but the film: what the viewer shows came through the node.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from screener.result import JobResult
from tests.support.common import ROOT, free_port, rg1_file, wait_for
from tests.support.orthanc import Orthanc
from tests.support.serve import Node
from tests.support.viewer import OhifServer, open_study

pytestmark = [pytest.mark.browser, pytest.mark.orthanc, pytest.mark.dcmtk]

ARTIFACTS = ROOT / "out" / "site"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Orthanc, Node, OhifServer]]:
    node_port = free_port()
    orthanc = Orthanc(tmp_path, node_port, dicomweb=True)
    node = Node(tmp_path, orthanc.dicom, calling="ORTHANC", pacs_ae="ORTHANC")
    node.config.write_text(node.config.read_text().replace(f"port = {node.port}\n", f"port = {node_port}\n", 1))
    node.port = node_port
    viewer = None
    try:
        node.start()
        viewer = OhifServer(orthanc.http)
        yield orthanc, node, viewer
    finally:
        if viewer is not None:
            viewer.stop()
        node.stop()
        orthanc.stop()


def _film(tmp_path: Path) -> Path:
    """The pydicom-data Philips CR with a plausible Pixel Spacing (its own 0\\0 cannot be placed
    on screen by OHIF: tests/test_viewer.py covers that case)."""
    ds = pydicom.dcmread(rg1_file())
    ds.PixelSpacing = [0.175, 0.175]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, getattr(ds, keyword) + ".9")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "film.dcm"
    ds.save_as(path)
    return path


def test_a_film_stored_in_orthanc_is_screened_and_its_sr_shows_in_ohif(
        stack: tuple[Orthanc, Node, OhifServer], tmp_path: Path) -> None:
    orthanc, node, viewer = stack
    film = _film(tmp_path)
    study_uid = str(pydicom.dcmread(film, stop_before_pixels=True).StudyInstanceUID)
    orthanc.upload(film)  # as the modality stores it; the rest is the site's own wiring

    def delivered() -> bool:
        return node.query("select count(*) from deliveries where state = 'sent'") == [(4,)]

    wait_for("the node to screen the film and store its four results in Orthanc", delivered, 180, 1.0)
    assert node.query("select calling_ae from instances") == [("ORTHANC",)]
    out = ARTIFACTS / "philips_cr"
    shutil.rmtree(out, ignore_errors=True)
    result = open_study(viewer.study_url(study_uid), [{"name": "sr", "open": "BMD estimate (DEMO)", "waitText": "L1-L4 (WHO: "}], out)
    [sr] = result["steps"]
    assert sr["found"], "no 'BMD estimate (DEMO)' series in OHIF's study browser"
    assert not sr["errorBoundary"] and [t for t in sr["toasts"] if t["type"] == "error"] == [], sr["toasts"]
    texts = " ".join(sr["svgTexts"])
    [(document,)] = node.query("select result_json from jobs")
    measurement = JobResult.from_json(json.loads(document)).measurement
    assert measurement is not None and measurement.who_category is not None
    # the node's own numbers, as OHIF prints them (two decimals)
    assert f"L1-L4 (WHO: {measurement.who_category}):" in texts, texts
    assert f"Lumbar spine BMD: {measurement.bmd_g_cm2['L1-L4']:.2f} g/cm2" in texts, texts
    assert "DEMO - NOT FOR CLINICAL USE:" in texts
    assert sr["shapes"]["ellipse"] >= 16, sr["shapes"]  # the 16 landmarks
