"""Copies of real films, each its own SOP instance: the node deduplicates by SOP Instance UID,
so a test or bench that sends a film n times needs n UIDs. Imports nothing but pydicom (the
GPU bench runs it on a machine without pytest)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom


def renumbered_copies(sources: Sequence[Path], folder: Path, n: int, uid_root: str, *, first: int = 0) -> list[Path]:
    """``n`` copies cycling through ``sources`` (their transfer syntaxes kept), written to
    ``folder/film<i>.dcm``, copy i with SOP Instance UID ``uid_root.<i>`` in the dataset and the
    file meta alike; ``first`` numbers on from an earlier call."""
    folder.mkdir(parents=True, exist_ok=True)
    datasets = [pydicom.dcmread(s) for s in sources]
    paths = []
    for i in range(first, first + n):
        ds = datasets[i % len(datasets)]
        ds.SOPInstanceUID = f"{uid_root}.{i}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        paths.append(folder / f"film{i:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths
