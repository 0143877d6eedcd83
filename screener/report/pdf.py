"""A one-page PDF report, wrapped as a DICOM Encapsulated PDF in the source's study.

For the PACS, the viewer and the EHR that open PDFs but nothing else we write. The page
carries the patient and study identifiers, the results table, the ROI picture, the method and
its limits, the model identity and, for a demo model, a red banner. matplotlib draws it (it is
a dependency already and embeds its own fonts); the PDF carries no creation date of its own,
so the same result gives the same bytes and the DICOM object is reproducible like the SR.
"""

from __future__ import annotations

import datetime
import io
import textwrap

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian

import screener
from screener.pipeline.estimate import BmdEstimate
from screener.report.common import new_instance, source_reference
from screener.report.result_image import render_film
from screener.report.sr import MANUFACTURER, report_uids, source_header
from screener.report.text import DEMO_PREFIX, category_text, result_rows, statements

__all__ = ["PDF_SERIES_NUMBER", "DOCUMENT_TITLE", "render_pdf", "build_pdf"]

PDF_SERIES_NUMBER = 9904
DOCUMENT_TITLE = "Lumbar BMD estimate from chest radiograph"
A4_INCHES = (8.27, 11.69)

METHOD = (
    "Method: 16 anatomical landmarks are found on the frontal chest radiograph; six local bone "
    "regions (both clavicles, cervical spine, both sides of the rib cage, T12) and the whole image "
    "are cut from them and read by one shared-backbone multi-ROI network, which estimates lumbar "
    "spine (L1-L4) bone mineral density (after Wang et al., opportunistic osteoporosis screening "
    "from chest X-ray). T-scores use a sex-specific young-adult reference; the WHO category is "
    "that of the L1-L4 T-score (normal T >= -1.0, osteopenia -2.5 < T < -1.0, osteoporosis "
    "T <= -2.5)."
)
LIMITS = (
    "Limits: an estimate from a radiograph, not a DXA measurement; it can be wrong for an "
    "individual patient (positioning, implants, scoliosis, vertebral fractures and image "
    "processing all affect it). A result suggesting low bone density should be confirmed by DXA "
    "before treatment decisions. The regions drawn on the picture are where the software looked."
)


def _person(value: object) -> str:
    """FAMILY, Given Middle (prefix, suffix): the alphabetic group, else the ideographic, else the
    phonetic one. (DejaVu has no CJK glyphs: such a name prints as boxes.)"""
    text = str(value or "").strip()
    if not text:
        return "-"
    groups = (text.split("=") + ["", ""])[:3]
    group = next((g for g in groups if g.strip("^ ")), "")
    parts = (group.split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    name = ", ".join(p for p in (family, " ".join(p for p in (given, middle) if p)) if p)
    extra = " ".join(p for p in (prefix, suffix) if p)
    return f"{name} ({extra})" if extra else (name or "-")


def _fit(text: str, limit: int = 70) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _date(value: object) -> str:
    text = str(value or "").strip()
    try:
        return datetime.datetime.strptime(text, "%Y%m%d").date().isoformat()
    except ValueError:
        return text or "-"


def _identifiers(header: Dataset) -> list[tuple[str, str]]:
    return [
        ("Patient", _person(header.get("PatientName"))),
        ("Patient ID", str(header.get("PatientID") or "-")),
        ("Birth date", _date(header.get("PatientBirthDate"))),
        ("Sex", str(header.get("PatientSex") or "-")),
        ("Accession", str(header.get("AccessionNumber") or "-")),
        ("Study date", _date(header.get("StudyDate"))),
        ("Study", str(header.get("StudyDescription") or "-")),
        ("Source image", f"{header.get('Modality', '')} {header.SOPInstanceUID}".strip()),
    ]


def render_pdf(header: Dataset, estimate: BmdEstimate, pixels: np.ndarray, now: datetime.datetime) -> bytes:
    """The report page as PDF bytes."""
    from matplotlib.backends.backend_pdf import FigureCanvasPdf
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    algo = estimate.algorithm
    fig = Figure(figsize=A4_INCHES)
    FigureCanvasPdf(fig)

    def text(x: float, y: float, value: str, **kwargs: object) -> None:
        # header text is data: a "$" in a study description must not start TeX math (it raises)
        fig.text(x, y, value, parse_math=False, **kwargs)  # type: ignore[arg-type]

    top = 0.965
    if estimate.demo:
        fig.patches.append(Rectangle((0, 0.935), 1, 0.065, transform=fig.transFigure,
                                     facecolor="#c80000", edgecolor="none"))
        text(0.5, 0.967, DEMO_PREFIX, ha="center", va="center", color="white", fontsize=17, weight="bold")
        top = 0.915
    text(0.06, top, DOCUMENT_TITLE, fontsize=16, weight="bold", va="top")
    text(0.06, top - 0.03, "Software estimate from a frontal chest radiograph - not a DXA measurement",
             fontsize=9.5, va="top", color="#444444")
    y = top - 0.065
    for label, value in _identifiers(header):
        text(0.06, y, label, fontsize=9, va="top", color="#444444")
        text(0.22, y, _fit(value), fontsize=9, va="top")
        y -= 0.018

    # results table (left) and the picture (right)
    table_top = y - 0.015
    text(0.06, table_top, "Results", fontsize=12, weight="bold", va="top")
    ty = table_top - 0.03
    for x, head in ((0.06, "Site"), (0.19, "BMD (g/cm2)"), (0.34, "T-score")):
        text(x, ty, head, fontsize=10, weight="bold", va="top")
    for row in result_rows(estimate):
        ty -= 0.022
        text(0.06, ty, row.site, fontsize=10, va="top", family="DejaVu Sans Mono")
        text(0.19, ty, row.bmd_text, fontsize=10, va="top", family="DejaVu Sans Mono")
        text(0.34, ty, row.tscore_text, fontsize=10, va="top", family="DejaVu Sans Mono")
    ty -= 0.035
    text(0.06, ty, "WHO category (L1-L4)", fontsize=10, va="top", color="#444444")
    text(0.06, ty - 0.02, category_text(estimate), fontsize=13, weight="bold", va="top")
    if estimate.tscores.tscore is None and estimate.tscores.reason:
        text(0.06, ty - 0.05, textwrap.fill(estimate.tscores.reason, 48), fontsize=8, va="top")

    film = np.asarray(render_film(pixels, estimate, max_side=900)[0])
    h, w = film.shape[:2]
    box_w, box_h = 0.46, 0.36
    aspect = (w / h) * (A4_INCHES[1] / A4_INCHES[0])  # figure-fraction width per unit height
    pic_h = min(box_h, box_w / aspect)
    pic_w = pic_h * aspect
    ax = fig.add_axes((0.48 + (box_w - pic_w) / 2, table_top - pic_h, pic_w, pic_h))
    ax.imshow(film, interpolation="antialiased")
    ax.set_axis_off()
    y = min(ty - 0.1, table_top - pic_h - 0.03)

    body = [METHOD, LIMITS] + statements(estimate)[1:]  # the first statement is the heading above
    for paragraph in body:
        wrapped = textwrap.fill(paragraph, 105)
        text(0.06, y, wrapped, fontsize=8.3, va="top", linespacing=1.35)
        y -= 0.0155 * (wrapped.count("\n") + 1) + 0.012
    text(0.06, max(y, 0.09), textwrap.fill(
        f"Model: {algo.name} {algo.version} (model id {algo.model_id}). Software: {MANUFACTURER} "
        f"{screener.__version__}.", 105), fontsize=8, va="top", color="#444444")
    text(0.06, 0.035, f"Generated {now.strftime('%Y-%m-%d %H:%M')} by {MANUFACTURER}. "
             "Derived report: not for primary diagnosis.", fontsize=7.5, color="#444444")
    out = io.BytesIO()
    # No CreationDate: identical results give identical bytes (deterministic objects).
    fig.savefig(out, format="pdf", metadata={"CreationDate": None, "Creator": MANUFACTURER,
                                             "Producer": MANUFACTURER, "Title": DOCUMENT_TITLE})
    return out.getvalue()


def build_pdf(
    source: Dataset,
    estimate: BmdEstimate,
    pixels: np.ndarray,
    *,
    institution_name: str | None = None,
    now: datetime.datetime | None = None,
) -> Dataset:
    """The Encapsulated PDF Storage instance for ``estimate`` on ``source``."""
    now = now if now is not None else datetime.datetime.now().astimezone()
    header = source_header(source)
    uids = report_uids(header.SOPInstanceUID, estimate.model_id)
    document = render_pdf(header, estimate, pixels, now)
    length = len(document)
    if length % 2:
        document += b"\x00"  # OB values have even length; PS3.3 A.45.1 allows one pad byte

    ds = new_instance(header, estimate, sop_class_uid=EncapsulatedPDFStorage, sop_instance_uid=uids.pdf_instance_uid,
                      series_instance_uid=uids.pdf_series_uid, series_number=PDF_SERIES_NUMBER,
                      series_description="BMD report PDF", modality="DOC",
                      transfer_syntax_uid=ExplicitVRLittleEndian, now=now, institution_name=institution_name)
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.DocumentTitle = DOCUMENT_TITLE + (" (DEMO)" if estimate.demo else "")
    ds.ConceptNameCodeSequence = []
    ds.SourceInstanceSequence = [source_reference(header)]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = document
    ds.EncapsulatedDocumentLength = length  # without the pad byte
    return ds
