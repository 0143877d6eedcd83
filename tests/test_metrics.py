"""Metrics (Pearson, AUC, BMD agreement/screening), the papers' table and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from screener.pipeline.tscore import SITES, ReferenceTable
from training.metrics import (
    bmd_metrics,
    papers_table,
    pearson_r,
    roc_auc,
    roc_curve,
    save_plots,
    to_json,
)


@pytest.fixture(scope="module")
def table() -> ReferenceTable:
    return ReferenceTable.default()


@pytest.fixture(scope="module")
def cohort() -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """40 cases spanning normal to osteoporotic BMD, with a few of unknown sex."""
    rng = np.random.default_rng(0)
    level = rng.uniform(0.55, 1.25, size=40)
    true = level[:, None] + rng.normal(0.0, 0.03, size=(40, 4))
    pred = true + rng.normal(0.0, 0.05, size=(40, 4))
    sex: list[str | None] = ["M" if i % 2 else "F" for i in range(40)]
    sex[3] = None
    sex[7] = "O"
    return pred, true, sex


def test_pearson_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=50)
    b = 0.5 * a + rng.normal(size=50)
    assert pearson_r(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    assert math.isnan(pearson_r([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_auc_hand_example() -> None:
    labels = np.array([False, False, True, True])
    assert roc_auc(labels, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)


def test_auc_ties_count_half() -> None:
    # Pairs (pos, neg): (0.5, 0.5) tie -> 0.5, (0.5, 0.2) -> 1, (0.9, 0.5) -> 1, (0.9, 0.2) -> 1
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.5, 0.2, 0.5, 0.9])
    assert roc_auc(labels, scores) == pytest.approx(3.5 / 4)
    assert roc_auc(labels, np.zeros(4)) == pytest.approx(0.5)


def test_auc_single_class_is_nan() -> None:
    assert math.isnan(roc_auc(np.array([True, True]), np.array([0.1, 0.2])))
    assert math.isnan(roc_auc(np.array([False, False]), np.array([0.1, 0.2])))


def test_roc_curve_area_equals_auc() -> None:
    rng = np.random.default_rng(2)
    labels = rng.random(60) < 0.4
    scores = np.round(rng.normal(size=60) + labels, 1)  # rounding makes ties
    fpr, tpr = roc_curve(labels, scores)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    assert area == pytest.approx(roc_auc(labels, scores))


def test_bmd_metrics_perfect(table: ReferenceTable, cohort: tuple) -> None:
    _, true, sex = cohort
    m = bmd_metrics(true, true, sex, table)
    assert m["n"] == 40
    for site in SITES:
        s = m[site]
        assert s["pearson_r"] == pytest.approx(1.0)
        assert s["mae"] == pytest.approx(0.0)
        assert s["bias"] == pytest.approx(0.0)
        assert s["n_with_sex"] == 38
        assert 0 < s["n_positive"] < 38, "cohort should have both classes at every site"
        assert s["auc"] == pytest.approx(1.0)
        assert s["sensitivity"] == pytest.approx(1.0)
        assert s["specificity"] == pytest.approx(1.0)
    assert m["average"]["pearson_r"] == pytest.approx(1.0)
    assert m["average"]["auc"] == pytest.approx(1.0)


def test_bmd_metrics_known_shift(table: ReferenceTable, cohort: tuple) -> None:
    _, true, sex = cohort
    m = bmd_metrics(true + 0.05, true, sex, table)
    for site in SITES:
        assert m[site]["bias"] == pytest.approx(0.05)
        assert m[site]["mae"] == pytest.approx(0.05)
        assert m[site]["rmse"] == pytest.approx(0.05)
        assert m[site]["loa_low"] == pytest.approx(0.05)
        assert m[site]["loa_high"] == pytest.approx(0.05)
        assert m[site]["pearson_r"] == pytest.approx(1.0)
    assert m["average"]["mae"] == pytest.approx(0.05)


def test_bmd_metrics_single_class_and_json(table: ReferenceTable) -> None:
    true = np.full((3, 4), 1.1)  # everyone normal: AUC and sensitivity undefined
    m = bmd_metrics(true, true, ["M", "F", "M"], table)
    assert math.isnan(m["L1-L4"]["auc"])
    assert math.isnan(m["L1-L4"]["sensitivity"])
    back = json.loads(to_json(m))
    assert back["L1-L4"]["auc"] is None
    assert back["average"]["auc"] is None
    assert back["n"] == 3


def test_bmd_metrics_validates_shapes(table: ReferenceTable) -> None:
    with pytest.raises(ValueError, match="pred"):
        bmd_metrics(np.ones((2, 3)), np.ones((2, 4)), ["M", "F"], table)
    with pytest.raises(ValueError, match="sex"):
        bmd_metrics(np.ones((2, 4)), np.ones((2, 4)), ["M"], table)


def test_papers_table_rows(table: ReferenceTable, cohort: tuple) -> None:
    pred, true, sex = cohort
    m = bmd_metrics(pred, true, sex, table)
    text = papers_table(m)
    lines = text.splitlines()
    for label in ("L1", "L2", "L3", "L4", "L1-L4", "Avg"):
        assert any(line.startswith(label + " ") for line in lines), label
    for col in ("Pearson r", "MAE (g/cm2)", "AUC", "Sens", "Spec", "Bias", "LoA"):
        assert col in lines[0]
    # Works on the JSON round trip too (nan -> None).
    assert papers_table(json.loads(to_json(m))) == text


def test_save_plots_writes_pngs(table: ReferenceTable, cohort: tuple, tmp_path: Path) -> None:
    pred, true, sex = cohort
    paths = save_plots(pred, true, sex, table, tmp_path / "plots", title="test")
    names = [p.name for p in paths]
    assert names == ["scatter.png", "roc.png", "bland_altman.png", "calibration.png"]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
