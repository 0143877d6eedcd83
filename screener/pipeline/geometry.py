"""Oriented square boxes and resampling from source pixels.

Every crop the pipeline makes (the landmark detector's letterboxed input, each ROI, the
whole-image ROI) is one :class:`OrientedBox` sampled by :func:`sample_box`. Keeping a single
mapping between crop pixels and source pixels is what lets points found in a crop be reported
exactly in the source image's pixel coordinates.

Coordinates are (x, y) = (column, row) in source pixels with the centre of the top-left pixel
at (0, 0). (The SR's SCOORD convention puts that centre at (0.5, 0.5); the report converts.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["OrientedBox", "sample_box", "letterbox_box", "Pyramid"]


@dataclass(frozen=True)
class OrientedBox:
    """A square in source pixel space, possibly rotated and mirrored.

    ``ex`` is the source-space direction of increasing crop column and ``ey`` of increasing
    crop row; both are unit vectors. A box whose (ex, ey) has negative determinant mirrors
    the content, which is how left-side ROIs are made to look like right-side ones.
    """

    center: tuple[float, float]
    ex: tuple[float, float]
    ey: tuple[float, float]
    side: float

    def __post_init__(self) -> None:
        if not np.isfinite(self.side) or self.side <= 0:
            raise ValueError(f"OrientedBox side must be positive and finite, got {self.side}")
        for name in ("ex", "ey"):
            n = float(np.hypot(*getattr(self, name)))
            if abs(n - 1.0) > 1e-6:
                raise ValueError(f"OrientedBox.{name} must be a unit vector, has length {n}")

    @property
    def mirrored(self) -> bool:
        return self.ex[0] * self.ey[1] - self.ex[1] * self.ey[0] < 0

    def to_source(self, uv: np.ndarray) -> np.ndarray:
        """Map normalised crop coordinates (u, v) in [-0.5, 0.5] to source (x, y)."""
        uv = np.asarray(uv, dtype=np.float64)
        c = np.asarray(self.center, dtype=np.float64)
        basis = np.stack([np.asarray(self.ex), np.asarray(self.ey)])  # rows: ex, ey
        return c + self.side * (uv @ basis)

    def from_source(self, xy: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_source` (ex, ey are orthonormal)."""
        d = np.asarray(xy, dtype=np.float64) - np.asarray(self.center, dtype=np.float64)
        basis = np.stack([np.asarray(self.ex), np.asarray(self.ey)])
        return (d @ basis.T) / self.side

    def corners(self) -> np.ndarray:
        """Source (x, y) of the crop's corners: top-left, top-right, bottom-right, bottom-left."""
        uv = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
        return self.to_source(uv)

    def crop_to_source(self, ij: np.ndarray, size: int) -> np.ndarray:
        """Map crop pixel coordinates (col, row) of a ``size`` crop to source (x, y)."""
        uv = (np.asarray(ij, dtype=np.float64) + 0.5) / size - 0.5
        return self.to_source(uv)

    def source_to_crop(self, xy: np.ndarray, size: int) -> np.ndarray:
        return (self.from_source(xy) + 0.5) * size - 0.5


def letterbox_box(height: int, width: int) -> OrientedBox:
    """The axis-aligned square that holds the whole image, centred (pads the short side)."""
    return OrientedBox(
        center=((width - 1) / 2.0, (height - 1) / 2.0),
        ex=(1.0, 0.0),
        ey=(0.0, 1.0),
        side=float(max(height, width)),
    )


class Pyramid:
    """Box-filtered copies of one image at integer reductions, built on demand.

    Bilinear sampling of a box much larger than the crop aliases; sampling from a copy reduced
    by about the same factor keeps the crop faithful to what a radiologist would see. Copies
    are cached because the seven ROIs of one image share them.
    """

    def __init__(self, image: np.ndarray) -> None:
        if image.ndim != 2:
            raise ValueError(f"expected a 2-D grey image, got shape {image.shape}")
        self._levels: dict[int, np.ndarray] = {1: np.ascontiguousarray(image, dtype=np.float32)}

    @property
    def base(self) -> np.ndarray:
        return self._levels[1]

    def level(self, factor: int) -> np.ndarray:
        """The image box-averaged over ``factor`` x ``factor`` blocks: level pixel k covers base
        pixels [k*f, (k+1)*f) on both axes. A partial last block is padded by edge replication
        rather than dropped, so every base pixel stays inside the level."""
        factor = max(1, int(factor))
        if factor not in self._levels:
            img = self._levels[1]
            h, w = img.shape
            padded = np.pad(img, ((0, -h % factor), (0, -w % factor)), mode="edge") if h % factor or w % factor else img
            hp, wp = padded.shape
            reduced = padded.reshape(hp // factor, factor, wp // factor, factor).mean(axis=(1, 3))
            self._levels[factor] = reduced.astype(np.float32)
        return self._levels[factor]


def sample_box(
    source: np.ndarray | Pyramid, box: OrientedBox, size: int, fill: float = 0.0
) -> np.ndarray:
    """Resample ``box`` from ``source`` into a ``size`` x ``size`` float32 crop (bilinear).

    Points outside the source take ``fill``.
    """
    pyramid = source if isinstance(source, Pyramid) else Pyramid(source)
    factor = max(1, int(np.floor(box.side / size)))
    img = pyramid.level(factor)
    scale = float(factor)  # exact on both axes: level pixel k covers base [k*f, (k+1)*f)
    idx = np.arange(size, dtype=np.float64)
    jj, ii = np.meshgrid(idx, idx)  # jj: column, ii: row
    xy = box.crop_to_source(np.stack([jj.ravel(), ii.ravel()], axis=1), size)
    # A reduced level's pixel k covers base pixels [k*f, (k+1)*f): its centre is at k*f + (f-1)/2.
    x = (xy[:, 0] - (scale - 1) / 2.0) / scale
    y = (xy[:, 1] - (scale - 1) / 2.0) / scale
    out = ndimage.map_coordinates(img, [y, x], order=1, mode="constant", cval=fill, prefilter=False)
    return out.reshape(size, size).astype(np.float32)
