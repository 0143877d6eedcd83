"""Six oriented bone ROIs plus the whole image, placed from the 16 landmarks (METHOD.md s. 2).

Each ROI is a square :class:`OrientedBox` whose size is a fixed multiple of a landmark
distance, so the recipe does not depend on pixel spacing or matrix size. Crops are sampled
from the full-resolution image (through a box-filter pyramid, never from a downsized copy),
rotated to the landmark axis, and left-side ROIs are mirrored so that left and right look
alike to the shared backbone: in every clavicle crop the medial end is on the right, in
every rib-cage crop the midline is on the right.

Recipe ``cxr7-v1`` (thorax width W = distance between the two 40 % rib-cage points):

========================  =====================  ==========================  ==================
ROI                        centre                 axis                         side
========================  =====================  ==========================  ==================
left/right clavicle        clavicle midpoint      columns: lateral -> medial   1.15 x clavicle
cervical spine             cervical landmark      rows: cervical -> T12        0.30 W
left/right rib cage        mean of 4 rib points,  rows: 20 % -> 80 % point     1.0 x (80 % - 20 %)
                           0.2 side medially
T12                        T12 landmark           rows: cervical -> T12        0.30 W
whole image                image centre           image axes (letterboxed)     longest image side
========================  =====================  ==========================  ==================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from screener.pipeline.geometry import OrientedBox, Pyramid, letterbox_box, sample_box
from screener.pipeline.landmarks import Landmarks, stretch_contrast

__all__ = ["ROI_RECIPE", "ROI_NAMES", "LOCAL_ROI_NAMES", "RoiSet", "roi_boxes", "extract_rois"]

ROI_RECIPE = "cxr7-v1"
ROI_NAMES: tuple[str, ...] = (
    "left_clavicle",
    "right_clavicle",
    "cervical_spine",
    "left_ribcage",
    "right_ribcage",
    "t12",
    "whole_image",
)
LOCAL_ROI_NAMES = ROI_NAMES[:6]

CLAVICLE_SCALE = 1.15
SPINE_SCALE = 0.30
RIBCAGE_SCALE = 1.0
RIBCAGE_MEDIAL_SHIFT = 0.2
IMAGE_STRETCH = (0.1, 99.9)  # percentiles mapped to 0 and 1 before cropping


@dataclass(frozen=True)
class RoiSet:
    """The crops of one image and where each came from in source pixels."""

    names: tuple[str, ...]
    crops: np.ndarray  # (R, S, S) float32 display values in [0, 1]
    boxes: tuple[OrientedBox, ...]
    inside_fraction: np.ndarray  # (R,) share of each crop that lies inside the image

    @property
    def corners(self) -> np.ndarray:
        """(R, 4, 2) source (x, y): top-left, top-right, bottom-right, bottom-left of each crop."""
        return np.stack([b.corners() for b in self.boxes])


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.hypot(*v))
    if not np.isfinite(n) or n < 1e-6:
        raise ValueError("landmarks too close together to define an ROI axis")
    return v / n


def _box_from_rows_axis(center: np.ndarray, ey: np.ndarray, side: float, mirror: bool) -> OrientedBox:
    """Box whose rows run along ``ey``; columns follow by rotation (or reflection if mirrored)."""
    ex = np.array([-ey[1], ey[0]]) if mirror else np.array([ey[1], -ey[0]])
    return OrientedBox(tuple(center), tuple(ex), tuple(ey), float(side))


def _box_from_cols_axis(center: np.ndarray, ex: np.ndarray, side: float, mirror: bool) -> OrientedBox:
    perp = np.array([-ex[1], ex[0]])
    ey = -perp if mirror else perp
    return OrientedBox(tuple(center), tuple(ex), tuple(ey), float(side))


def roi_boxes(landmarks: Landmarks, image_shape: tuple[int, int]) -> dict[str, OrientedBox]:
    """Boxes for every ROI in ``ROI_NAMES`` from landmarks in source pixel coordinates."""
    p = landmarks.__getitem__
    boxes: dict[str, OrientedBox] = {}
    for side, mirror in (("left", True), ("right", False)):
        medial, mid, lateral = p(f"clavicle_{side}_medial"), p(f"clavicle_{side}_mid"), p(f"clavicle_{side}_lateral")
        length = float(np.hypot(*(lateral - medial)))
        boxes[f"{side}_clavicle"] = _box_from_cols_axis(mid, _unit(medial - lateral), CLAVICLE_SCALE * length, mirror)
    spine_axis = _unit(p("t12") - p("cervical_spine"))
    width = float(np.hypot(*(p("ribcage_left_40") - p("ribcage_right_40"))))
    boxes["cervical_spine"] = _box_from_rows_axis(p("cervical_spine"), spine_axis, SPINE_SCALE * width, False)
    for side, mirror in (("left", True), ("right", False)):
        pts = np.stack([p(f"ribcage_{side}_{k}") for k in (20, 40, 60, 80)])
        side_len = RIBCAGE_SCALE * float(np.hypot(*(pts[3] - pts[0])))
        box = _box_from_rows_axis(pts.mean(axis=0), _unit(pts[3] - pts[0]), side_len, mirror)
        # Columns point medially in both (mirrored) rib boxes: shift in to take ribs, not air.
        center = np.asarray(box.center) + RIBCAGE_MEDIAL_SHIFT * side_len * np.asarray(box.ex)
        boxes[f"{side}_ribcage"] = OrientedBox(tuple(center), box.ex, box.ey, box.side)
    boxes["t12"] = _box_from_rows_axis(p("t12"), spine_axis, SPINE_SCALE * width, False)
    boxes["whole_image"] = letterbox_box(*image_shape)
    return {name: boxes[name] for name in ROI_NAMES}


def extract_rois(
    image: np.ndarray | Pyramid, landmarks: Landmarks, size: int, names: tuple[str, ...] = ROI_NAMES
) -> RoiSet:
    """Crop ``names`` ROIs at ``size`` x ``size`` from a display-value image (floats in [0, 1]).

    The image gets one robust contrast stretch (0.1-99.9 percentiles, wide so that the dense
    mediastinum and spine are not clipped) so that every vendor's rendering reaches the network
    on the same scale; crops keep relative density within it.
    """
    pyr = image if isinstance(image, Pyramid) else Pyramid(image)
    stretched = Pyramid(stretch_contrast(pyr.base, IMAGE_STRETCH[0], IMAGE_STRETCH[1]))
    unknown = set(names) - set(ROI_NAMES)
    if unknown:
        raise ValueError(f"unknown ROI names {sorted(unknown)}; known: {ROI_NAMES}")
    all_boxes = roi_boxes(landmarks, pyr.base.shape)
    crops, inside = [], []
    for name in names:
        crop = sample_box(stretched, all_boxes[name], size, fill=np.nan)
        finite = np.isfinite(crop)
        inside.append(float(finite.mean()))
        crops.append(np.where(finite, crop, 0.0).astype(np.float32))
    return RoiSet(
        names=tuple(names),
        crops=np.stack(crops),
        boxes=tuple(all_boxes[n] for n in names),
        inside_fraction=np.asarray(inside),
    )
