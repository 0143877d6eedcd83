"""The JSRT chest radiographs with contours, and the rule that turns contours into landmarks.

Data layout (../shared/data/jsrt): images/JPC*.png (512 x 512, 0.7 mm per pixel),
landmarks.json (per image: RL, LL, H, RCLA, LCLA contours in pixel space, x right, y down),
clinical.csv (id, sex, age, condition). Right/left are the patient's: the right lung is on
the image's left.

The 16-point scheme (screener.pipeline.landmarks.LANDMARK_NAMES) is derived here, once:

- clavicles: the contour's main axis is its first principal component through the centroid;
  the medial and lateral ends are the extreme projections of the contour onto that axis (the
  end nearer the body midline is medial), the midpoint is halfway between them, all three on
  the axis so they sit in the middle of the bone's width;
- rib cage: on each lung contour, the lateral-most crossing of the horizontal line at 20, 40,
  60 and 80 % of the lung's height (apex to base);
- cervical spine (derived, not annotated): on the midline (x halfway between the clavicles'
  medial ends) at the level of the higher lung apex, where C7/T1 project on a PA film;
- T12 (derived, not annotated): on the same midline at the mean level of the two lung bases.

Detectors with extent points (screener.pipeline.landmarks.EXTENT_POINTS) also learn each
lung's apex and base: the contour's highest and lowest row, at the mean column of the contour
points within half a pixel of that row (a flat dome has no single lowest point).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from screener.pipeline.landmarks import LANDMARK_NAMES, NUM_LANDMARKS, RIB_LEVELS

__all__ = ["JsrtCase", "load_jsrt", "landmarks_from_contours", "extent_points_from_contours", "PIXEL_MM", "default_jsrt_root", "split_ids", "fold_ids"]

PIXEL_MM = 0.7  # JSRT resized to 512 x 512 from 2048 x 2048 at 0.175 mm


@dataclass(frozen=True)
class JsrtCase:
    case_id: str
    image_path: Path
    sex: str  # "M" or "F"
    age: int
    landmarks: np.ndarray  # (16, 2) pixel coordinates in the 512 x 512 image
    contours: dict[str, np.ndarray]
    extent: np.ndarray  # (4, 2) each lung's apex and base (EXTENT_POINTS order)


def default_jsrt_root() -> Path:
    """../shared/data/jsrt beside the checkout (where the developers' data lives)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "jsrt"


def _clavicle_points(contour: np.ndarray, midline_x: float) -> np.ndarray:
    centroid = contour.mean(axis=0)
    centred = contour - centroid
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axis = vt[0]
    t = centred @ axis
    ends = np.stack([centroid + t.min() * axis, centroid + t.max() * axis])
    medial_first = np.argsort(np.abs(ends[:, 0] - midline_x))
    medial, lateral = ends[medial_first[0]], ends[medial_first[1]]
    return np.stack([medial, (medial + lateral) / 2.0, lateral])


def _lateral_crossing(contour: np.ndarray, y: float, side: str) -> np.ndarray:
    """Lateral-most point where the closed contour crosses the horizontal line at ``y``."""
    a = contour
    b = np.roll(contour, -1, axis=0)
    lo, hi = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
    hit = (lo <= y) & (y <= hi) & (hi > lo)
    if not hit.any():
        raise ValueError(f"lung contour does not cross y={y:.1f}")
    f = (y - a[hit, 1]) / (b[hit, 1] - a[hit, 1])
    xs = a[hit, 0] + f * (b[hit, 0] - a[hit, 0])
    x = xs.min() if side == "right" else xs.max()  # patient's right lung is on the image's left
    return np.array([x, y])


def landmarks_from_contours(contours: dict[str, np.ndarray]) -> np.ndarray:
    """The 16 landmarks (in LANDMARK_NAMES order) from JSRT lung and clavicle contours."""
    rl, ll = np.asarray(contours["RL"], float), np.asarray(contours["LL"], float)
    rcla, lcla = np.asarray(contours["RCLA"], float), np.asarray(contours["LCLA"], float)
    # Body midline estimate for telling the medial clavicle end from the lateral one.
    mid_x0 = (rl[:, 0].max() + ll[:, 0].min()) / 2.0
    right_clav = _clavicle_points(rcla, mid_x0)
    left_clav = _clavicle_points(lcla, mid_x0)

    ribs = []
    for contour, side in ((rl, "right"), (ll, "left")):
        top, bottom = contour[:, 1].min(), contour[:, 1].max()
        ribs.extend(_lateral_crossing(contour, top + f * (bottom - top), side) for f in RIB_LEVELS)

    midline_x = (right_clav[0, 0] + left_clav[0, 0]) / 2.0
    apex_y = min(rl[:, 1].min(), ll[:, 1].min())
    base_y = (rl[:, 1].max() + ll[:, 1].max()) / 2.0
    pts = np.concatenate(
        [right_clav, left_clav, np.stack(ribs), [[midline_x, apex_y]], [[midline_x, base_y]]]
    )
    assert pts.shape == (NUM_LANDMARKS, 2), pts.shape
    return pts


def extent_points_from_contours(contours: dict[str, np.ndarray]) -> np.ndarray:
    """Each lung's apex and base (4, 2), in EXTENT_POINTS order, from its contour."""
    out = []
    for key in ("RL", "LL"):
        c = np.asarray(contours[key], float)
        for row in (c[:, 1].min(), c[:, 1].max()):
            near = np.abs(c[:, 1] - row) <= 0.5
            out.append([c[near, 0].mean(), row])
    return np.asarray(out)


def load_jsrt(root: Path | str | None = None) -> list[JsrtCase]:
    """All cases, sorted by id. Raises FileNotFoundError naming the missing file."""
    root = Path(root) if root is not None else default_jsrt_root()
    lm_path, clin_path = root / "landmarks.json", root / "clinical.csv"
    for p in (lm_path, clin_path, root / "images"):
        if not p.exists():
            raise FileNotFoundError(f"JSRT data not found: {p} (pass --jsrt-root)")
    contours_by_id = json.loads(lm_path.read_text())["images"]
    clinical = {}
    with clin_path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            clinical[row["id"].strip()] = row
    cases = []
    for case_id in sorted(contours_by_id):
        contours = {k: np.asarray(v, float) for k, v in contours_by_id[case_id].items()}
        row = clinical.get(case_id, {})
        sex = (row.get("sex") or "").strip().upper()
        age_text = (row.get("age") or "").strip()
        cases.append(
            JsrtCase(
                case_id=case_id,
                image_path=root / "images" / f"{case_id}.png",
                sex=sex if sex in ("M", "F") else "",
                age=int(age_text) if age_text.isdigit() else -1,
                landmarks=landmarks_from_contours(contours),
                contours=contours,
                extent=extent_points_from_contours(contours),
            )
        )
    return cases


def split_ids(ids: list[str], val_fraction: float = 0.2, seed: int = 20240) -> tuple[list[str], list[str]]:
    """Fixed by-image split: a seeded permutation of the sorted ids (same on every machine)."""
    ordered = sorted(ids)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(ordered))
    n_val = max(1, int(round(val_fraction * len(ordered))))
    val = sorted(ordered[i] for i in perm[:n_val])
    train = sorted(ordered[i] for i in perm[n_val:])
    return train, val


def fold_ids(ids: list[str], folds: int, fold: int, seed: int = 20240) -> tuple[list[str], list[str]]:
    """k-fold split by image: fold ``fold`` of ``folds`` is validation, the rest training.

    The same seeded permutation as :func:`split_ids`, cut into ``folds`` near-equal parts, so
    every image is validated exactly once across the folds.
    """
    if folds < 2 or not 0 <= fold < folds:
        raise ValueError(f"fold {fold} of {folds}: need folds >= 2 and 0 <= fold < folds")
    ordered = sorted(ids)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    part = set(np.array_split(perm, folds)[fold].tolist())
    val = sorted(ordered[i] for i in part)
    train = sorted(ordered[i] for i in range(len(ordered)) if i not in part)
    return train, val


assert len(LANDMARK_NAMES) == NUM_LANDMARKS


def split_cases(root: Path | str | None, folds: int, fold: int, val_fraction: float) -> tuple[list[JsrtCase], list[JsrtCase]]:
    """(training, validation) cases: fold ``fold`` of ``folds`` (:func:`fold_ids`) when
    ``folds`` > 0, else the fixed split (:func:`split_ids`); what every trainer here uses."""
    cases = load_jsrt(root)
    ids = [c.case_id for c in cases]
    train_ids, val_ids = fold_ids(ids, folds, fold) if folds else split_ids(ids, val_fraction)
    by_id = {c.case_id: c for c in cases}
    return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]
