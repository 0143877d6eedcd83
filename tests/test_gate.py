"""The landmark gate against films that are not a frontal chest: each check on its own, then
the shipped detector and gate on negatives generated from a real CR and on a real non-chest
radiograph (pydicom-data's lower-leg CR)."""

from __future__ import annotations

import numpy as np
import pytest

from screener.pipeline.eligibility import EligibilityRules, check_film, check_image, check_landmarks
from screener.pipeline.landmarks import (
    EXTENT_POINTS,
    LANDMARK_NAMES,
    VIEWS,
    LandmarkDetector,
    LandmarkNet,
    Landmarks,
    apply_spine_rule,
    check_extent_rule,
    lung_rows,
    spine_points_by_rule,
)
from tests.support.common import SHARED, rg1_file, synthetic_contours, synthetic_film
from training.jsrt import extent_points_from_contours, landmarks_from_contours

SHAPE = (512, 512)


def _landmarks(confidence: float = 0.6, turned: float = float("nan")) -> Landmarks:
    pts = landmarks_from_contours(synthetic_contours())
    return Landmarks(points=pts, confidence=np.full(16, confidence), turned_confidence=turned)


def _refused(decision, code: str, *words: str) -> None:
    assert not decision.eligible and decision.code == code, decision
    for w in words:
        assert w in decision.reason, (w, decision.reason)


def test_the_spine_rule_reproduces_the_label_rule_exactly() -> None:
    labels = landmarks_from_contours(synthetic_contours((12.0, -7.0)))
    np.testing.assert_allclose(spine_points_by_rule(labels), labels[14:], atol=1e-9)
    moved = labels.copy()
    moved[LANDMARK_NAMES.index("t12")] += [30.0, 40.0]
    moved[LANDMARK_NAMES.index("cervical_spine")] += [-20.0, 10.0]
    ruled = apply_spine_rule(moved, {"cervical_spine": 0.5, "t12": 1.0})
    np.testing.assert_allclose(ruled[15], labels[15], atol=1e-9)  # T12 all from the rule
    np.testing.assert_allclose(ruled[14], labels[14] + [-10.0, 5.0], atol=1e-9)  # half way
    np.testing.assert_allclose(apply_spine_rule(moved, {}), moved)  # weights 0: the network's


def test_the_extent_rule_places_rib_rows_and_spine_points_from_the_lungs_apex_and_base() -> None:
    contours = synthetic_contours((5.0, 9.0))
    labels, extent = landmarks_from_contours(contours), extent_points_from_contours(contours)
    # right lung 69..429, left 59..449 (the rectangles' rows), each at its mean column
    np.testing.assert_allclose(extent[:, 1], [69.0, 429.0, 59.0, 449.0])
    np.testing.assert_allclose(extent[:, 0], [165.0, 165.0, 357.0, 357.0])
    apex, base = lung_rows(labels)  # the rib-row fit alone recovers them from exact labels
    np.testing.assert_allclose(apex, [69.0, 59.0], atol=1e-9)
    np.testing.assert_allclose(base, [429.0, 449.0], atol=1e-9)
    rows = [LANDMARK_NAMES.index(f"ribcage_{s}_{p}") for s in ("right", "left") for p in (20, 40, 60, 80)]
    moved = labels.copy()
    moved[rows, 1] += np.array([8.0, -6.0, 5.0, 9.0, -7.0, 4.0, 6.0, -3.0])  # rib rows off by a few px
    moved[14:] += [[-20.0, 10.0], [30.0, 40.0]]
    full = apply_spine_rule(moved, {"cervical_spine": 1.0, "t12": 1.0}, extent, {"lung_extent": 1.0, "ribcage_rows": 1.0})
    np.testing.assert_allclose(full[rows], labels[rows], atol=1e-9)  # rows back where the rule puts them
    np.testing.assert_allclose(full[14:], labels[14:], atol=1e-9)  # and the spine points by the true apex/base
    half = apply_spine_rule(moved, {}, extent, {"lung_extent": 1.0, "ribcage_rows": 0.5})
    np.testing.assert_allclose(half[rows, 1], (moved[rows, 1] + labels[rows, 1]) / 2, atol=1e-9)
    np.testing.assert_allclose(apply_spine_rule(moved, {}, None, {"lung_extent": 1.0, "ribcage_rows": 1.0}), moved)
    fit_only = apply_spine_rule(moved, {}, extent, {"lung_extent": 0.0, "ribcage_rows": 1.0})  # rows by their own fit
    assert np.abs(fit_only[rows, 1] - labels[rows, 1]).mean() < np.abs(moved[rows, 1] - labels[rows, 1]).mean()
    for bad, word in (({"lung_extent": 1.5}, "within 0..1"), ({"ribs": 0.5}, "only"), ({"lung_extent": True}, "number"),
                      ([0.5], "must map")):
        with pytest.raises(ValueError, match=word):
            check_extent_rule(bad)


def test_a_detector_with_extent_points_still_returns_the_16() -> None:
    net = LandmarkNet(width=8, extent_points=True).eval()
    assert net.head.out_channels == 16 + len(EXTENT_POINTS)
    detector = LandmarkDetector(net, 64)
    pts, conf, turned = detector.detect_views([synthetic_film()])
    assert pts.shape == (1, 1, 20, 2) and conf.shape == (1, 16) and np.isfinite(turned).all()
    found = detector.detect([synthetic_film()])[0]
    assert found.points.shape == (16, 2) and found.confidence.shape == (16,)
    assert detector.detect_views([])[0].shape == (0, 1, 20, 2)
    assert LandmarkDetector(LandmarkNet(width=8), 64).extent_rule == {}  # nothing to apply it to


def test_upside_down_when_the_turned_image_fits_better() -> None:
    assert check_landmarks(_landmarks(0.3, turned=0.05), SHAPE).eligible
    assert check_landmarks(_landmarks(0.3), SHAPE).eligible  # not measured: no opinion
    _refused(check_landmarks(_landmarks(0.2, turned=0.3), SHAPE), "upside-down", "180 degrees", "0.300", "0.200")
    _refused(check_landmarks(_landmarks(0.3, turned=0.25), SHAPE), "upside-down")  # 0.83 >= 0.8
    assert check_landmarks(_landmarks(0.3, turned=0.25), SHAPE, EligibilityRules(max_turned_confidence_ratio=1.0)).eligible
    with pytest.raises(ValueError, match="max_turned_confidence_ratio"):
        EligibilityRules(max_turned_confidence_ratio=0.0)


@pytest.mark.parametrize("roi", ["left_clavicle", "right_clavicle", "left_ribcage", "right_ribcage"])
def test_a_structure_the_detector_did_not_find_refuses_the_film(roi: str) -> None:
    side, part = roi.split("_")
    lm = _landmarks(0.4)
    conf = lm.confidence.copy()
    conf[[i for i, n in enumerate(LANDMARK_NAMES) if n.startswith(f"{part}_{side}_")]] = 0.005
    unsure = Landmarks(lm.points, conf)
    assert np.median(conf) >= EligibilityRules().min_landmark_confidence  # the film as a whole looks fine
    _refused(check_landmarks(unsure, SHAPE), "roi-landmarks-unsure", f"{side} {part}", "misplaced")
    assert check_landmarks(unsure, SHAPE, EligibilityRules(min_roi_landmark_confidence=0.0)).eligible


def test_no_mediastinum_between_the_lungs_is_a_lateral_likesynthetic_film(heart=True) -> None:
    film, lm = synthetic_film(heart=True), _landmarks()
    assert check_image(film, lm).eligible
    lateral = film.copy()
    lateral[60:460, 60:452] = 0.25  # lung from one side to the other: no bright midline band
    _refused(check_image(lateral, lm), "no-mediastinum", "lateral")
    assert check_image(lateral, lm, EligibilityRules(min_mediastinum_contrast=-1.0)).code != "no-mediastinum"


@pytest.fixture(scope="module")
def detector():
    from screener.pipeline.bundle import ModelBundle

    return ModelBundle.load().detector()


@pytest.fixture(scope="module")
def rg1() -> np.ndarray:
    from screener.pipeline.decode import decode_file

    return decode_file(rg1_file()).pixels


def _gate(detector, pixels: np.ndarray):
    return check_film(pixels, detector.detect([pixels])[0])


def test_the_shipped_gate_accepts_the_real_cr_and_measures_its_turned_score(detector, rg1) -> None:
    found = detector.detect([rg1])[0]
    assert np.isfinite(found.turned_confidence) and found.turned_confidence < 0.5 * np.median(found.confidence)
    assert _gate(detector, rg1).eligible


@pytest.mark.parametrize(
    "kind, codes",
    [
        ("rotated_180", {"upside-down", "low-landmark-confidence"}),
        ("upside_down", {"upside-down", "low-landmark-confidence"}),
        ("rotated_90", {"low-landmark-confidence", "spine-tilted", "upside-down", "roi-landmarks-unsure"}),
        ("mirrored", {"heart-on-image-left"}),
        ("lateral_like", {"no-mediastinum", "low-landmark-confidence", "inverted", "roi-landmarks-unsure"}),
        ("lower_half", {"low-landmark-confidence", "thorax-aspect", "roi-landmarks-unsure", "upside-down"}),
        ("upper_half", {"thorax-aspect", "not-frontal-chest", "roi-landmarks-unsure", "low-landmark-confidence"}),
    ],
)
def test_the_shipped_gate_refuses_negatives_made_from_the_real_cr(detector, rg1, kind: str, codes: set[str]) -> None:
    from training.landmarks import make_negative

    probe = make_negative(rg1, kind, np.random.default_rng(0))
    decision = _gate(detector, probe)
    assert not decision.eligible and decision.code in codes, decision


@pytest.mark.parametrize(
    "kind, rules, code",
    [
        ("rotated_180", EligibilityRules(min_landmark_confidence=0.0), "upside-down"),
        ("upside_down", EligibilityRules(min_landmark_confidence=0.0), "upside-down"),
        ("lateral_like", EligibilityRules(min_landmark_confidence=0.0, min_roi_landmark_confidence=0.0, inverted_margin=1.0),
         "no-mediastinum"),
    ],
)
def test_each_new_check_catches_its_negative_on_its_own(detector, rg1, kind: str, rules: EligibilityRules, code: str) -> None:
    """With the checks before it switched off, the real network's evidence alone refuses it."""
    from training.landmarks import make_negative

    for seed in range(2):
        probe = make_negative(rg1, kind, np.random.default_rng(seed))
        decision = check_film(probe, detector.detect([probe])[0], rules)
        assert decision.code == code, (seed, decision)


@pytest.mark.skipif(not (SHARED / "dicom").is_dir(), reason="extended check: ../shared/data/dicom not present")
def test_the_canon_film_with_a_herniation_is_refused_not_given_crossed_boxes(detector) -> None:
    from screener.pipeline.decode import decode_file

    pixels = decode_file(SHARED / "dicom" / "canon_dx_chest_j2k.dcm").pixels
    _refused(_gate(detector, pixels), "roi-landmarks-unsure", "left clavicle")


def test_the_shipped_gate_refuses_a_real_lower_leg_radiograph(detector) -> None:
    from screener.pipeline.decode import decode_file

    leg = decode_file(rg1_file("RG3_UNCI.dcm")).pixels
    for k in range(4):  # however it is turned
        assert not _gate(detector, np.ascontiguousarray(np.rot90(leg, k))).eligible


def test_views_and_turned_check_are_options_of_the_detector(detector, rg1) -> None:
    from screener.pipeline.landmarks import LandmarkDetector

    three = LandmarkDetector(detector.net, detector.input_size, views=3)
    other = np.ascontiguousarray(rg1[200:, ::-1])  # another image in the same batch
    points, conf, turned = three.detect_views([rg1, other])
    n_points = 16 + (len(EXTENT_POINTS) if detector.extent_points else 0)  # the shipped one has extent points
    assert points.shape == (2, 3, n_points, 2) and conf.shape == (2, 16) and np.all(np.isfinite(turned))
    for i, im in enumerate((rg1, other)):  # batched or alone: each image gets its own views and turned score
        p1, c1, t1 = three.detect_views([im])
        np.testing.assert_allclose(points[i], p1[0], atol=0.05)
        np.testing.assert_allclose(conf[i], c1[0], atol=1e-4)
        assert turned[i] == pytest.approx(t1[0], abs=1e-4)
    assert not np.allclose(points[0], points[1], atol=5.0)
    plain = LandmarkDetector(detector.net, detector.input_size, views=1).detect_views([rg1])[0]
    np.testing.assert_allclose(points[0, 0], plain[0, 0], atol=0.05)  # view 0 is the plain letterbox
    assert three.detect([]) == [] and three.detect_views([])[0].shape == (0, 3, n_points, 2)
    _, _, off = LandmarkDetector(detector.net, detector.input_size, check_turned=False).detect_views([rg1])
    assert np.isnan(off).all()
    with pytest.raises(ValueError, match="views"):
        LandmarkDetector(detector.net, detector.input_size, views=len(VIEWS) + 1)
    with pytest.raises(ValueError, match="spine rule weight of t12"):
        LandmarkDetector(detector.net, detector.input_size, spine_rule={"t12": 1.5})
    with pytest.raises(ValueError, match="only"):
        LandmarkDetector(detector.net, detector.input_size, spine_rule={"clavicle_left_mid": 1.0})
    with pytest.raises(ValueError, match="extent rule weight"):
        LandmarkDetector(detector.net, detector.input_size, extent_rule={"ribcage_rows": -1})


def test_the_mirrored_view_maps_back_to_the_plain_one_with_each_point_its_twin(detector, rg1) -> None:
    from screener.pipeline.landmarks import mirror_order

    # Square, and a whole number of the pyramid's 7-pixel blocks wide (1792 / 256 = 7): the
    # detector's input from its mirror image is then exactly the mirror of its own input.
    side = 7 * detector.input_size
    film = np.ascontiguousarray(rg1[:side, :side])
    flip = LandmarkDetector(detector.net, detector.input_size, views=2, flip=True)
    points, conf, turned = flip.detect_views([film])
    n_points = points.shape[2]
    assert points.shape == (1, 4, n_points, 2)  # 2 plain views, then the same 2 mirrored
    plain = LandmarkDetector(detector.net, detector.input_size, views=2).detect_views([film])
    np.testing.assert_allclose(points[:, :2], plain[0], atol=0.05)  # the plain views are untouched
    np.testing.assert_allclose(conf, plain[1], atol=1e-4)  # and the confidence is theirs
    assert turned.shape == (1,) and turned[0] == pytest.approx(plain[2][0], abs=1e-4)  # the turned score too
    # The mirrored view of the film is the plain view of its mirror image, mapped back: each
    # point mirrored in x (column w - 1 - x) and taken as its left/right twin.
    mirror = np.ascontiguousarray(film[:, ::-1])
    of_mirror = LandmarkDetector(detector.net, detector.input_size, views=1).detect_views([mirror])[0][0, 0]
    back = of_mirror[mirror_order(n_points)].copy()
    back[:, 0] = (film.shape[1] - 1) - back[:, 0]
    np.testing.assert_allclose(points[0, 2], back, atol=0.05)
    assert not np.allclose(points[0, 0], points[0, 2], atol=0.5)  # a real second opinion, not a copy
    # detect() applies the rules to the median over all four views
    median = np.median(points[0], axis=0)
    expected = apply_spine_rule(median[:16], flip.spine_rule, median[16:], flip.extent_rule)
    np.testing.assert_allclose(flip.detect([film])[0].points, expected, atol=0.05)
    # batched with another film, each keeps its own views, mirrored ones included
    other = np.ascontiguousarray(rg1[200:, ::-1])
    both, both_conf, both_turned = flip.detect_views([film, other])
    for i, im in enumerate((film, other)):
        alone = flip.detect_views([im])
        np.testing.assert_allclose(both[i], alone[0][0], atol=0.05)
        np.testing.assert_allclose(both_conf[i], alone[1][0], atol=1e-4)
        assert both_turned[i] == pytest.approx(alone[2][0], abs=1e-4)
    with pytest.raises(ValueError, match="flip"):
        LandmarkDetector(detector.net, detector.input_size, flip="yes")  # type: ignore[arg-type]


def test_mirror_order_swaps_each_right_point_with_its_left_twin() -> None:
    from screener.pipeline.landmarks import mirror_order

    assert mirror_order(16).tolist() == [3, 4, 5, 0, 1, 2, 10, 11, 12, 13, 6, 7, 8, 9, 14, 15]
    assert mirror_order(20).tolist()[16:] == [18, 19, 16, 17]  # each lung's apex and base
    names = LANDMARK_NAMES + EXTENT_POINTS
    for i, j in enumerate(mirror_order(20)):
        assert names[j] == names[i].replace("right", "LEFT").replace("left", "right").replace("LEFT", "left")


def test_bundle_manifest_fixes_views_and_spine_rule_and_old_bundles_keep_theirs(tmp_path) -> None:
    import json
    import shutil

    from screener.pipeline.bundle import BundleError, ModelBundle, demo_bundle_path

    assert ModelBundle.load().detector().spine_rule == {"cervical_spine": 0.5, "t12": 1.0}
    root = tmp_path / "b"
    shutil.copytree(demo_bundle_path(), root)
    manifest = json.loads((root / "manifest.json").read_text())

    def write(**landmarks: object) -> None:
        lm = {k: v for k, v in manifest["landmarks"].items() if k not in ("views", "spine_from_rule")}
        (root / "manifest.json").write_text(json.dumps({**manifest, "landmarks": {**lm, **landmarks}}))

    write()  # written before the keys existed: the network alone, one view, as it ran then
    old = ModelBundle.load(root).detector()
    assert old.spine_rule == {} and old.views == 1 and old.flip is False
    model_id = ModelBundle.load(root).model_id
    write(flip=False)  # the default written out: the same model
    assert ModelBundle.load(root).model_id == model_id
    write(flip=True)  # the mirrored views are part of the bundle's identity: they move every point
    assert ModelBundle.load(root).detector().flip is True and ModelBundle.load(root).model_id != model_id
    for bad, message in (({"views": 0}, "landmarks.views"), ({"views": True}, "landmarks.views"),
                         ({"flip": "yes"}, "landmarks.flip"),
                         ({"spine_from_rule": {"t12": 2}}, "landmarks.spine_from_rule"),
                         ({"spine_from_rule": ["t12"]}, "landmarks.spine_from_rule")):
        write(**bad)
        with pytest.raises(BundleError, match=message):
            ModelBundle.load(root)
