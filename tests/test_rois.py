"""ROI geometry: crops of synthetic images with known patterns land where expected."""

from __future__ import annotations

import math

import numpy as np
import pytest

from screener.pipeline.geometry import OrientedBox, Pyramid, letterbox_box, sample_box
from screener.pipeline.landmarks import LANDMARK_NAMES, Landmarks
from screener.pipeline.rois import LOCAL_ROI_NAMES, ROI_NAMES, extract_rois, roi_boxes
from tests.support.common import synthetic_contours
from training.jsrt import landmarks_from_contours


def test_box_maps_crop_centre_and_corners() -> None:
    box = OrientedBox(center=(100.0, 50.0), ex=(1.0, 0.0), ey=(0.0, 1.0), side=40.0)
    np.testing.assert_allclose(box.to_source(np.array([[0.0, 0.0]])), [[100.0, 50.0]])
    np.testing.assert_allclose(box.corners(), [[80, 30], [120, 30], [120, 70], [80, 70]])
    xy = np.array([[90.0, 61.0], [117.0, 33.0]])
    np.testing.assert_allclose(box.crop_to_source(box.source_to_crop(xy, 64), 64), xy)


def test_rotated_box_samples_a_marker_where_expected() -> None:
    img = np.zeros((200, 300), np.float32)
    img[118:123, 198:203] = 1.0  # marker centred at (x=200, y=120)
    angle = math.radians(30)
    box = OrientedBox(center=(180.0, 110.0), ex=(math.cos(angle), math.sin(angle)), ey=(-math.sin(angle), math.cos(angle)), side=64.0)
    crop = sample_box(img, box, 64)
    expected = box.source_to_crop(np.array([[200.0, 120.0]]), 64)[0]  # (col, row)
    rows, cols = np.indices(crop.shape)
    centroid = np.array([(cols * crop).sum(), (rows * crop).sum()]) / crop.sum()
    np.testing.assert_allclose(centroid, expected, atol=0.5)


def test_mirrored_box_reverses_columns() -> None:
    ramp = np.tile(np.arange(100, dtype=np.float32), (100, 1))  # value = x
    plain = OrientedBox((50.0, 50.0), (1.0, 0.0), (0.0, 1.0), 40.0)
    mirror = OrientedBox((50.0, 50.0), (-1.0, 0.0), (0.0, 1.0), 40.0)
    assert mirror.mirrored and not plain.mirrored
    np.testing.assert_allclose(sample_box(ramp, mirror, 20), sample_box(ramp, plain, 20)[:, ::-1], atol=1e-4)


def test_large_box_is_antialiased_through_pyramid() -> None:
    checker = (np.indices((512, 512)).sum(axis=0) % 2).astype(np.float32)  # 1-px checkerboard
    crop = sample_box(Pyramid(checker), letterbox_box(512, 512), 64)
    assert crop.std() < 0.05 and abs(crop.mean() - 0.5) < 0.05


@pytest.mark.parametrize("shape", [(2500, 2000), (1955, 1841), (777, 1023)])
def test_pyramid_sampling_is_exact_for_sizes_not_divisible_by_the_factor(shape) -> None:
    """A linear ramp sampled through a reduced level must give back the source coordinates."""
    h, w = shape
    ramp_x = np.tile(np.arange(w, dtype=np.float32), (h, 1))
    ramp_y = np.tile(np.arange(h, dtype=np.float32)[:, None], (1, w))
    box = letterbox_box(h, w)
    size = 256
    expected = box.crop_to_source(np.stack(np.meshgrid(np.arange(size), np.arange(size)), -1).reshape(-1, 2), size)
    got_x = sample_box(ramp_x, box, size, fill=np.nan).ravel()
    got_y = sample_box(ramp_y, box, size, fill=np.nan).ravel()
    inside = np.isfinite(got_x) & (expected[:, 0] > 8) & (expected[:, 0] < w - 9) & (expected[:, 1] > 8) & (expected[:, 1] < h - 9)
    np.testing.assert_allclose(got_x[inside], expected[inside, 0], atol=0.05)
    np.testing.assert_allclose(got_y[inside], expected[inside, 1], atol=0.05)


def test_letterbox_pads_short_side_with_fill() -> None:
    img = np.ones((100, 200), np.float32)
    crop = sample_box(img, letterbox_box(100, 200), 50, fill=np.nan)
    assert np.isnan(crop[:10]).all() and np.isfinite(crop[20:30]).all()


@pytest.fixture
def scene() -> tuple[np.ndarray, Landmarks]:
    """A 512 x 512 image with one distinct marker at each local ROI's centre."""
    lm = Landmarks(points=landmarks_from_contours(synthetic_contours()), confidence=np.ones(16))
    return np.full((512, 512), 0.2, np.float32), lm


def test_each_roi_is_centred_on_its_structure(scene) -> None:
    img, lm = scene
    boxes = roi_boxes(lm, img.shape)
    for name in LOCAL_ROI_NAMES:
        marked = img.copy()
        cx, cy = (int(round(v)) for v in boxes[name].center)
        marked[cy - 3 : cy + 4, cx - 3 : cx + 4] = 1.0
        crop = extract_rois(marked, lm, 64, names=(name,)).crops[0]
        row, col = np.unravel_index(np.argmax(crop), crop.shape)
        assert abs(row - 31.5) <= 2 and abs(col - 31.5) <= 2, name
    # Clavicle boxes sit on the clavicle midpoints, spine boxes on their landmarks.
    np.testing.assert_allclose(boxes["left_clavicle"].center, lm["clavicle_left_mid"])
    np.testing.assert_allclose(boxes["t12"].center, lm["t12"])


def test_left_rois_are_mirrored_images_of_right(scene) -> None:
    _, lm = scene
    boxes = roi_boxes(lm, (512, 512))
    assert boxes["left_clavicle"].mirrored and boxes["left_ribcage"].mirrored
    assert not boxes["right_clavicle"].mirrored and not boxes["right_ribcage"].mirrored
    # In both clavicle crops the medial end is on the crop's right (column > centre).
    for side in ("left", "right"):
        medial_uv = boxes[f"{side}_clavicle"].from_source(lm[f"clavicle_{side}_medial"][None])[0]
        assert medial_uv[0] > 0.3, side
    # In both rib crops the midline is on the right: the box centre is medial of the border.
    for side in ("left", "right"):
        border_uv = boxes[f"{side}_ribcage"].from_source(lm[f"ribcage_{side}_40"][None])[0]
        assert border_uv[0] < 0, side


def test_left_right_symmetric_scene_gives_identical_crops() -> None:
    """A scene symmetric about x = 255.5 must give equal left and right crops (mirroring)."""
    rng = np.random.default_rng(0)
    half = rng.random((512, 256)).astype(np.float32)
    img = np.concatenate([half, half[:, ::-1]], axis=1)
    pts = landmarks_from_contours(synthetic_contours())
    sym = pts.copy()
    for i, name in enumerate(LANDMARK_NAMES):  # mirror each right point onto its left twin
        if "_right" in name:
            j = LANDMARK_NAMES.index(name.replace("_right", "_left"))
            sym[j] = [511 - pts[i][0], pts[i][1]]
    sym[14, 0] = sym[15, 0] = 255.5
    rs = extract_rois(img, Landmarks(points=sym, confidence=np.ones(16)), 48)
    left, right = rs.names.index("left_clavicle"), rs.names.index("right_clavicle")
    np.testing.assert_allclose(rs.crops[left], rs.crops[right], atol=1e-3)


def test_whole_image_roi_and_corners_in_source_pixels(scene) -> None:
    img, lm = scene
    rs = extract_rois(img, lm, 32)
    assert rs.names == ROI_NAMES and rs.crops.shape == (7, 32, 32)
    np.testing.assert_allclose(rs.corners[-1], [[-0.5, -0.5], [511.5, -0.5], [511.5, 511.5], [-0.5, 511.5]])
    assert (rs.inside_fraction > 0.5).all()


def test_roi_size_independent_of_matrix_size(scene) -> None:
    """The same anatomy at 2x the resolution gives boxes exactly 2x larger at 2x the place."""
    _, lm = scene
    big = Landmarks(points=lm.points * 2 + 0.5, confidence=lm.confidence)
    a, b = roi_boxes(lm, (512, 512)), roi_boxes(big, (1024, 1024))
    for name in LOCAL_ROI_NAMES:
        assert b[name].side == pytest.approx(2 * a[name].side)
        np.testing.assert_allclose(b[name].corners(), a[name].corners() * 2 + 0.5, atol=1e-6)


def test_unknown_roi_name_is_rejected(scene) -> None:
    img, lm = scene
    with pytest.raises(ValueError, match="unknown ROI"):
        extract_rois(img, lm, 32, names=("pelvis",))
