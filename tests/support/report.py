"""The SR/GSPS test estimate on the real Philips CR (hand-placed landmarks, real ROIs and
T-scores, no trained model) and content-tree helpers, shared by tests/test_report.py and
tests/test_result_objects.py. ``source`` and ``geometry`` are module-scoped fixtures: a test
module imports them to use them."""

from __future__ import annotations

import datetime
import io
from collections.abc import Iterator

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from screener.pipeline.decode import decode_file
from screener.pipeline.estimate import AlgorithmInfo, BmdEstimate
from screener.pipeline.landmarks import LANDMARK_NAMES, Landmarks
from screener.pipeline.rois import RoiSet, extract_rois
from screener.pipeline.tscore import ReferenceTable, compute_tscores
from tests.support.common import rg1_file, synthetic_contours
from training.jsrt import landmarks_from_contours

NOW = datetime.datetime(2024, 5, 6, 7, 8, 9)
BMD = (0.781, 0.802, 0.829, 0.851)
DEMO_STATEMENT = "Trained on synthetic labels only; its numbers mean nothing."
MODEL_ID = "cxr-bmd-test@1.0.0+0123456789ab"

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def source() -> Dataset:
    return pydicom.dcmread(rg1_file())


@pytest.fixture(scope="module")
def geometry(source: Dataset) -> tuple[Landmarks, RoiSet]:
    """Plausible landmarks on RG1 (1955 x 1841) and the ROIs cut from them."""
    decoded = decode_file(rg1_file())
    rows, columns = decoded.shape
    points = landmarks_from_contours(synthetic_contours()) * [columns / 512.0, rows / 512.0]
    landmarks = Landmarks(points=points, confidence=np.linspace(0.6, 1.0, len(LANDMARK_NAMES)))
    return landmarks, extract_rois(decoded.pixels, landmarks, 32)


def make_estimate(geometry, *, demo: bool, sex: str | None = "F", model_id: str = MODEL_ID) -> BmdEstimate:
    landmarks, rois = geometry
    algorithm = AlgorithmInfo(
        name="cxr-bmd-test", version="1.0.0", model_id=model_id, demo=demo,
        demo_statement=DEMO_STATEMENT if demo else "",
    )
    return BmdEstimate(landmarks, rois, BMD, compute_tscores(BMD, sex, ReferenceTable.default()), algorithm)


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --------------------------------------------------------------------------- content-tree helpers


def walk(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from walk(item)


def code_of(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    code = item[keyword][0]
    return code.CodeValue, code.CodingSchemeDesignator


def children(item: Dataset, name: tuple[str, str] | None = None, value_type: str | None = None) -> list[Dataset]:
    out = []
    for child in item.get("ContentSequence", []):
        if name is not None and ("ConceptNameCodeSequence" not in child or code_of(child) != name):
            continue
        if value_type is not None and child.ValueType != value_type:
            continue
        out.append(child)
    return out


def groups(report: Dataset) -> dict[str, Dataset]:
    """Measurement groups by Tracking Identifier."""
    out = {}
    for item in walk(report):
        if item.ValueType == "CONTAINER" and code_of(item) == ("125007", "DCM"):
            (tid,) = children(item, ("112039", "DCM"), "TEXT")
            assert children(item, ("112040", "DCM"), "UIDREF"), "group without Tracking Unique Identifier"
            out[tid.TextValue] = item
    return out
