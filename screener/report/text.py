"""What every result object says in words: one source for the SR, GSPS, result image and PDF.

A reader must get the same numbers, the same labels and the same caveats whichever object
their viewer happens to show, so the wording lives here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from screener.pipeline.estimate import BmdEstimate
from screener.pipeline.tscore import SITES

__all__ = [
    "ESTIMATE_STATEMENT",
    "DEMO_PREFIX",
    "NOT_FOR_DIAGNOSIS",
    "ROI_LABELS",
    "ROI_SHORT_LABELS",
    "ResultRow",
    "result_rows",
    "summary_text",
    "statements",
    "category_text",
]

ESTIMATE_STATEMENT = (
    "The values in this report (lumbar bone mineral density and, where given, T-scores and WHO "
    "category) are estimated by software ({name} {version}) from a frontal chest radiograph. "
    "They are not a DXA measurement."
)
DEMO_PREFIX = "DEMO MODEL - NOT FOR CLINICAL USE."
NOT_FOR_DIAGNOSIS = "Derived image: not for primary diagnosis"

#: How a reader names each local ROI (patient's left and right), in every object.
ROI_LABELS: dict[str, str] = {
    "left_clavicle": "Left clavicle ROI",
    "right_clavicle": "Right clavicle ROI",
    "cervical_spine": "Cervical spine ROI",
    "left_ribcage": "Left rib cage ROI",
    "right_ribcage": "Right rib cage ROI",
    "t12": "T12 vertebra ROI",
}
#: The same, short enough to stand beside a box on the image.
ROI_SHORT_LABELS: dict[str, str] = {
    "left_clavicle": "L clavicle",
    "right_clavicle": "R clavicle",
    "cervical_spine": "C spine",
    "left_ribcage": "L rib cage",
    "right_ribcage": "R rib cage",
    "t12": "T12",
}
@dataclass(frozen=True)
class ResultRow:
    """One line of the results table: a lumbar site, its BMD and (sex known) its T-score."""

    site: str
    bmd_g_cm2: float
    tscore: float | None

    @property
    def bmd_text(self) -> str:
        return f"{self.bmd_g_cm2:.3f}"

    @property
    def tscore_text(self) -> str:
        # two decimals, as stored in the SR: one decimal could show -2.5 beside "osteopenia"
        return "-" if self.tscore is None else f"{self.tscore:.2f}"


def result_rows(estimate: BmdEstimate) -> list[ResultRow]:
    t = estimate.tscores
    return [ResultRow(site, float(t.bmd[site]), None if t.tscore is None else float(t.tscore[site]))
            for site in SITES]


def category_text(estimate: BmdEstimate) -> str:
    """The WHO category of the L1-L4 T-score, or why there is none."""
    category = estimate.tscores.category
    return category.value.capitalize() if category is not None else "None (patient sex unknown)"


def summary_text(estimate: BmdEstimate) -> str:
    """One line for people: L1-L4 BMD, T-score and category, and how it was obtained."""
    t = estimate.tscores
    text = f"L1-L4 BMD {t.bmd['L1-L4']:.3f} g/cm2"
    if t.tscore is not None and t.category is not None:
        text += f", T {t.tscore['L1-L4']:.2f} {t.category.value}"
    else:
        text += ", no T-score (patient sex unknown)"
    text += " (estimated from CXR by software"
    text += "; DEMO model, not for clinical use)" if estimate.demo else ")"
    return text


def statements(estimate: BmdEstimate) -> list[str]:
    """The caveats every reader must see: software estimate, demo model, missing T-score."""
    algo = estimate.algorithm
    out = [ESTIMATE_STATEMENT.format(name=algo.name, version=algo.version)]
    if algo.demo:
        statement = algo.demo_statement.strip()
        # bundles usually open their statement with the prefix already: say it once
        out.append(statement if statement.upper().startswith(DEMO_PREFIX) else f"{DEMO_PREFIX} {statement}".strip())
    if estimate.tscores.tscore is None and estimate.tscores.reason:
        out.append(estimate.tscores.reason)
    return out
