"""`screener process`: the whole pipeline on files, writing the report objects and a JSON result.

decode -> header eligibility -> landmarks -> image eligibility -> ROIs -> BMD -> T-score ->
SR, GSPS, result image and PDF. Images are decoded by a small thread pool and pushed through
the networks in batches. Every input ends with exactly one :class:`Outcome` (reported,
ineligible or error) and one JSON file; nothing about one file can stop the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from pydicom.dataset import Dataset

from screener.pipeline.bundle import ModelBundle
from screener.pipeline.decode import DEFAULT_LIMITS, DecodedImage, DecodeError, DecodeLimits, decode_dataset, read_dataset
from screener.pipeline.eligibility import EligibilityRules, check_header, check_image, check_landmarks
from screener.pipeline.estimate import BmdEstimate, BmdEstimator
from screener.pipeline.geometry import Pyramid

__all__ = ["Outcome", "Processor", "find_inputs", "OUTPUT_SUFFIXES", "REQUIRED_KINDS"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: File name ending of each report object, by kind (the outbox's DeliveryKind values): SR, GSPS,
#: result image (Secondary Capture), PDF (Encapsulated PDF).
OUTPUT_SUFFIXES: dict[str, str] = {"sr": ".sr.dcm", "gsps": ".gsps.dcm", "image": ".sc.dcm", "pdf": ".pdf.dcm"}
#: The SR and the GSPS are the result; without them nothing is reported. The pictures are
#: extra views of it: one that cannot be made is left out (and said), the result still goes.
REQUIRED_KINDS = ("sr", "gsps")


@dataclass(frozen=True)
class Outcome:
    file: Path
    status: str  # "reported", "ineligible" or "error"
    code: str  # stable reason code ("eligible" when reported)
    reason: str
    sop_instance_uid: str = ""
    estimate: BmdEstimate | None = None
    outputs: tuple[Path, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        d: dict = {
            "file": str(self.file), "status": self.status, "code": self.code, "reason": self.reason,
            "sop_instance_uid": self.sop_instance_uid, "outputs": [str(p) for p in self.outputs],
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
        }
        est = self.estimate
        if est is not None:
            t = est.tscores
            d["result"] = {
                "model_id": est.model_id, "demo": est.demo, "bmd_g_cm2": t.bmd, "tscore": t.tscore,
                "coordinates": "source pixels, x = column, y = row, centre of the top-left pixel at (0, 0) "
                               "(the SR's SCOORD puts it at (0.5, 0.5))",
                "who_category": t.category.value if t.category else None, "tscore_note": t.reason,
                "landmarks_xy": est.landmarks.points.round(2).tolist(),
                "landmark_confidence": est.landmarks.confidence.round(3).tolist(),
                "roi_corners_xy": {n: c.round(2).tolist() for n, c in zip(est.rois.names, est.rois.corners)},
            }
            if est.demo:
                d["result"]["demo_statement"] = est.algorithm.demo_statement
        return d


@dataclass
class _Item:
    path: Path
    t0: float
    seconds: dict[str, float]
    dataset: Dataset | None = None
    image: DecodedImage | None = None
    outcome: Outcome | None = None  # set as soon as the item is finished


def output_stem(sop_instance_uid: str, path: Path) -> str:
    """Output names from the SOP Instance UID when it is a valid UID (so they cannot escape the
    output folder or collide across input folders), else from the sanitised file name."""
    if sop_instance_uid and len(sop_instance_uid) <= 64 and _UID.match(sop_instance_uid):
        return sop_instance_uid
    # Two folders may hold files of the same name: a hash of the full path keeps them apart.
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', path.name)[:80]}-{digest}"


def find_inputs(paths: Iterable[Path], exclude: Path | None = None) -> list[Path]:
    """Files as given; folders searched recursively, skipping hidden files and folders and
    anything under ``exclude`` (the output folder); each file once, in a stable order."""
    skip = exclude.resolve() if exclude is not None else None
    found: dict[Path, Path] = {}
    for p in paths:
        if p.is_dir():
            candidates = sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            candidates = [p]
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
        for f in candidates:
            resolved = f.resolve()
            if skip is not None and resolved.is_relative_to(skip):
                continue
            found.setdefault(resolved, f)
    return list(found.values())


class Processor:
    def __init__(
        self,
        bundle: ModelBundle,
        out_dir: Path,
        *,
        device: str = "cpu",
        batch_size: int = 8,
        decode_workers: int = 2,
        rules: EligibilityRules = EligibilityRules(),
        limits: DecodeLimits = DEFAULT_LIMITS,
        previews: bool = False,
        kinds: tuple[str, ...] = tuple(OUTPUT_SUFFIXES),
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        unknown = set(kinds) - set(OUTPUT_SUFFIXES)
        if unknown:
            raise ValueError(f"kinds: unknown report object kinds {sorted(unknown)}; known: {list(OUTPUT_SUFFIXES)}")
        # what to build: what some destination takes (the SR and GSPS always)
        self.kinds = tuple(k for k in OUTPUT_SUFFIXES if k in kinds or k in REQUIRED_KINDS)
        self.previews = previews
        self.estimator = BmdEstimator(bundle, device)
        self.out_dir = out_dir
        self.batch_size = batch_size
        self.decode_workers = decode_workers
        self.rules = rules
        self.limits = limits

    def run(self, files: list[Path]) -> Iterator[Outcome]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=max(1, self.decode_workers)) as pool:
            for start in range(0, len(files), self.batch_size):
                items = list(pool.map(self._read, files[start : start + self.batch_size]))
                yield from self._finish_batch(items)

    # -- stages ---------------------------------------------------------------------------------

    def _read(self, path: Path) -> _Item:
        item = _Item(path=path, t0=time.perf_counter(), seconds={})
        t = time.perf_counter()
        uid = ""
        try:
            ds = read_dataset(path, self.limits)
            item.dataset = ds
            uid = str(ds.get("SOPInstanceUID", ""))
            header = check_header(ds, self.rules)
            if not header.eligible:
                item.outcome = self._done(item, "ineligible", header.code, header.reason, uid)
                return item
            item.image = decode_dataset(ds, self.limits)
        except DecodeError as exc:
            item.outcome = self._done(item, "error", exc.code, str(exc), uid)
        except Exception as exc:  # anything unforeseen: this file fails, the others go on
            item.outcome = self._done(item, "error", "internal-error", f"{type(exc).__name__}: {exc}", uid)
        item.seconds["decode"] = time.perf_counter() - t
        return item

    def _finish_batch(self, items: list[_Item]) -> Iterator[Outcome]:
        live = [i for i in items if i.outcome is None]
        try:
            self._estimate(live)
        except Exception:
            # One image broke the batch (a shape, a NaN, memory): redo them one at a time so only
            # that image fails, with its own error, and the rest of the batch is reported.
            for item in live:
                if item.outcome is None:
                    try:
                        self._estimate([item])
                    except Exception as exc:
                        item.outcome = self._done(item, "error", "internal-error", f"{type(exc).__name__}: {exc}",
                                                  item.image.sop_instance_uid if item.image else "")
        for item in items:
            assert item.outcome is not None
            try:
                self._write_json(item.outcome)
            except OSError as exc:
                item.outcome = self._done(item, "error", "output-failed", f"could not write the result: {exc}")
            yield item.outcome

    def _estimate(self, live: list[_Item]) -> None:
        """Landmarks, image eligibility, BMD and report for decoded items (sets their outcome)."""
        if not live:
            return
        t = time.perf_counter()
        pyramids = [Pyramid(i.image.pixels) for i in live]  # type: ignore[union-attr]
        found = self.estimator.detect(pyramids)
        per = (time.perf_counter() - t) / len(live)
        eligible = []
        for item, pyr, lm in zip(live, pyramids, found):
            item.seconds["landmarks"] = per
            assert item.image is not None
            decision = check_landmarks(lm, item.image.shape, self.rules)
            if decision.eligible:
                decision = check_image(item.image.pixels, lm, self.rules)
            if decision.eligible:
                eligible.append((item, pyr, lm))
            else:
                item.outcome = self._done(item, "ineligible", decision.code, decision.reason, item.image.sop_instance_uid)
        if not eligible:
            return
        t = time.perf_counter()
        estimates = self.estimator.estimate(
            [p for _, p, _ in eligible], [i.image.patient_sex for i, _, _ in eligible],  # type: ignore[union-attr]
            landmarks=[lm for _, _, lm in eligible],
        )
        per = (time.perf_counter() - t) / len(eligible)
        for (item, _, _), est in zip(eligible, estimates):
            item.seconds["model"] = per
            item.outcome = self._report(item, est)

    def _report(self, item: _Item, est: BmdEstimate) -> Outcome:
        from screener.report.overlay import build_gsps
        from screener.report.pdf import build_pdf
        from screener.report.result_image import build_result_image
        from screener.report.sr import build_sr

        assert item.dataset is not None and item.image is not None
        uid, ds, pixels = item.image.sop_instance_uid, item.dataset, item.image.pixels
        t = time.perf_counter()
        builders = {"sr": lambda: build_sr(ds, est), "gsps": lambda: build_gsps(ds, est),
                    "image": lambda: build_result_image(ds, est, pixels), "pdf": lambda: build_pdf(ds, est, pixels)}
        objects: dict[str, Dataset] = {}
        left_out: list[str] = []
        for kind in self.kinds:
            try:
                objects[kind] = builders[kind]()
            except Exception as exc:  # a source header an object cannot carry: say so, keep going
                if kind in REQUIRED_KINDS:
                    return self._done(item, "error", "report-failed", f"could not build the {kind}: {exc}", uid, est)
                left_out.append(f"{kind} not built ({type(exc).__name__}: {exc})")
        stem = output_stem(uid, item.path)
        outputs = tuple(self.out_dir / f"{stem}{OUTPUT_SUFFIXES[kind]}" for kind in objects)
        try:
            for obj, path in zip(objects.values(), outputs):
                _atomic_write(path, lambda tmp, obj=obj: obj.save_as(tmp, enforce_file_format=True))
            if self.previews:  # the GSPS read back and drawn, as a viewer would show it
                from screener.report.preview import render_gsps

                png = self.out_dir / f"{stem}.gsps.png"
                _atomic_write(png, lambda tmp: render_gsps(pixels, objects["gsps"], tmp))
                outputs += (png,)
        except Exception as exc:
            return self._done(item, "error", "output-failed", f"could not write the report: {exc}", uid, est)
        item.seconds["report"] = time.perf_counter() - t
        reason = "estimated" + (f"; {'; '.join(left_out)}"[:900] if left_out else "")
        return self._done(item, "reported", "eligible", reason, uid, est, outputs)

    # -- bookkeeping ----------------------------------------------------------------------------

    def _done(self, item: _Item, status: str, code: str, reason: str, uid: str = "",
              est: BmdEstimate | None = None, outputs: tuple[Path, ...] = ()) -> Outcome:
        seconds = dict(item.seconds)
        seconds["total"] = time.perf_counter() - item.t0
        return Outcome(item.path, status, code, reason, uid, est, outputs, seconds)

    def _write_json(self, outcome: Outcome) -> None:
        stem = output_stem(outcome.sop_instance_uid, outcome.file)
        text = json.dumps(outcome.to_json(), indent=2) + "\n"
        _atomic_write(self.out_dir / f"{stem}.json", lambda tmp: Path(tmp).write_text(text))


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary name and rename: a reader (or a router watching the folder)
    never sees a half-written SR, and a crash leaves the old file or none."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
