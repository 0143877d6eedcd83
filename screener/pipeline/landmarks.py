"""Sixteen anatomical landmarks on a frontal chest radiograph (METHOD.md section 1).

The scheme: three points on each clavicle, four along each side of the rib cage, one on the
cervical spine and one on T12. "Right" and "left" are the patient's, so right-side points lie
on the image's left on a PA film.

The detector is a heatmap network: a torchvision ResNet-18 trunk (up to layer3) with a small
feature-pyramid decoder, one heatmap per landmark, read out by soft-argmax. Confidence per
landmark is the share of the heatmap's probability mass within a small radius of the
predicted point, so a diffuse heatmap (a lateral film, a hand, a blank image) scores low.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from screener.pipeline.geometry import OrientedBox, Pyramid, letterbox_box, sample_box


class ViewScorer(Protocol):
    """What the detector needs of a view classifier (screener.pipeline.view.ViewClassifier,
    which builds on this module's input helpers, so it is not imported here)."""

    def classify(self, images: Sequence[np.ndarray | Pyramid]) -> list[Any]: ...

__all__ = [
    "LANDMARK_SCHEME",
    "LANDMARK_NAMES",
    "NUM_LANDMARKS",
    "Landmarks",
    "LandmarkNet",
    "LandmarkDetector",
    "landmark_input",
    "soft_argmax",
    "spine_points_by_rule",
    "apply_spine_rule",
    "check_spine_rule",
    "check_views",
    "view_boxes",
    "DERIVED_LANDMARKS",
    "SPINE_FROM_RULE",
    "RIB_LEVELS",
    "VIEWS",
    "EXTENT_POINTS",
    "EXTENT_RULE",
    "check_extent_rule",
    "lung_rows",
    "mirror_order",
]

#: Name of this scheme, stored in every bundle manifest and checked on load.
LANDMARK_SCHEME = "cxr16-v1"

LANDMARK_NAMES: tuple[str, ...] = (
    "clavicle_right_medial",
    "clavicle_right_mid",
    "clavicle_right_lateral",
    "clavicle_left_medial",
    "clavicle_left_mid",
    "clavicle_left_lateral",
    "ribcage_right_20",
    "ribcage_right_40",
    "ribcage_right_60",
    "ribcage_right_80",
    "ribcage_left_20",
    "ribcage_left_40",
    "ribcage_left_60",
    "ribcage_left_80",
    "cervical_spine",
    "t12",
)
NUM_LANDMARKS = len(LANDMARK_NAMES)

#: Landmarks that are derived from other structures rather than annotated (see training.jsrt).
DERIVED_LANDMARKS: tuple[str, ...] = ("cervical_spine", "t12")

#: Heights of the four rib-cage points on each lung, as shares of its apex-to-base height.
RIB_LEVELS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)

#: How much of each derived point comes from the label rule applied to the other predicted
#: points (1) rather than from its own heatmap (0). A heatmap has nothing to lock onto at T12
#: (it is defined by the lung bases, not by an edge at the point): in the cross-validation
#: (README, "Landmark accuracy") its error falls from 10.5 mm to 6.3 mm by the rule. For the
#: cervical point the mean of the two was chosen on the fixed validation split (the
#: cross-validation puts 0.25 slightly ahead).
SPINE_FROM_RULE: Mapping[str, float] = MappingProxyType({"cervical_spine": 0.5, "t12": 1.0})

#: Four more points a detector may predict besides the 16 (``LandmarkNet(extent_points=True)``):
#: each lung's apex (the highest point of its contour) and base (the lowest). They are not
#: landmarks of the scheme, but the label rule hangs the rib-cage rows, the cervical point and
#: T12 on them, and unlike a rib-cage row (a share of the lung's height, nothing to see at
#: the point) they are edges a heatmap can lock onto.
EXTENT_POINTS: tuple[str, ...] = ("lung_right_apex", "lung_right_base", "lung_left_apex", "lung_left_base")


def mirror_order(count: int) -> np.ndarray:
    """Index order that relabels the first ``count`` output points (the 16, then the extent
    points) of a left-right flipped input as the unflipped one's: each right point takes its
    left twin's index and back; the midline points (cervical spine, T12) stay."""
    names = (LANDMARK_NAMES + EXTENT_POINTS)[:count]
    swapped = [n.replace("right", "\0").replace("left", "right").replace("\0", "left") for n in names]
    return np.asarray([names.index(n) for n in swapped])


#: How the extent points enter the 16 (detectors with them only): ``lung_extent`` is the share
#: of each lung's apex and base row taken from its extent points rather than from the
#: least-squares fit through its four rib-cage rows; ``ribcage_rows`` the share of each
#: rib-cage point's row taken from apex + level x height rather than from its own heatmap.
#: The spine rule then uses the same apex and base. 1.0 / 1.0 was chosen on the first fold;
#: the whole cross-validation (README, "Landmark accuracy") gives it 4.53 mm, against 4.48 at
#: the grid's best (0.75 / 1.0) and 5.06 with no extent rule.
EXTENT_RULE: Mapping[str, float] = MappingProxyType({"lung_extent": 1.0, "ribcage_rows": 1.0})


def _check_shares(weights: Mapping[str, object], known: Sequence[str], what: str, known_as: str) -> dict[str, float]:
    if not isinstance(weights, Mapping):
        raise ValueError(f"{what} {weights!r}: must map {list(known)} to weights within 0..1")
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(f"{what} names {unknown}: only {list(known)} are {known_as}")
    out = {}
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= float(w) <= 1.0:
            raise ValueError(f"{what} weight of {name} is {w!r}: must be a number within 0..1")
        out[str(name)] = float(w)
    return out


def check_spine_rule(weights: Mapping[str, object]) -> dict[str, float]:
    """Validated spine-rule weights (derived landmark -> share within 0..1); ValueError names the fault."""
    return _check_shares(weights, DERIVED_LANDMARKS, "spine rule", "derived")


def check_extent_rule(weights: Mapping[str, object]) -> dict[str, float]:
    """Validated extent-rule weights (see :data:`EXTENT_RULE`); ValueError names the fault."""
    return _check_shares(weights, tuple(EXTENT_RULE), "extent rule", "known")


def check_views(views: object) -> int:
    """A validated test-time view count (an integer within 1..len(VIEWS)); ValueError otherwise."""
    if isinstance(views, bool) or not isinstance(views, int) or not 1 <= views <= len(VIEWS):
        raise ValueError(f"landmark views = {views!r}: must be an integer within 1..{len(VIEWS)}")
    return views


#: Test-time views: (scale of the letterbox side, shift x, shift y as shares of it). The first
#: is the plain letterbox; the detector was trained on boxes jittered by about this much.
VIEWS: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0), (0.9, 0.0, 0.0), (1.1, 0.0, 0.0), (1.0, 0.03, 0.0), (1.0, -0.03, 0.0),
    (1.0, 0.0, 0.03), (1.0, 0.0, -0.03), (0.9, 0.03, 0.0), (0.9, -0.03, 0.0), (0.9, 0.0, 0.03),
    (0.9, 0.0, -0.03), (1.1, 0.03, 0.0), (1.1, -0.03, 0.0), (1.1, 0.0, 0.03), (1.1, 0.0, -0.03),
)


@dataclass(frozen=True)
class Landmarks:
    """Detected points in the source image's pixel coordinates (x = column, y = row)."""

    points: np.ndarray  # (16, 2) float64
    confidence: np.ndarray  # (16,) float64 in [0, 1]
    #: Median confidence the detector gives the same input turned by 180 degrees (NaN: not
    #: measured). A frontal film scores several times lower turned; an upside-down one higher.
    turned_confidence: float = float("nan")
    #: The view classifier's scores for the whole film (None: the bundle has no classifier).
    view: Any = None  # a screener.pipeline.view.ViewScores

    def __post_init__(self) -> None:
        if self.points.shape != (NUM_LANDMARKS, 2):
            raise ValueError(f"Landmarks.points must be ({NUM_LANDMARKS}, 2), got {self.points.shape}")
        if self.confidence.shape != (NUM_LANDMARKS,):
            raise ValueError(f"Landmarks.confidence must be ({NUM_LANDMARKS},), got {self.confidence.shape}")

    def __getitem__(self, name: str) -> np.ndarray:
        return self.points[LANDMARK_NAMES.index(name)]

    @property
    def min_confidence(self) -> float:
        return float(self.confidence.min())


class LandmarkNet(nn.Module):
    """ResNet-18 trunk (to stride 16) + FPN-style decoder to stride-4 heatmaps.

    One heatmap per landmark, then (``extent_points``) one per :data:`EXTENT_POINTS`.
    """

    def __init__(self, num_landmarks: int = NUM_LANDMARKS, width: int = 96, *, extent_points: bool = False) -> None:
        super().__init__()
        self.extent_points = bool(extent_points)
        num_landmarks += len(EXTENT_POINTS) if extent_points else 0
        r = torchvision.models.resnet18(weights=None)
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
        self.layer1, self.layer2, self.layer3 = r.layer1, r.layer2, r.layer3
        self.lat3 = nn.Conv2d(256, width, 1)
        self.lat2 = nn.Conv2d(128, width, 1)
        self.lat1 = nn.Conv2d(64, width, 1)
        self.smooth = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Conv2d(width, num_landmarks, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, S, S) normalised grey -> heatmap logits (B, L, S/4, S/4)."""
        x = x.expand(-1, 3, -1, -1)
        c1 = self.layer1(self.stem(x))
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        p = self.lat3(c3)
        p = F.interpolate(p, size=c2.shape[-2:], mode="bilinear", align_corners=False) + self.lat2(c2)
        p = F.interpolate(p, size=c1.shape[-2:], mode="bilinear", align_corners=False) + self.lat1(c1)
        return self.head(self.smooth(p))


def soft_argmax(logits: torch.Tensor, radius: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heatmap logits (B, L, H, W) -> (xy in heatmap pixels (B, L, 2), confidence (B, L), probs).

    Confidence is the probability mass within ``radius`` heatmap pixels of the expected point.
    """
    b, n, h, w = logits.shape
    prob = torch.softmax(logits.flatten(2).float(), dim=-1).view(b, n, h, w)
    ys = torch.arange(h, device=logits.device, dtype=prob.dtype)
    xs = torch.arange(w, device=logits.device, dtype=prob.dtype)
    x = (prob.sum(dim=2) * xs).sum(dim=-1)
    y = (prob.sum(dim=3) * ys).sum(dim=-1)
    xy = torch.stack([x, y], dim=-1)
    d2 = (xs.view(1, 1, 1, w) - x[..., None, None]) ** 2 + (ys.view(1, 1, h, 1) - y[..., None, None]) ** 2
    conf = (prob * (d2 <= radius**2)).sum(dim=(2, 3))
    return xy, conf, prob


def lung_rows(points: np.ndarray, extent: np.ndarray | None = None, from_extent: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Each lung's apex and base row, (..., 2) each, right lung first.

    Each side's four rib-cage points sit at known shares of its apex-to-base height, so a
    least-squares line through their rows gives that lung's apex and base; with ``extent``
    (..., 4, 2) (:data:`EXTENT_POINTS`) the rows move ``from_extent`` of the way to those points'.
    """
    pts = np.asarray(points, dtype=np.float64)
    idx = {n: i for i, n in enumerate(LANDMARK_NAMES)}
    design = np.stack([np.ones(len(RIB_LEVELS)), np.asarray(RIB_LEVELS)], axis=1)  # row = apex + f * height
    solve = np.linalg.pinv(design)  # (2, 4)
    apex, base = [], []
    for side in ("right", "left"):
        rows = pts[..., [idx[f"ribcage_{side}_{round(100 * f)}"] for f in RIB_LEVELS], 1]
        top, height = np.moveaxis(rows @ solve.T, -1, 0)
        apex.append(top)
        base.append(top + height)
    apex_rows, base_rows = np.stack(apex, axis=-1), np.stack(base, axis=-1)
    if extent is not None and from_extent:
        ext = np.asarray(extent, dtype=np.float64)[..., 1]  # rows of right apex, right base, left apex, left base
        apex_rows = (1.0 - from_extent) * apex_rows + from_extent * ext[..., [0, 2]]
        base_rows = (1.0 - from_extent) * base_rows + from_extent * ext[..., [1, 3]]
    return apex_rows, base_rows


def spine_points_by_rule(points: np.ndarray, rows: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The cervical and T12 points (..., 2, 2) placed by the label rule from the other 14.

    The rule (training.jsrt) puts both on the midline between the clavicles' medial ends, the
    cervical point at the higher lung apex and T12 at the mean lung base; apex and base rows
    are :func:`lung_rows`'s unless given.
    """
    pts = np.asarray(points, dtype=np.float64)
    idx = {n: i for i, n in enumerate(LANDMARK_NAMES)}
    apex, base = lung_rows(pts) if rows is None else rows
    mid_x = (pts[..., idx["clavicle_right_medial"], 0] + pts[..., idx["clavicle_left_medial"], 0]) / 2.0
    cervical = np.stack([mid_x, apex.min(axis=-1)], axis=-1)
    t12 = np.stack([mid_x, base.mean(axis=-1)], axis=-1)
    return np.stack([cervical, t12], axis=-2)


def apply_spine_rule(points: np.ndarray, weights: Mapping[str, float] = SPINE_FROM_RULE,
                     extent: np.ndarray | None = None, extent_rule: Mapping[str, float] | None = None) -> np.ndarray:
    """``points`` (..., 16, 2) with the derived points moved towards where the rule puts them.

    With ``extent`` points and an ``extent_rule`` (:data:`EXTENT_RULE`), the lungs' apex and
    base come partly from them, and the rib-cage rows move towards their places by the rule.
    """
    out = np.array(points, dtype=np.float64, copy=True)
    rule = dict(extent_rule or {}) if extent is not None else {}
    apex, base = lung_rows(out, extent, rule.get("lung_extent", 0.0))
    w_rows = rule.get("ribcage_rows", 0.0)
    if w_rows:
        for s, side in enumerate(("right", "left")):
            for f in RIB_LEVELS:
                i = LANDMARK_NAMES.index(f"ribcage_{side}_{round(100 * f)}")
                ruled = apex[..., s] + f * (base[..., s] - apex[..., s])
                out[..., i, 1] = w_rows * ruled + (1.0 - w_rows) * out[..., i, 1]
    ruled = spine_points_by_rule(out, (apex, base))
    for k, name in enumerate(DERIVED_LANDMARKS):
        w = float(weights.get(name, 0.0))
        i = LANDMARK_NAMES.index(name)
        out[..., i, :] = w * ruled[..., k, :] + (1.0 - w) * out[..., i, :]
    return out


def view_boxes(height: int, width: int, views: int) -> list[OrientedBox]:
    """The first ``views`` of :data:`VIEWS` as boxes on an image of this size."""
    base = letterbox_box(height, width)
    out = []
    for scale, dx, dy in VIEWS[:views]:
        center = (base.center[0] + dx * base.side, base.center[1] + dy * base.side)
        out.append(OrientedBox(center=center, ex=base.ex, ey=base.ey, side=base.side * scale))
    return out


def stretch_contrast(crop: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map the crop's [low, high] percentiles (NaN = outside the image, ignored) to [0, 1].

    Radiographs reach us with every contrast a vendor's processing gives them; a per-input
    stretch makes JSRT film scans and modern DX look alike to the detector. Outside = 0.
    """
    finite = np.isfinite(crop)
    all_finite = bool(finite.all())  # a whole film: no copy through the mask
    inside = crop.ravel() if all_finite else crop[finite]
    if inside.size == 0:
        return np.zeros_like(crop)
    # A regular subsample of ~250k pixels gives the same percentiles to well under a grey
    # level at a fraction of the cost on a 3000 x 3000 film.
    lo, hi = np.percentile(inside[:: max(1, inside.size // 250_000)], [low, high])
    out = (crop - lo) / max(hi - lo, 1e-6)
    np.clip(out, 0.0, 1.0, out=out)  # +-inf end at 1 or 0; NaN stays NaN
    if not all_finite:
        out[np.isnan(out)] = 0.0
    return out.astype(np.float32)


def landmark_input(
    image: np.ndarray | Pyramid, size: int, box: OrientedBox | None = None
) -> tuple[np.ndarray, OrientedBox]:
    """The detector's square input (letterboxed whole image unless ``box`` is given), stretched."""
    pyr = image if isinstance(image, Pyramid) else Pyramid(image)
    if box is None:
        box = letterbox_box(*pyr.base.shape)
    return stretch_contrast(sample_box(pyr, box, size, fill=np.nan)), box


def normalise_crop(crop: np.ndarray) -> np.ndarray:
    """Crops hold display values in [0, 1]; the networks see them centred and scaled."""
    return (crop - 0.5) / 0.25


class LandmarkDetector:
    """Runs a trained :class:`LandmarkNet` on whole images, batched, on CPU or GPU.

    ``views`` > 1 runs the net on that many slightly scaled and shifted boxes (:data:`VIEWS`)
    and takes the per-coordinate median; ``flip`` also runs each of them mirrored left to right
    (the points mapped back and each right point taken as its left twin), one more pass per
    view. The confidence is always the plain view's, so the gate's calibrated threshold keeps
    its meaning. ``check_turned`` also scores each input
    turned by 180 degrees (one more view) for the gate's upside-down check. A ``view``
    classifier, when given, scores each whole film for the gate (:attr:`Landmarks.view`).
    """

    def __init__(self, net: LandmarkNet, input_size: int, device: torch.device | str = "cpu", *, views: int = 1,
                 flip: bool = False, check_turned: bool = True, spine_rule: Mapping[str, float] = SPINE_FROM_RULE,
                 extent_rule: Mapping[str, float] = EXTENT_RULE, view: ViewScorer | None = None) -> None:
        self.device = torch.device(device)
        self.view = view
        self.net = net.to(self.device).eval()
        self.input_size = int(input_size)
        self.views = check_views(views)
        if not isinstance(flip, bool):
            raise ValueError(f"landmark flip = {flip!r}: must be true or false")
        self.flip = flip
        self.check_turned = bool(check_turned)
        self.spine_rule = check_spine_rule(spine_rule)
        self.extent_points = bool(getattr(net, "extent_points", False))
        self.extent_rule = check_extent_rule(extent_rule) if self.extent_points else {}

    @torch.inference_mode()
    def detect_views(self, images: Sequence[np.ndarray | Pyramid]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw network output per view: points (N, V, P, 2) in source pixels (P = 16, then the
        extent points if the net has them; V = ``views``, then as many mirrored views when
        ``flip``), the plain view's confidence (N, 16) and the turned input's median confidence
        over the 16 (N,) (NaN unless checked)."""
        n, v, s = len(images), self.views, self.input_size
        if n == 0:
            p = NUM_LANDMARKS + (len(EXTENT_POINTS) if self.extent_points else 0)
            return np.zeros((0, v * (2 if self.flip else 1), p, 2)), np.zeros((0, NUM_LANDMARKS)), np.zeros(0)
        pyramids = [im if isinstance(im, Pyramid) else Pyramid(im) for im in images]
        boxes = [view_boxes(*p.base.shape, v) for p in pyramids]
        crops = [landmark_input(p, s, b)[0] for p, bs in zip(pyramids, boxes) for b in bs]
        x = torch.from_numpy(normalise_crop(np.stack(crops)))[:, None].to(self.device)
        parts = [x]
        if self.flip:  # every view mirrored left to right, after the plain ones
            parts.append(torch.flip(x, dims=(-1,)))
        if self.check_turned:  # the plain views turned by 180 degrees, after all the others
            parts.append(torch.flip(x[::v], dims=(-2, -1)))
        logits = self.net(torch.cat(parts) if len(parts) > 1 else x)
        xy, conf, _ = soft_argmax(logits)
        stride = s / logits.shape[-1]
        # heatmap pixel k covers input pixels [k*stride, (k+1)*stride): centre at k*stride + (stride-1)/2
        crop_xy = xy.cpu().double().numpy() * stride + (stride - 1) / 2.0
        conf_np = conf.cpu().double().numpy()[:, :NUM_LANDMARKS]
        nv = n * v
        per_view = [crop_xy[:nv].reshape(n, v, -1, 2)]
        if self.flip:
            # A mirrored crop's column c is the plain crop's s - 1 - c, and its "right" clavicle
            # is the patient's left one: flip the points back, then swap the twins.
            mirrored = crop_xy[nv : 2 * nv][:, mirror_order(crop_xy.shape[1])]
            mirrored[..., 0] = (s - 1) - mirrored[..., 0]
            per_view.append(mirrored.reshape(n, v, -1, 2))
        crop_views = np.concatenate(per_view, axis=1)
        points = np.stack([
            np.stack([bs[j % v].crop_to_source(crop_views[i, j], s) for j in range(crop_views.shape[1])])
            for i, bs in enumerate(boxes)
        ])
        plain_conf = conf_np[:nv:v]
        turned_at = nv * (2 if self.flip else 1)
        turned = np.median(conf_np[turned_at:], axis=1) if self.check_turned else np.full(n, np.nan)
        return points, plain_conf, turned

    def detect(self, images: Sequence[np.ndarray | Pyramid]) -> list[Landmarks]:
        """Detect landmarks on display-normalised grey images (values in [0, 1])."""
        if not images:
            return []
        pyramids = [im if isinstance(im, Pyramid) else Pyramid(im) for im in images]  # one per film, for both nets
        points, conf, turned = self.detect_views(pyramids)
        median = np.median(points, axis=1)
        extent = median[:, NUM_LANDMARKS:] if self.extent_points else None
        combined = apply_spine_rule(median[:, :NUM_LANDMARKS], self.spine_rule, extent, self.extent_rule)
        views = self.view.classify(pyramids) if self.view is not None else [None] * len(images)
        return [Landmarks(points=p, confidence=c, turned_confidence=float(t), view=s)
                for p, c, t, s in zip(combined, conf, turned, views)]
