"""Small helpers shared by the training tools: image loading, seeding, checkpoints."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["load_grey_png", "seed_everything", "save_checkpoint", "load_checkpoint", "check_resumable"]

#: Settings that may differ between a run and its resumption (they change no learned state).
RESUMABLE_CHANGES = {"epochs", "threads", "out_dir", "jsrt_root", "landmarks_from", "manifest"}


def load_grey_png(path: str | Path) -> np.ndarray:
    """An 8- or 16-bit grey PNG as float32 display values in [0, 1]."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=-1)
    top = 65535.0 if arr.dtype == np.uint16 else 255.0
    return (arr.astype(np.float32) / top).clip(0.0, 1.0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write atomically, so an interrupted run never leaves a half-written checkpoint to resume."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def check_resumable(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume with other settings: the saved optimizer and schedule would silently
    override them, and the result would match neither run."""
    changed = sorted(k for k in set(saved) | set(current) if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ValueError(f"cannot --resume with changed settings ({detail}); use the original settings or a new --out")
