"""PNG previews for people checking results by eye.

:func:`render_gsps` draws a presentation state's own graphics (ROI outlines, landmark circles,
text) onto the decoded image, so the picture shows what a viewer will show, read back from
the DICOM object.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset


__all__ = ["render_gsps"]

OUTLINE = (255, 200, 0)
POINT = (255, 60, 60)


def _draw(pixels: np.ndarray, polylines: list[np.ndarray], circles: list[tuple[np.ndarray, float]], text: str,
          path: str | Path, max_side: int) -> Path:
    """Draw on a copy downsized to ``max_side``; coordinates are source pixels, centre of the
    top-left pixel at (0, 0)."""
    h, w = pixels.shape
    scale = min(1.0, max_side / max(h, w))
    img = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)).convert("RGB")
    if scale < 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(img)

    def px(xy: np.ndarray) -> list[tuple[float, float]]:
        return [((x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5) for x, y in np.asarray(xy, float)]

    for line in polylines:
        draw.line(px(line), fill=OUTLINE, width=2)
    for centre, radius in circles:
        (x, y), r = px(centre[None])[0], max(2.0, radius * scale)
        draw.ellipse([x - r, y - r, x + r, y + r], outline=POINT, width=2)
    draw.rectangle([0, 0, img.width, 16], fill=(0, 0, 0))
    draw.text((4, 2), text, fill=(255, 255, 255))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")  # explicit: callers may write through a temporary name
    return path


def render_gsps(pixels: np.ndarray, gsps: Dataset, path: str | Path, max_side: int = 1024) -> Path:
    """Draw every POLYLINE, CIRCLE and text object of a GSPS (PIXEL units) onto ``pixels``."""
    lines, circles, texts = [], [], []
    for annotation in gsps.get("GraphicAnnotationSequence", []):
        for obj in annotation.get("GraphicObjectSequence", []):
            if obj.GraphicAnnotationUnits != "PIXEL":
                continue
            pts = np.asarray(obj.GraphicData, float).reshape(-1, 2) - 0.5  # DICOM puts pixel centres at +0.5
            if obj.GraphicType == "POLYLINE":
                lines.append(pts)
            elif obj.GraphicType == "CIRCLE":
                circles.append((pts[0], float(np.hypot(*(pts[1] - pts[0])))))
        texts += [str(t.UnformattedTextValue) for t in annotation.get("TextObjectSequence", [])]
    return _draw(pixels, lines, circles, " | ".join(texts), path, max_side)
