"""What test-time views cost: the landmark detector's time per film for each setting, with the
bundle's detector, on real films (the accuracy each buys is the cross-validation's,
`screener-train landmarks cv`, README "Landmark accuracy").

    python bench/landmark_views.py [FILES...] [--settings 1 1+flip 5 5+flip] [--repeats 5] [--threads 2]

A setting is a view count (1..15) with "+flip" for each view also run mirrored. Each is the
whole detect() of the node: the plain views, the mirrored ones, the turned-by-180 view for the
gate and the view classifier, called with one film at a time (the node passes its batch, up to
[model] batch_size films, in one call: per film it is then a little cheaper). Settings are
timed in turns within each repeat (so a noisy machine slows all of them alike); the median per
film is reported, with the ratio to the first.
Default input: the pydicom-data Philips CR (RG1_UNCR, 1955 x 1841), decoded once beforehand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from screener.pipeline.bundle import ModelBundle
from screener.pipeline.decode import decode_file
from screener.pipeline.geometry import Pyramid
from screener.pipeline.landmarks import LandmarkDetector


def parse_setting(text: str) -> tuple[int, bool]:
    views, _, flip = text.partition("+")
    if flip not in ("", "flip") or not views.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: a view count, optionally with +flip (1, 5+flip)")
    return int(views), flip == "flip"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--settings", nargs="+", type=parse_setting, default=[(1, False), (1, True), (5, False), (5, True)])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.files:
        from pydicom.data import get_testdata_file

        a.files = [Path(get_testdata_file("RG1_UNCR.dcm"))]
    bundle = ModelBundle.load()
    base = bundle.detector()
    detectors = {f"{v}{'+flip' if f else ''}": LandmarkDetector(
        base.net, base.input_size, views=v, flip=f, spine_rule=base.spine_rule, extent_rule=base.extent_rule,
        view=base.view) for v, f in a.settings}
    films = [decode_file(p).pixels for p in a.files]
    seconds: dict[str, list[float]] = {name: [] for name in detectors}
    for repeat in range(a.repeats + 1):  # the first round warms up
        for name, detector in detectors.items():
            for pixels in films:
                pyramid = Pyramid(pixels)  # as the node: one pyramid per film, built outside the detector
                t0 = time.perf_counter()
                detector.detect([pyramid])
                if repeat:
                    seconds[name].append(time.perf_counter() - t0)
    first = next(iter(detectors))
    rows = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"{len(films)} film(s), {a.repeats} repeats, {torch.get_num_threads()} threads; median seconds per film")
    print(f"{'setting':<10}{'s/film':>9}{'x ' + first:>12}")
    for name, s in rows.items():
        print(f"{name:<10}{s:>9.3f}{s / rows[first]:>12.2f}")
    if a.json:
        a.json.write_text(json.dumps({"threads": torch.get_num_threads(), "files": [str(p) for p in a.files],
                                      "seconds_per_film": rows}, indent=2))


if __name__ == "__main__":
    main()
