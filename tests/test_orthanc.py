"""Orthanc as the PACS: it auto-routes a chest radiograph to `screener serve` with the shipped
Lua script (deploy/orthanc/), and gets the SR and GSPS back. Real Orthanc, real node."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.support import validators
from tests.support.common import free_port, rg1_file, wait_for
from tests.support.orthanc import Orthanc
from tests.support.serve import Node

# the node answers and sends with DCMTK's tools (tests/support/serve.py); dciodvfy checks the results
pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk, pytest.mark.dicom3tools]

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Orthanc, Node]]:
    node_port = free_port()
    orthanc = Orthanc(tmp_path, node_port)
    node = Node(tmp_path, orthanc.dicom, calling="ORTHANC", pacs_ae="ORTHANC")
    node.config.write_text(node.config.read_text().replace(f"port = {node.port}\n", f"port = {node_port}\n", 1))
    node.port = node_port
    try:
        yield orthanc, node
    finally:
        node.stop()
        orthanc.stop()


def test_orthanc_routes_a_chest_radiograph_and_stores_the_results(site: tuple[Orthanc, Node], tmp_path: Path) -> None:
    orthanc, node = site
    node.start()
    source = pydicom.dcmread(rg1_file())
    # Not for the node: a CT slice, and a radiograph of a hand. The script keeps them here.
    hand = tmp_path / "hand.dcm"
    edited = pydicom.dcmread(rg1_file())
    edited.BodyPartExamined, edited.SOPInstanceUID = "HAND", edited.SOPInstanceUID + ".7"
    edited.file_meta.MediaStorageSOPInstanceUID = edited.SOPInstanceUID
    edited.save_as(hand)
    orthanc.upload(Path(get_testdata_file("CT_small.dcm")))
    orthanc.upload(hand)
    orthanc.upload(rg1_file())  # as a modality would store it; the Lua script routes it on

    def results() -> dict[str, str] | None:
        found = {}
        for instance_id in orthanc.get(f"/studies/{study}/instances"):  # type: ignore[union-attr]
            tags = orthanc.get(f"/instances/{instance_id['ID']}/simplified-tags")  # type: ignore[index]
            if tags.get("BodyPartExamined") != "HAND":  # type: ignore[union-attr]
                found[tags["SOPClassUID"]] = instance_id["ID"]  # type: ignore[index]
        return found if len(found) == 5 else None

    [study] = [s for s in orthanc.get("/studies")  # type: ignore[union-attr]
               if orthanc.get(f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"] == source.StudyInstanceUID]  # type: ignore[index]
    found = wait_for("the SR, GSPS, result image and PDF stored back in Orthanc", results, 120, 1.0)
    assert set(found) == {str(source.SOPClassUID), COMPREHENSIVE_3D_SR, GSPS, SECONDARY_CAPTURE, ENCAPSULATED_PDF}
    for sop_class in (COMPREHENSIVE_3D_SR, GSPS, SECONDARY_CAPTURE, ENCAPSULATED_PDF):
        path = tmp_path / f"{sop_class}.dcm"
        path.write_bytes(orthanc.raw(f"/instances/{found[sop_class]}/file"))
        stored = pydicom.dcmread(path, stop_before_pixels=True)
        assert stored.StudyInstanceUID == source.StudyInstanceUID  # filed in the radiograph's study
        assert validators.dciodvfy(path)[0] == [], sop_class
    # The node received the chest radiograph from Orthanc once, nothing else, and nothing of its
    # own came back.
    assert node.query("select calling_ae, count(*) from instances group by calling_ae") == [("ORTHANC", 1)]
    assert node.query("select count(*) from events where kind = 'dropped_own_output'") == [(0,)]
    assert node.query("select kind, state from deliveries order by kind") == [
        ("gsps", "sent"), ("image", "sent"), ("pdf", "sent"), ("sr", "sent")]
