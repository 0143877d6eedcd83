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
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from screener.pipeline.geometry import OrientedBox, Pyramid, letterbox_box, sample_box

__all__ = [
    "LANDMARK_SCHEME",
    "LANDMARK_NAMES",
    "NUM_LANDMARKS",
    "Landmarks",
    "LandmarkNet",
    "LandmarkDetector",
    "landmark_input",
    "soft_argmax",
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


@dataclass(frozen=True)
class Landmarks:
    """Detected points in the source image's pixel coordinates (x = column, y = row)."""

    points: np.ndarray  # (16, 2) float64
    confidence: np.ndarray  # (16,) float64 in [0, 1]

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
    """ResNet-18 trunk (to stride 16) + FPN-style decoder to stride-4 heatmaps."""

    def __init__(self, num_landmarks: int = NUM_LANDMARKS, width: int = 96) -> None:
        super().__init__()
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


def stretch_contrast(crop: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map the crop's [low, high] percentiles (NaN = outside the image, ignored) to [0, 1].

    Radiographs reach us with every contrast a vendor's processing gives them; a per-input
    stretch makes JSRT film scans and modern DX look alike to the detector. Outside = 0.
    """
    inside = crop[np.isfinite(crop)]
    if inside.size == 0:
        return np.zeros_like(crop)
    # A regular subsample of ~250k pixels gives the same percentiles to well under a grey
    # level at a fraction of the cost on a 3000 x 3000 film.
    lo, hi = np.percentile(inside[:: max(1, inside.size // 250_000)], [low, high])
    out = (crop - lo) / max(hi - lo, 1e-6)
    return np.nan_to_num(np.clip(out, 0.0, 1.0), nan=0.0).astype(np.float32)


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
    """Runs a trained :class:`LandmarkNet` on whole images, batched, on CPU or GPU."""

    def __init__(self, net: LandmarkNet, input_size: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.input_size = int(input_size)

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray | Pyramid]) -> list[Landmarks]:
        """Detect landmarks on display-normalised grey images (values in [0, 1])."""
        if not images:
            return []
        crops, boxes = zip(*(landmark_input(im, self.input_size) for im in images))
        x = torch.from_numpy(normalise_crop(np.stack(crops)))[:, None].to(self.device)
        logits = self.net(x)
        xy, conf, _ = soft_argmax(logits)
        stride = self.input_size / logits.shape[-1]
        # heatmap pixel k covers input pixels [k*stride, (k+1)*stride): centre at k*stride + (stride-1)/2
        crop_xy = xy.cpu().double().numpy() * stride + (stride - 1) / 2.0
        out = []
        for box, pts, c in zip(boxes, crop_xy, conf.cpu().double().numpy()):
            out.append(Landmarks(points=box.crop_to_source(pts, self.input_size), confidence=c))
        return out
