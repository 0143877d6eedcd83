"""Helpers shared by many tests: ports, polling, processes, real DICOM files, synthetic contours."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]  # the repository
SHARED = ROOT.parent / "shared" / "data"


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], object], timeout_s: float = 60.0, every_s: float = 0.2) -> object:
    """Poll ``check`` until it returns something truthy (returned), else fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")


def process_running(pid: int) -> bool:
    """Whether ``pid`` runs (from /proc): a zombie has exited, only its parent's wait is missing."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def rg1_file(name: str = "RG1_UNCR.dcm") -> Path:
    """A real Philips CR chest radiograph from pydicom-data (RG1 in several transfer syntaxes)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        raise RuntimeError(f"pydicom-data does not provide {name}: install the [dev] extra")
    return Path(path)


def synthetic_contours(shift: tuple[float, float] = (0.0, 0.0)) -> dict[str, np.ndarray]:
    """JSRT-like contours with known geometry in a 512 x 512 frame (image-left = patient right)."""
    dx, dy = shift

    def rect(x0, y0, x1, y1):
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float) + [dx, dy]

    # Clavicles: thin bars, medial ends near the midline x = 256.
    rcla = np.array([[120, 80], [236, 100], [236, 108], [120, 88]], float) + [dx, dy]
    lcla = np.array([[276, 100], [392, 80], [392, 88], [276, 108]], float) + [dx, dy]
    return {"RL": rect(100, 60, 220, 420), "LL": rect(292, 50, 412, 440), "H": rect(230, 250, 330, 400),
            "RCLA": rcla, "LCLA": lcla}


def edit_dataset(ds, **changes: object):
    """Set each keyword to its value on ``ds``; a value of None deletes the attribute."""
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def synthetic_film(heart: bool = False) -> np.ndarray:
    """A 512 x 512 display-value film matching synthetic_contours(): bright body and spine,
    dark lungs; ``heart`` adds a heart shadow beside the spine on the image's right."""
    contours = synthetic_contours()
    img = np.full((512, 512), 0.8, np.float32)
    for key in ("RL", "LL"):
        (x0, y0), (x1, y1) = contours[key].min(axis=0), contours[key].max(axis=0)
        img[int(y0) : int(y1), int(x0) : int(x1)] = 0.25
    img[:, 240:272] = 0.95  # spine
    if heart:
        (x0, y0), (x1, y1) = contours["LL"].min(axis=0), contours["LL"].max(axis=0)
        img[int((y0 + y1) / 2) : int(y1), int(x0) : int(x0 + (x1 - x0) / 2)] = 0.7
    return img
