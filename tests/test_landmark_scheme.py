"""The rule that turns JSRT contours into the 16-landmark scheme (METHOD.md section 1)."""

from __future__ import annotations

import numpy as np
import pytest

from screener.pipeline.landmarks import LANDMARK_NAMES, NUM_LANDMARKS
from tests.support.common import SHARED, synthetic_contours
from training.jsrt import landmarks_from_contours, split_ids


def named(points: np.ndarray) -> dict[str, np.ndarray]:
    return dict(zip(LANDMARK_NAMES, points))


def test_scheme_has_sixteen_uniquely_named_points() -> None:
    assert NUM_LANDMARKS == 16 == len(set(LANDMARK_NAMES))


def test_rib_cage_points_on_lateral_border_at_fixed_fractions(contours) -> None:
    p = named(landmarks_from_contours(contours))
    # Right lung x 100..220, y 60..420: lateral (image-left) border x = 100.
    for frac in (20, 40, 60, 80):
        np.testing.assert_allclose(p[f"ribcage_right_{frac}"], [100, 60 + frac / 100 * 360], atol=1e-9)
        np.testing.assert_allclose(p[f"ribcage_left_{frac}"], [412, 50 + frac / 100 * 390], atol=1e-9)


def test_clavicle_ends_medial_mid_lateral(contours) -> None:
    p = named(landmarks_from_contours(contours))
    # Right clavicle runs from x=120 (lateral) to x=236 (medial), centred in the bar's width.
    assert p["clavicle_right_medial"][0] == pytest.approx(236, abs=1.0)
    assert p["clavicle_right_lateral"][0] == pytest.approx(120, abs=1.0)
    assert p["clavicle_left_medial"][0] == pytest.approx(276, abs=1.0)
    assert p["clavicle_left_lateral"][0] == pytest.approx(392, abs=1.0)
    for side in ("right", "left"):
        mid = (p[f"clavicle_{side}_medial"] + p[f"clavicle_{side}_lateral"]) / 2
        np.testing.assert_allclose(p[f"clavicle_{side}_mid"], mid)
    # Medial end lies lower than lateral (the bars slope up laterally): y between the bar edges.
    assert 100 <= p["clavicle_right_medial"][1] <= 108


def test_derived_spine_points_on_midline(contours) -> None:
    p = named(landmarks_from_contours(contours))
    midline = (p["clavicle_right_medial"][0] + p["clavicle_left_medial"][0]) / 2
    assert p["cervical_spine"][0] == pytest.approx(midline)
    assert p["t12"][0] == pytest.approx(midline)
    assert p["cervical_spine"][1] == pytest.approx(50)  # level of the higher apex
    assert p["t12"][1] == pytest.approx((420 + 440) / 2)  # mean level of the bases


def test_rule_is_translation_equivariant() -> None:
    a = landmarks_from_contours(synthetic_contours())
    b = landmarks_from_contours(synthetic_contours(shift=(13.0, -7.0)))
    np.testing.assert_allclose(b - a, np.tile([13.0, -7.0], (16, 1)), atol=1e-9)


def test_contour_order_does_not_matter(contours) -> None:
    reversed_contours = {k: v[::-1].copy() for k, v in contours.items()}
    np.testing.assert_allclose(landmarks_from_contours(reversed_contours), landmarks_from_contours(contours), atol=1e-9)


def test_split_is_fixed_and_disjoint() -> None:
    ids = [f"JPC{i:03d}" for i in range(50)]
    train, val = split_ids(ids)
    assert split_ids(list(reversed(ids))) == (train, val)
    assert not set(train) & set(val) and len(train) + len(val) == 50 and len(val) == 10


@pytest.mark.skipif(not (SHARED / "jsrt").is_dir(), reason="extended check: ../shared/data/jsrt not present")
def test_rule_on_real_jsrt_gives_anatomical_order() -> None:
    from training.jsrt import load_jsrt

    for case in load_jsrt(SHARED / "jsrt"):
        p = named(case.landmarks)
        assert p["ribcage_right_40"][0] < p["cervical_spine"][0] < p["ribcage_left_40"][0], case.case_id
        assert p["cervical_spine"][1] < p["t12"][1], case.case_id
        for side in ("right", "left"):
            ys = [p[f"ribcage_{side}_{f}"][1] for f in (20, 40, 60, 80)]
            assert ys == sorted(ys), case.case_id
