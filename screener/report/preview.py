"""A PNG preview of one result: the radiograph with ROI outlines, landmarks and a summary line.

For people checking the pipeline by eye (``screener predict --png``); viewers get the same
drawing as a DICOM presentation state from :mod:`screener.report.overlay`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from screener.pipeline.estimate import BmdEstimate

__all__ = ["render_preview"]

ROI_COLOURS = {
    "left_clavicle": (255, 80, 80),
    "right_clavicle": (255, 160, 60),
    "cervical_spine": (80, 200, 255),
    "left_ribcage": (120, 255, 120),
    "right_ribcage": (200, 255, 80),
    "t12": (200, 120, 255),
    "whole_image": (160, 160, 160),
}


def render_preview(pixels: np.ndarray, estimate: BmdEstimate, path: str | Path, max_side: int = 1024) -> Path:
    """Draw on a downsized copy (longest side ``max_side``) and save as PNG."""
    h, w = pixels.shape
    scale = min(1.0, max_side / max(h, w))
    img = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)).convert("RGB")
    if scale < 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(img)

    def to_px(xy: np.ndarray) -> list[tuple[float, float]]:
        # source pixel centres are at integers; the resized image's at (k + 0.5) / scale - 0.5
        return [((x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5) for x, y in xy]

    for name, corners in zip(estimate.rois.names, estimate.rois.corners):
        if name == "whole_image":
            continue
        pts = to_px(corners)
        draw.line(pts + pts[:1], fill=ROI_COLOURS[name], width=2)
    r = max(2.0, 4 * scale * max(h, w) / 1024)
    for (x, y), conf in zip(to_px(estimate.landmarks.points), estimate.landmarks.confidence):
        colour = (255, 255, 0) if conf >= 0.5 else (255, 0, 0)
        draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=2)
    t = estimate.tscores
    text = f"L1-L4 BMD {t.bmd['L1-L4']:.3f} g/cm2"
    if t.tscore:
        text += f"  T {t.tscore['L1-L4']:.1f}  {t.category.value if t.category else ''}"
    if estimate.demo:
        text += "  [DEMO MODEL - NOT FOR CLINICAL USE]"
    draw.rectangle([0, 0, img.width, 16], fill=(0, 0, 0))
    draw.text((4, 2), text, fill=(255, 255, 255))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
