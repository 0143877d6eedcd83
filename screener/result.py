"""The job result document: what the pipeline concluded about one image, as stored.

One versioned schema, written by :meth:`JobResult.to_json` and read by
:meth:`JobResult.from_json`, nowhere else: the worker stores it in ``jobs.result_json`` and
with the job's audit event, the audit queries and the administrators' SQL views (migration
0004) read the same fields. Version 2::

    {"version": 2,
     "status": "reported" | "ineligible" | "error",          JobStatus
     "code": "eligible" | "<reason code>",                    screener.codes.ReasonCode
     "reason": "a sentence for a person",
     "sop_instance_uid": "<source>", "file": "<spool path>",
     "outputs": {"sr": {"path": ..., "sop_instance_uid": ...}, "gsps": ..., "image": ..., "pdf": ...},
     "seconds": {"decode": ..., "total": ...},
     "result": null | {"model_id", "demo", "demo_statement", "precision" (the BMD network's
                       fp32 | bf16 | fp16; absent in results from before it was recorded),
                       "bmd_g_cm2": {"L1".."L4", "L1-L4"},
                       "tscore": {...} | null, "who_category": str | null, "tscore_note",
                       "coordinates", "landmarks_xy", "landmark_confidence", "roi_corners_xy"}}

Version 1 (no ``version`` key: outputs a list of paths, codes partly in snake_case, fields
inside ``result`` or at the top level) is converted by migration 0004 and not read here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from screener.codes import ReasonCode

__all__ = ["JobResult", "JobStatus", "Measurement", "ObjectKind", "OutputObject", "RESULT_VERSION", "SITES",
           "ResultDocumentError"]

RESULT_VERSION = 2
SITES = ("L1", "L2", "L3", "L4", "L1-L4")
COORDINATES = ("source pixels, x = column, y = row, centre of the top-left pixel at (0, 0) "
               "(the SR's SCOORD puts it at (0.5, 0.5))")


class ObjectKind(StrEnum):
    """The report objects made per image; each may be delivered (one outbox row each)."""

    SR = "sr"
    GSPS = "gsps"
    IMAGE = "image"  # the Secondary Capture result image
    PDF = "pdf"  # the Encapsulated PDF report


class JobStatus(StrEnum):
    REPORTED = "reported"
    INELIGIBLE = "ineligible"
    ERROR = "error"


class ResultDocumentError(ValueError):
    """A stored document that is not a version-2 job result."""


@dataclass(frozen=True)
class OutputObject:
    """One written report object: where it lies and the SOP Instance UID it carries."""

    path: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Measurement:
    """The numbers of a reported job (``result`` in the document)."""

    model_id: str
    demo: bool
    bmd_g_cm2: Mapping[str, float]
    tscore: Mapping[str, float] | None
    who_category: str | None
    tscore_note: str
    landmarks_xy: tuple[tuple[float, float], ...] = ()
    landmark_confidence: tuple[float, ...] = ()
    roi_corners_xy: Mapping[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    demo_statement: str | None = None
    precision: str | None = None  # None: a result stored before the precision was recorded

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model_id": self.model_id, "demo": self.demo, "bmd_g_cm2": dict(self.bmd_g_cm2),
            "tscore": dict(self.tscore) if self.tscore is not None else None,
            "who_category": self.who_category, "tscore_note": self.tscore_note, "coordinates": COORDINATES,
            "landmarks_xy": [list(p) for p in self.landmarks_xy],
            "landmark_confidence": list(self.landmark_confidence),
            "roi_corners_xy": {name: [list(p) for p in corners] for name, corners in self.roi_corners_xy.items()},
        }
        if self.demo_statement is not None:
            d["demo_statement"] = self.demo_statement
        if self.precision is not None:
            d["precision"] = self.precision
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Measurement:
        tscore = d.get("tscore")
        return cls(
            model_id=str(d["model_id"]), demo=bool(d["demo"]),
            bmd_g_cm2={k: float(v) for k, v in d["bmd_g_cm2"].items()},
            tscore={k: float(v) for k, v in tscore.items()} if isinstance(tscore, Mapping) else None,
            who_category=d.get("who_category"), tscore_note=str(d.get("tscore_note", "")),
            landmarks_xy=tuple(tuple(p) for p in d.get("landmarks_xy", ())),
            landmark_confidence=tuple(d.get("landmark_confidence", ())),
            roi_corners_xy={k: tuple(tuple(p) for p in v) for k, v in d.get("roi_corners_xy", {}).items()},
            demo_statement=d.get("demo_statement"),
            precision=d.get("precision"),
        )


@dataclass(frozen=True)
class JobResult:
    status: JobStatus
    code: ReasonCode
    reason: str
    sop_instance_uid: str = ""
    file: str = ""
    outputs: Mapping[ObjectKind, OutputObject] = field(default_factory=dict)
    seconds: Mapping[str, float] = field(default_factory=dict)
    measurement: Measurement | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", JobStatus(self.status))
        object.__setattr__(self, "code", ReasonCode(self.code))
        object.__setattr__(self, "outputs", {ObjectKind(k): v for k, v in self.outputs.items()})

    @property
    def retryable(self) -> bool:
        """A failure that may pass on a later attempt (our bug, a full disk); every other error
        is about the image itself and final."""
        return self.status is JobStatus.ERROR and self.code in (ReasonCode.INTERNAL_ERROR, ReasonCode.OUTPUT_FAILED)

    def output(self, kind: ObjectKind | str) -> OutputObject | None:
        return self.outputs.get(ObjectKind(kind))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RESULT_VERSION, "status": self.status.value, "code": self.code.value, "reason": self.reason,
            "sop_instance_uid": self.sop_instance_uid, "file": self.file,
            "outputs": {k.value: {"path": o.path, "sop_instance_uid": o.sop_instance_uid}
                        for k, o in self.outputs.items()},
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "result": self.measurement.to_json() if self.measurement is not None else None,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> JobResult:
        if not isinstance(d, Mapping) or d.get("version") != RESULT_VERSION:
            version = d.get("version") if isinstance(d, Mapping) else type(d).__name__
            raise ResultDocumentError(f"result_json: version {version!r}, expected {RESULT_VERSION} "
                                      "(run the migrations: screener serve does at start)")
        try:
            return cls(
                status=JobStatus(d["status"]), code=ReasonCode(d["code"]), reason=str(d["reason"]),
                sop_instance_uid=str(d.get("sop_instance_uid", "")), file=str(d.get("file", "")),
                outputs={ObjectKind(k): OutputObject(str(o["path"]), str(o["sop_instance_uid"]))
                         for k, o in d.get("outputs", {}).items()},
                seconds={k: float(v) for k, v in d.get("seconds", {}).items()},
                measurement=Measurement.from_json(d["result"]) if d.get("result") else None,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ResultDocumentError(f"result_json: not a version-{RESULT_VERSION} job result ({error})") from error
