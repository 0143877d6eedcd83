"""`screener process`: the whole pipeline on files, writing the report objects and a JSON result.

decode -> header eligibility -> landmarks -> image eligibility -> ROIs -> BMD -> T-score ->
SR, GSPS, result image and PDF. Images are decoded by a small thread pool and pushed through
the networks in batches. Every input ends with exactly one :class:`Outcome` (reported,
ineligible or error) and one JSON file; nothing about one file can stop the others.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from pydicom.dataset import Dataset

from screener.codes import ReasonCode
from screener.durable import write_atomically
from screener.result import JobResult, JobStatus, Measurement, ObjectKind, OutputObject
from screener.safe_text import scrub

from screener.pipeline.bundle import ModelBundle
from screener.pipeline.decode import DEFAULT_LIMITS, DecodedImage, DecodeError, DecodeLimits, decode_dataset, read_dataset
from screener.pipeline.eligibility import EligibilityRules, check_film, check_header
from screener.pipeline.estimate import BmdEstimate, BmdEstimator, Inference
from screener.pipeline.geometry import Pyramid

__all__ = ["Outcome", "Processor", "find_inputs", "OUTPUT_SUFFIXES", "REQUIRED_KINDS"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: File name ending of each report object, by kind: SR, GSPS, result image (Secondary
#: Capture), PDF (Encapsulated PDF). The name before it is the object's own SOP Instance UID,
#: which differs per source image and model version, so two model versions never overwrite
#: each other's objects while a delivery still points at one.
OUTPUT_SUFFIXES: dict[ObjectKind, str] = {ObjectKind.SR: ".sr.dcm", ObjectKind.GSPS: ".gsps.dcm",
                                          ObjectKind.IMAGE: ".sc.dcm", ObjectKind.PDF: ".pdf.dcm"}
#: The SR and the GSPS are the result; without them nothing is reported. The pictures are
#: extra views of it: one that cannot be made is left out (and said), the result still goes.
REQUIRED_KINDS = (ObjectKind.SR, ObjectKind.GSPS)


@dataclass(frozen=True)
class Outcome:
    """What became of one input file: the stored :class:`~screener.result.JobResult` plus the
    in-memory estimate (for callers that print or test it)."""

    file: Path
    status: JobStatus
    code: ReasonCode
    reason: str
    sop_instance_uid: str = ""
    estimate: BmdEstimate | None = None
    outputs: Mapping[ObjectKind, OutputObject] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def result(self) -> JobResult:
        """The document the node stores (screener.result: one schema, one reader)."""
        return JobResult(status=self.status, code=self.code, reason=self.reason,
                         sop_instance_uid=self.sop_instance_uid, file=str(self.file), outputs=self.outputs,
                         seconds=self.seconds, measurement=_measurement(self.estimate))

    def to_json(self) -> dict[str, Any]:
        return self.result().to_json()


def _measurement(est: BmdEstimate | None) -> Measurement | None:
    if est is None:
        return None
    t = est.tscores
    return Measurement(
        model_id=est.model_id, demo=est.demo, bmd_g_cm2=dict(t.bmd), tscore=dict(t.tscore) if t.tscore else None,
        who_category=t.category.value if t.category else None, tscore_note=t.reason,
        landmarks_xy=tuple(tuple(p) for p in est.landmarks.points.round(2).tolist()),
        landmark_confidence=tuple(est.landmarks.confidence.round(3).tolist()),
        roi_corners_xy={n: tuple(tuple(p) for p in c.round(2).tolist()) for n, c in zip(est.rois.names, est.rois.corners)},
        demo_statement=est.algorithm.demo_statement if est.demo else None,
        precision=est.algorithm.precision,
    )


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
        kinds: Iterable[ObjectKind | str] = tuple(OUTPUT_SUFFIXES),
        write_json: bool = True,
        inference: Inference = Inference(),
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        kinds = tuple(kinds)
        unknown = {str(k) for k in kinds} - {str(k) for k in OUTPUT_SUFFIXES}
        if unknown:
            raise ValueError(f"kinds: unknown report object kinds {sorted(unknown)}; known: {list(OUTPUT_SUFFIXES)}")
        # what to build: what some destination takes (the SR and GSPS always)
        self.kinds = tuple(k for k in OUTPUT_SUFFIXES if k in kinds or k in REQUIRED_KINDS)  # StrEnum == str
        self.previews = previews
        self.write_json = write_json  # the node stores the document in its database instead
        self.estimator = BmdEstimator(bundle, device, inference)
        self.out_dir = out_dir
        self.batch_size = batch_size
        self.decode_workers = decode_workers
        self.rules = rules
        self.limits = limits

    def run(self, files: list[Path]) -> Iterator[Outcome]:
        """Outcomes in the order of ``files``. The next batch is read and decoded by the thread
        pool while this one is in the networks and the report (codecs and torch release the
        GIL), so at most two batches of decoded images are held at once."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        batches = [files[start : start + self.batch_size] for start in range(0, len(files), self.batch_size)]
        pool = ThreadPoolExecutor(max_workers=max(1, self.decode_workers))
        pending = []
        try:
            pending = [pool.submit(self._read, f) for f in batches[0]] if batches else []
            for index in range(len(batches)):
                items = [future.result() for future in pending]
                for item in items:  # an image's time starts when its batch is taken, not while it waited
                    item.t0 = time.perf_counter() - item.seconds.get("decode", 0.0)
                pending = [pool.submit(self._read, f) for f in batches[index + 1]] if index + 1 < len(batches) else []
                yield from self._finish_batch(items)
        finally:
            # Closed early (Ctrl-C, an error, a caller that stops reading): the next batch's
            # reads that have not started (all that is ever queued) are dropped instead of
            # decoded for nobody; a read already running is waited for.
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)

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
                item.outcome = self._done(item, JobStatus.INELIGIBLE, header.code, header.reason, uid)
                return item
            item.image = decode_dataset(ds, self.limits)
        except DecodeError as exc:
            item.outcome = self._done(item, JobStatus.ERROR, exc.code, str(exc), uid)
        except Exception as exc:  # anything unforeseen: this file fails, the others go on
            item.outcome = self._done(item, JobStatus.ERROR, ReasonCode.INTERNAL_ERROR, f"{type(exc).__name__}: {scrub(exc)}", uid)
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
                        item.outcome = self._done(item, JobStatus.ERROR, ReasonCode.INTERNAL_ERROR, f"{type(exc).__name__}: {scrub(exc)}",
                                                  item.image.sop_instance_uid if item.image else "")
        for item in items:
            assert item.outcome is not None
            try:
                if self.write_json:
                    self._write_json(item.outcome)
            except OSError as exc:
                item.outcome = self._done(item, JobStatus.ERROR, ReasonCode.OUTPUT_FAILED, f"could not write the result: {scrub(exc)}")
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
            decision = check_film(item.image.pixels, lm, self.rules)
            if decision.eligible:
                eligible.append((item, pyr, lm))
            else:
                item.outcome = self._done(item, JobStatus.INELIGIBLE, decision.code, decision.reason, item.image.sop_instance_uid)
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
        builders = {ObjectKind.SR: lambda: build_sr(ds, est), ObjectKind.GSPS: lambda: build_gsps(ds, est),
                    ObjectKind.IMAGE: lambda: build_result_image(ds, est, pixels),
                    ObjectKind.PDF: lambda: build_pdf(ds, est, pixels)}
        objects: dict[ObjectKind, Dataset] = {}
        left_out: list[str] = []
        for kind in self.kinds:
            try:
                objects[kind] = builders[kind]()
            except Exception as exc:  # a source header an object cannot carry: say so, keep going
                if kind in REQUIRED_KINDS:
                    return self._done(item, JobStatus.ERROR, ReasonCode.REPORT_FAILED,
                                      f"could not build the {kind}: {type(exc).__name__}: {scrub(exc)}", uid, est)
                left_out.append(f"{kind} not built ({type(exc).__name__}: {scrub(exc)})")
        outputs: dict[ObjectKind, OutputObject] = {}
        try:
            for kind, obj in objects.items():
                path = self.out_dir / f"{obj.SOPInstanceUID}{OUTPUT_SUFFIXES[kind]}"
                write_atomically(path, lambda fh, obj=obj: obj.save_as(fh, enforce_file_format=True))
                outputs[kind] = OutputObject(str(path), str(obj.SOPInstanceUID))
            if self.previews:  # the GSPS read back and drawn, as a viewer would show it
                from screener.report.preview import render_gsps

                gsps = objects[ObjectKind.GSPS]
                png = self.out_dir / f"{gsps.SOPInstanceUID}.gsps.png"
                write_atomically(png, lambda fh: render_gsps(pixels, gsps, fh))
        except Exception as exc:
            return self._done(item, JobStatus.ERROR, ReasonCode.OUTPUT_FAILED,
                              f"could not write the report: {type(exc).__name__}: {scrub(exc)}", uid, est)
        item.seconds["report"] = time.perf_counter() - t
        reason = "estimated" + (f"; {'; '.join(left_out)}"[:900] if left_out else "")
        return self._done(item, JobStatus.REPORTED, ReasonCode.ELIGIBLE, reason, uid, est, outputs)

    # -- bookkeeping ----------------------------------------------------------------------------

    def _done(self, item: _Item, status: JobStatus, code: ReasonCode, reason: str, uid: str = "",
              est: BmdEstimate | None = None, outputs: Mapping[ObjectKind, OutputObject] | None = None) -> Outcome:
        seconds = dict(item.seconds)
        seconds["total"] = time.perf_counter() - item.t0
        return Outcome(item.path, status, code, reason, uid, est, dict(outputs or {}), seconds)

    def _write_json(self, outcome: Outcome) -> None:
        stem = output_stem(outcome.sop_instance_uid, outcome.file)
        text = json.dumps(outcome.to_json(), indent=2) + "\n"
        write_atomically(self.out_dir / f"{stem}.json", lambda fh: fh.write(text.encode()))
