"""Stable reason codes: one spelling (lower-case, hyphenated) for every refusal and failure.

They are what administrators filter the audit on (``screener audit failures``, the
``v_failures`` view, ``events.reason_code``) and what a monitoring rule matches, so a code
never changes meaning and is never reworded; a new situation gets a new member. The sentence
beside a code (``reason``, ``message``) is for a person and may change.

This module imports nothing from the rest of the package: every stage may use it.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ReasonCode"]


class ReasonCode(StrEnum):
    # -- a job that ran to the end
    ELIGIBLE = "eligible"

    # -- header eligibility (screener.pipeline.eligibility.check_header)
    SOP_CLASS_MISSING = "sop-class-missing"
    OWN_OUTPUT = "own-output"
    SOP_CLASS_NOT_IMAGE = "sop-class-not-image"
    SECONDARY_CAPTURE = "secondary-capture"
    SOP_CLASS_NOT_SCREENED = "sop-class-not-screened"
    MODALITY_MISSING = "modality-missing"
    MODALITY = "modality"
    BODY_PART_MISSING = "body-part-missing"
    BODY_PART = "body-part"
    VIEW_MISSING = "view-missing"
    VIEW_NOT_FRONTAL = "view-not-frontal"
    SECONDARY_IMAGE = "secondary-image"
    DERIVED_IMAGE = "derived-image"
    IMAGE_TYPE = "image-type"
    AGE_MISSING = "age-missing"
    AGE_BELOW_MINIMUM = "age-below-minimum"

    # -- landmark and image eligibility (check_landmarks, check_image, check_view)
    LANDMARKS_NOT_FINITE = "landmarks-not-finite"
    LOW_LANDMARK_CONFIDENCE = "low-landmark-confidence"
    UPSIDE_DOWN = "upside-down"
    ROI_LANDMARKS_UNSURE = "roi-landmarks-unsure"
    LANDMARKS_COLLAPSED = "landmarks-collapsed"
    SIDES_SWAPPED = "sides-swapped"
    SPINE_UPSIDE_DOWN = "spine-upside-down"
    RIBCAGE_ORDER = "ribcage-order"
    CLAVICLES_BELOW_RIBS = "clavicles-below-ribs"
    THORAX_WIDTH = "thorax-width"
    THORAX_ASPECT = "thorax-aspect"
    SPINE_TILTED = "spine-tilted"
    ROI_GEOMETRY = "roi-geometry"
    ROI_OUTSIDE_IMAGE = "roi-outside-image"
    IMAGE_SHAPE = "image-shape"
    LUNG_FIELDS_OUTSIDE_IMAGE = "lung-fields-outside-image"
    INVERTED = "inverted"
    NO_MEDIASTINUM = "no-mediastinum"
    HEART_ON_IMAGE_LEFT = "heart-on-image-left"
    MIRRORED = "mirrored"
    NOT_FRONTAL_CHEST = "not-frontal-chest"

    # -- decoding (screener.pipeline.decode.DecodeError)
    UNREADABLE_FILE = "unreadable-file"
    NOT_DICOM = "not-dicom"
    BAD_SIZE = "bad-size"
    NO_PIXEL_DATA = "no-pixel-data"
    MULTI_FRAME = "multi-frame"
    COLOUR = "colour"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported-transfer-syntax"
    INCONSISTENT_ATTRIBUTES = "inconsistent-attributes"
    CORRUPT_PIXEL_DATA = "corrupt-pixel-data"

    # -- running the pipeline and writing its objects (screener.process)
    INTERNAL_ERROR = "internal-error"
    OUTPUT_FAILED = "output-failed"
    REPORT_FAILED = "report-failed"
    BATCH_FAILED = "batch-failed"
    LEASE_EXPIRED = "lease-expired"

    # -- C-STORE refusals and drops (screener.node.receive)
    ROUTING_LOOP = "routing-loop"
    TOO_LARGE = "too-large"
    INFLATES_TOO_LARGE = "inflates-too-large"
    SPOOL_FULL = "spool-full"
    SPOOL_WRITE = "spool-write"
    UNDECODABLE = "undecodable"
    UID_MISMATCH = "uid-mismatch"
    INVALID_SOP_INSTANCE_UID = "invalid-sop-instance-uid"
    INVALID_STUDY_INSTANCE_UID = "invalid-study-instance-uid"
    INVALID_SERIES_INSTANCE_UID = "invalid-series-instance-uid"
    DATABASE_UNAVAILABLE = "database-unavailable"
    # refusals pynetdicom makes before a handler of ours runs
    INVALID_COMMAND = "invalid-command"
    UNKNOWN_PRESENTATION_CONTEXT = "unknown-presentation-context"
    PROTOCOL_ERROR = "protocol-error"
    NO_PRESENTATION_CONTEXT = "no-presentation-context"

    # -- associations and connections (PS3.8 9.3.4 diagnostics, and our own limits)
    NO_REASON_GIVEN = "no-reason-given"
    APPLICATION_CONTEXT_NOT_SUPPORTED = "application-context-not-supported"
    CALLING_AE_NOT_RECOGNISED = "calling-ae-not-recognised"
    CALLED_AE_NOT_RECOGNISED = "called-ae-not-recognised"
    PROTOCOL_VERSION_NOT_SUPPORTED = "protocol-version-not-supported"
    TEMPORARY_CONGESTION = "temporary-congestion"
    LOCAL_LIMIT_EXCEEDED = "local-limit-exceeded"
    PEER_NOT_ALLOWED = "peer-not-allowed"
    PEER_LIMIT_EXCEEDED = "peer-limit-exceeded"
    CONNECTION_LIMIT_EXCEEDED = "connection-limit-exceeded"
    ASSOCIATION_TIMEOUT = "association-timeout"
    TLS_HANDSHAKE_FAILED = "tls-handshake-failed"

    # -- housekeeping (retention)
    RETENTION = "retention"
    ORPHAN_FILE = "orphan-file"

    # -- dispatch
    DESTINATION_UNREACHABLE = "destination-unreachable"
    DELIVERY_FAILED = "delivery-failed"
    OBJECT_MISSING = "object-missing"

    # -- backfill (screener.backfill): why a study of the archive was not retrieved, or failed
    BACKFILL_OUT_OF_AGE_BAND = "out-of-age-band"
    BACKFILL_NO_CHEST_SERIES = "no-chest-series"
    BACKFILL_ALREADY_SCREENED = "already-screened"
    BACKFILL_QUERY_FAILED = "query-failed"
    BACKFILL_MOVE_FAILED = "move-failed"
