"""Demo BMD labels for JSRT, derived from age and sex. NOT DXA: a model trained on them is a demo.

The bundled demo model needs some lumbar BMD to learn, and no public data pairs chest films
with DXA. So each JSRT case gets the BMD an average person of its age and sex would have
on a population reference curve:

- peak (age 20-30) L1-L4 BMD: NHANES, Hologic (METHOD.md section 4): men 1.057, women 1.064
  g/cm2; per-vertebra shape from the Biology Direct 2025 young-adult table (L1 < L2 < L3 ~ L4);
- women: stable to 45, then about 1 % of peak lost per year to 60 (the menopausal
  transition), then about 0.5 % per year;
- men: stable to 50, then about 0.3 % per year.

These rates are round figures of the shape seen in cross-sectional DXA reference curves, not a
fitted published model; they only have to make a plausible target. The demo model therefore
learns to read age and sex from a chest film; it measures nothing about bone. Every bundle,
SR and report made with it says so.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from training.jsrt import load_jsrt

__all__ = ["demo_bmd", "write_demo_manifest", "DEMO_STATEMENT"]

DEMO_STATEMENT = (
    "DEMO MODEL - NOT FOR CLINICAL USE. Trained on JSRT chest radiographs (197 images, no DXA) "
    "with BMD labels derived from each patient's age and sex by a population curve; it estimates "
    "what an average person of the apparent age and sex would have, not this patient's bone density."
)

PEAK_L1_L4 = {"M": 1.057, "F": 1.064}
# Young-adult per-vertebra means (Biology Direct 2025), used for the L1..L4 shape only.
SHAPE = {"M": np.array([0.999, 1.073, 1.081, 1.071]), "F": np.array([0.960, 1.064, 1.100, 1.086])}


def fraction_of_peak(age: float, sex: str) -> float:
    if sex == "F":
        if age <= 45:
            return 1.0
        if age <= 60:
            return 1.0 - 0.010 * (age - 45)
        return 0.85 - 0.005 * (age - 60)
    return 1.0 if age <= 50 else 1.0 - 0.003 * (age - 50)


def demo_bmd(age: float, sex: str) -> np.ndarray:
    """L1..L4 demo BMD (g/cm2) for an age in years and sex "M"/"F"."""
    if sex not in PEAK_L1_L4:
        raise ValueError(f"sex must be M or F for demo labels, got {sex!r}")
    shape = SHAPE[sex] / SHAPE[sex].mean()
    return PEAK_L1_L4[sex] * fraction_of_peak(float(age), sex) * shape


def write_demo_manifest(out: str | Path, jsrt_root: str | None = None) -> Path:
    """manifest.csv pointing at the JSRT PNGs, with demo labels and ground-truth landmarks."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "L1", "L2", "L3", "L4", "sex", "age", "patient_id", "landmarks"])
        for case in load_jsrt(jsrt_root):
            if case.sex not in ("M", "F") or case.age <= 0:  # JSRT lists one age as 0: unknown
                continue
            bmd = demo_bmd(case.age, case.sex)
            w.writerow([str(case.image_path.resolve()), *(f"{v:.4f}" for v in bmd), case.sex, case.age, case.case_id,
                        " ".join(f"{v:.2f}" for v in case.landmarks.ravel())])
    return out
