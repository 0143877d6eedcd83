"""A one-page PDF report, wrapped as a DICOM Encapsulated PDF in the source's study.

For the PACS, the viewer and the EHR that open PDFs but nothing else we write. The page
carries the patient and study identifiers, the results table, the ROI picture, the method and
its limits, the model identity and, for a demo model, a red banner. It is written directly:
the PDF standard fonts (Helvetica, Courier; every reader has them) and the ROI picture as a
JPEG; the PDF carries no creation date of its own, so the same result gives the same bytes and
the DICOM object is reproducible like the SR.
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


_PAGE = (595.28, 841.89)  # A4 in points
#: The PDF standard fonts (every reader has them; nothing to embed), WinAnsi-encoded.
_FONTS = {"F1": "Helvetica", "F2": "Helvetica-Bold", "F3": "Courier"}


class _Page:
    """One page of text, filled rectangles and one JPEG picture, as PDF content operators.

    Positions are fractions of the page from the bottom left (as the layout below was drawn
    with matplotlib before); ``top`` puts the text's top, not its baseline, at ``y``."""

    def __init__(self) -> None:
        self.ops: list[str] = []

    def text(self, x: float, y: float, value: str, size: float, *, font: str = "F1",
             color: tuple[float, float, float] = (0, 0, 0), center: bool = False, leading: float = 1.2) -> None:
        w, h = _PAGE
        lines = value.split("\n")
        px = x * w - (_width(lines[0], size, font) / 2 if center else 0.0)
        py = y * h - size * (0.36 if center else 0.76)  # baseline: middle or top of the first line
        self.ops.append(f"{color[0]:.3f} {color[1]:.3f} {color[2]:.3f} rg BT /{font} {size:g} Tf "
                        f"{size * leading:.2f} TL {px:.2f} {py:.2f} Td")
        for n, line in enumerate(lines):
            self.ops.append(("T* " if n else "") + f"({_pdf_string(line)}) Tj")
        self.ops.append("ET")

    def rect(self, x: float, y: float, width: float, height: float, color: tuple[float, float, float]) -> None:
        w, h = _PAGE
        self.ops.append(f"{color[0]:.3f} {color[1]:.3f} {color[2]:.3f} rg {x * w:.2f} {y * h:.2f} "
                        f"{width * w:.2f} {height * h:.2f} re f")

    def image(self, x: float, y: float, width: float, height: float) -> None:
        w, h = _PAGE
        self.ops.append(f"q {width * w:.2f} 0 0 {height * h:.2f} {x * w:.2f} {y * h:.2f} cm /Im1 Do Q")


def _width(text: str, size: float, font: str) -> float:
    """Rough advance width (points) for centring: Courier exactly, Helvetica on average."""
    return len(text) * size * (0.6 if font == "F3" else 0.61 if font == "F2" else 0.55)


def _pdf_string(text: str) -> str:
    """A PDF literal string in WinAnsi (cp1252): Latin names print as themselves; characters
    outside it as "?" (the fonts have no glyphs for them anyway)."""
    out = []
    for byte in text.encode("cp1252", errors="replace"):
        char = chr(byte)
        if char in "\\()":
            out.append("\\" + char)
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return "".join(out)


def _pdf_text(text: str) -> str:
    """A PDF text string for the Info dictionary (ASCII)."""
    return _pdf_string(text.encode("ascii", errors="replace").decode("ascii"))


def _document(page: _Page, jpeg: bytes, size: tuple[int, int]) -> bytes:
    """The file: catalog, pages, page, content, fonts, the picture, info; no dates, so the same
    page gives the same bytes."""
    content = "\n".join(page.ops).encode("latin-1")
    fonts = " ".join(f"/{key} {5 + i} 0 R" for i, key in enumerate(_FONTS))
    image_id = 5 + len(_FONTS)
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {_PAGE[0]} {_PAGE[1]}] /Contents 4 0 R "
         f"/Resources << /Font << {fonts} >> /XObject << /Im1 {image_id} 0 R >> >> >>").encode(),
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        *[f"<< /Type /Font /Subtype /Type1 /BaseFont /{name} /Encoding /WinAnsiEncoding >>".encode()
          for name in _FONTS.values()],
        (f"<< /Type /XObject /Subtype /Image /Width {size[0]} /Height {size[1]} /ColorSpace /DeviceRGB "
         f"/BitsPerComponent 8 /Filter /DCTDecode /Length {len(jpeg)} >>\nstream\n").encode() + jpeg + b"\nendstream",
        (f"<< /Title ({_pdf_text(DOCUMENT_TITLE)}) /Creator ({_pdf_text(MANUFACTURER)}) "
         f"/Producer ({_pdf_text(MANUFACTURER)}) >>").encode(),
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R /Info %d 0 R >>\nstartxref\n%d\n%%%%EOF\n"
              % (len(objects) + 1, len(objects), xref))
    return out.getvalue()


GREY = (0.267, 0.267, 0.267)


def render_pdf(header: Dataset, estimate: BmdEstimate, pixels: np.ndarray, now: datetime.datetime) -> bytes:
    """The report page as PDF bytes.

    Written directly (a few hundred bytes of operators and the picture as a JPEG): drawing the
    page with matplotlib took about 0.4 s an image, as long as the rest of the report."""
    algo = estimate.algorithm
    page = _Page()
    top = 0.965
    if estimate.demo:
        page.rect(0, 0.935, 1, 0.065, (0.784, 0.0, 0.0))
        page.text(0.5, 0.967, DEMO_PREFIX, 17, font="F2", color=(1, 1, 1), center=True)
        top = 0.915
    page.text(0.06, top, DOCUMENT_TITLE, 16, font="F2")
    page.text(0.06, top - 0.03, "Software estimate from a frontal chest radiograph - not a DXA measurement",
              9.5, color=GREY)
    y = top - 0.065
    for label, value in _identifiers(header):
        page.text(0.06, y, label, 9, color=GREY)
        page.text(0.22, y, _fit(value), 9)
        y -= 0.018

    # results table (left) and the picture (right)
    table_top = y - 0.015
    page.text(0.06, table_top, "Results", 12, font="F2")
    ty = table_top - 0.03
    for x, head in ((0.06, "Site"), (0.19, "BMD (g/cm2)"), (0.34, "T-score")):
        page.text(x, ty, head, 10, font="F2")
    for row in result_rows(estimate):
        ty -= 0.022
        for x, cell in ((0.06, row.site), (0.19, row.bmd_text), (0.34, row.tscore_text)):
            page.text(x, ty, cell, 10, font="F3")
    ty -= 0.035
    page.text(0.06, ty, "WHO category (L1-L4)", 10, color=GREY)
    page.text(0.06, ty - 0.02, category_text(estimate), 13, font="F2")
    if estimate.tscores.tscore is None and estimate.tscores.reason:
        page.text(0.06, ty - 0.05, textwrap.fill(estimate.tscores.reason, 48), 8)

    film = render_film(pixels, estimate, max_side=900)[0].convert("RGB")
    w, h = film.size
    box_w, box_h = 0.46, 0.36
    aspect = (w / h) * (A4_INCHES[1] / A4_INCHES[0])  # page-fraction width per unit height
    pic_h = min(box_h, box_w / aspect)
    pic_w = pic_h * aspect
    page.image(0.48 + (box_w - pic_w) / 2, table_top - pic_h, pic_w, pic_h)
    jpeg = io.BytesIO()
    film.save(jpeg, format="JPEG", quality=90)
    y = min(ty - 0.1, table_top - pic_h - 0.03)

    body = [METHOD, LIMITS] + statements(estimate)[1:]  # the first statement is the heading above
    for paragraph in body:
        wrapped = textwrap.fill(paragraph, 105)
        page.text(0.06, y, wrapped, 8.3, leading=1.35)
        y -= 0.0155 * (wrapped.count("\n") + 1) + 0.012
    page.text(0.06, max(y, 0.09), textwrap.fill(
        f"Model: {algo.name} {algo.version} (model id {algo.model_id}). Software: {MANUFACTURER} "
        f"{screener.__version__}.", 105), 8, color=GREY)
    page.text(0.06, 0.035, f"Generated {now.strftime('%Y-%m-%d %H:%M')} by {MANUFACTURER}. "
              "Derived report: not for primary diagnosis.", 7.5, color=GREY)
    return _document(page, jpeg.getvalue(), (w, h))


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
