"""A synthetic BMD benchmark on real radiographs, with ground truth that only local ROIs see.

No public data pairs chest radiographs with DXA, so to check that the multi-ROI machinery
works (landmarks -> oriented crops from full resolution -> shared backbone) we plant a
known signal. Each JSRT radiograph is copied several times; each copy gets a random lumbar
BMD and a fine "trabecular" grain whose strength falls as BMD rises, painted only inside
bone: the clavicles (their annotated contours), the spine at the cervical and T12 levels,
and the ribs inside each lung under the rib-cage ROIs. The grain is high-frequency and
zero-mean, so a whole-image input downsized to the network's size barely keeps it, while
crops from the full-resolution image do: a working multi-ROI model must beat the global one.

Output: PNGs and a manifest CSV (with ground-truth landmarks, patient_id = JSRT id so copies
of one radiograph never straddle the split) that ``python -m training bmd train`` reads.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from matplotlib.path import Path as PolyPath
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from screener.pipeline.landmarks import Landmarks
from screener.pipeline.rois import roi_boxes
from training.common import load_grey_png
from training.jsrt import JsrtCase, load_jsrt

__all__ = ["bone_mask", "plant_signal", "make_synthetic"]

BMD_RANGE = (0.55, 1.35)
VERTEBRA_RATIO = np.array([0.94, 1.0, 1.03, 1.02])  # L1..L4 relative to the mean, as in DXA tables
GRAIN_MIN, GRAIN_MAX = 0.01, 0.07  # grain amplitude (display units) at the highest / lowest BMD


def _polygon_mask(poly: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside = PolyPath(poly).contains_points(np.column_stack([xx.ravel(), yy.ravel()]))
    return inside.reshape(shape)


def _box_mask(box, shape: tuple[int, int], half_u: float = 0.5, half_v: float = 0.5) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    uv = box.from_source(np.column_stack([xx.ravel(), yy.ravel()]))
    return ((np.abs(uv[:, 0]) <= half_u) & (np.abs(uv[:, 1]) <= half_v)).reshape(shape)


def bone_mask(case: JsrtCase, shape: tuple[int, int]) -> np.ndarray:
    """Soft [0, 1] mask of the bone regions the six local ROIs look at."""
    lm = Landmarks(points=case.landmarks, confidence=np.ones(len(case.landmarks)))
    boxes = roi_boxes(lm, shape)
    mask = _polygon_mask(case.contours["RCLA"], shape) | _polygon_mask(case.contours["LCLA"], shape)
    for name in ("cervical_spine", "t12"):  # the vertebral column: a central band of the box
        mask |= _box_mask(boxes[name], shape, half_u=0.2, half_v=0.5)
    for name, lung in (("left_ribcage", "LL"), ("right_ribcage", "RL")):
        mask |= _box_mask(boxes[name], shape) & _polygon_mask(case.contours[lung], shape)
    return ndimage.gaussian_filter(mask.astype(np.float32), 1.5)


def plant_signal(image: np.ndarray, mask: np.ndarray, bmd: float, rng: np.random.Generator) -> np.ndarray:
    """Add zero-mean fine grain with amplitude falling linearly with ``bmd`` inside ``mask``."""
    t = (BMD_RANGE[1] - bmd) / (BMD_RANGE[1] - BMD_RANGE[0])
    amplitude = GRAIN_MIN + (GRAIN_MAX - GRAIN_MIN) * float(np.clip(t, 0.0, 1.0))
    noise = rng.standard_normal(image.shape).astype(np.float32)
    grain = ndimage.gaussian_filter(noise, 0.5) - ndimage.gaussian_filter(noise, 1.2)  # band-pass, period 2-5 px
    grain /= grain.std() + 1e-8
    return np.clip(image + amplitude * mask * grain, 0.0, 1.0)


def make_synthetic(out_dir: str | Path, copies: int = 2, jsrt_root: str | None = None, seed: int = 0, limit: int = 0) -> Path:
    """Write ``copies`` synthetic images per JSRT case and manifest.csv; returns the manifest."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases = load_jsrt(jsrt_root)
    if limit:
        cases = cases[:limit]
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "L1", "L2", "L3", "L4", "sex", "age", "patient_id", "landmarks"])
        for case in tqdm(cases, desc="synthetic images"):
            image = load_grey_png(case.image_path)
            mask = bone_mask(case, image.shape)
            for k in range(copies):
                bmd = float(rng.uniform(*BMD_RANGE))
                per_vertebra = bmd * VERTEBRA_RATIO + rng.normal(0.0, 0.01, size=4)
                img = plant_signal(image, mask, bmd, rng)
                name = f"images/{case.case_id}_{k}.png"
                Image.fromarray(np.round(img * 65535).astype(np.uint16)).save(out / name)
                writer.writerow(
                    [name, *(f"{v:.4f}" for v in per_vertebra), case.sex, case.age, case.case_id,
                     " ".join(f"{v:.2f}" for v in case.landmarks.ravel())]
                )
    return manifest
