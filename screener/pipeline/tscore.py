"""T-scores and WHO categories from estimated lumbar BMD.

A T-score compares a BMD with a young-adult reference of the same sex and site::

    T = (BMD - mean_young) / sd_young

The reference means and SDs live in a small CSV (``data/tscore_reference.csv``) so that a site
can swap in the values of its own DXA scanner without touching code. The WHO category is
taken from the L1-L4 T-score, as in clinical lumbar DXA reports.

Without a patient sex there is no valid reference, so the T-score and category are left out
and only the BMD is reported, with a sentence saying why.
"""

from __future__ import annotations

import csv
import enum
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

__all__ = [
    "VERTEBRAE",
    "SITES",
    "WhoCategory",
    "who_category",
    "ReferenceTable",
    "TScoreResult",
    "normalise_sex",
    "compute_tscores",
]

VERTEBRAE: tuple[str, ...] = ("L1", "L2", "L3", "L4")
SITES: tuple[str, ...] = ("L1", "L2", "L3", "L4", "L1-L4")
SEXES: tuple[str, ...] = ("M", "F")

_CSV_COLUMNS: tuple[str, ...] = ("sex", "site", "mean", "sd", "source")

# T-scores computed from BMD carry float noise (e.g. -2.5000000000000004 for a BMD that is
# exactly 2.5 SD below the mean); such a value must fall in the category it has on paper.
_BOUNDARY_EPS = 1e-9


class WhoCategory(str, enum.Enum):
    """WHO diagnostic category from a T-score."""

    NORMAL = "normal"
    OSTEOPENIA = "osteopenia"
    OSTEOPOROSIS = "osteoporosis"


def who_category(t: float) -> WhoCategory:
    """WHO category: normal T >= -1.0; osteopenia -2.5 < T < -1.0; osteoporosis T <= -2.5."""
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"who_category needs a finite T-score, got {t}")
    if t >= -1.0 - _BOUNDARY_EPS:
        return WhoCategory.NORMAL
    if t <= -2.5 + _BOUNDARY_EPS:
        return WhoCategory.OSTEOPOROSIS
    return WhoCategory.OSTEOPENIA


def normalise_sex(value: str | None) -> str | None:
    """``"M"``/``"F"`` (any case, also ``"male"``/``"female"``) or None for anything else.

    DICOM PatientSex is M, F, O or empty; "O" and empty carry no usable reference.
    """
    if value is None:
        return None
    v = str(value).strip().upper()
    if v in ("M", "MALE"):
        return "M"
    if v in ("F", "FEMALE"):
        return "F"
    return None


def _parse_positive(text: str, line: int, column: str) -> float:
    try:
        x = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"T-score reference line {line}, column '{column}': "
                         f"not a number: {text!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"T-score reference line {line}, column '{column}': "
                         f"must be a positive finite number, got {text!r}")
    return x


def _names_file(text: str) -> bool:
    """Whether a string is a file path rather than CSV text."""
    if "\n" in text:
        return False
    try:
        if Path(text).is_file():
            return True
    except OSError:  # e.g. name too long: it is text
        return False
    if "," not in text:
        # One line without a comma cannot be a usable CSV: it is a path that does not exist.
        raise FileNotFoundError(f"T-score reference file not found: {text}")
    return False


@dataclass(frozen=True)
class ReferenceTable:
    """Young-adult BMD reference: (sex, site) -> (mean, sd) in g/cm2.

    ``entry_sources`` keeps each row's citation so that :meth:`to_csv` round-trips; tables
    built by hand may leave it empty.
    """

    name: str
    entries: dict[tuple[str, str], tuple[float, float]]
    sources: tuple[str, ...]
    entry_sources: dict[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    def from_csv(cls, path_or_text: str | Path, name: str | None = None) -> ReferenceTable:
        """Read a table from a CSV file or CSV text (columns sex,site,mean,sd,source).

        A :class:`Path`, or a string naming an existing file, is read as a file; any other
        string is taken as CSV text. Line numbers in errors count the header as line 1.
        """
        if isinstance(path_or_text, Path) or _names_file(path_or_text):
            path = Path(path_or_text)
            text = path.read_text(encoding="utf-8")
            default_name = path.stem
        else:
            text = path_or_text
            default_name = "custom"

        reader = csv.DictReader(io.StringIO(text))
        header = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in _CSV_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"T-score reference: missing column(s) {missing}; "
                             f"header is {header}, expected {list(_CSV_COLUMNS)}")
        reader.fieldnames = header  # stripped names, so " sd" in a hand-edited file still works

        entries: dict[tuple[str, str], tuple[float, float]] = {}
        entry_sources: dict[tuple[str, str], str] = {}
        sources: list[str] = []
        for row in reader:
            line = reader.line_num  # physical line, right even after blank lines
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # blank line
            sex = (row["sex"] or "").strip()
            site = (row["site"] or "").strip()
            if sex not in SEXES:
                raise ValueError(f"T-score reference line {line}, column 'sex': "
                                 f"{sex!r} is not one of {list(SEXES)}")
            if site not in SITES:
                raise ValueError(f"T-score reference line {line}, column 'site': "
                                 f"{site!r} is not one of {list(SITES)}")
            if (sex, site) in entries:
                raise ValueError(f"T-score reference line {line}: duplicate entry for "
                                 f"sex={sex!r}, site={site!r}")
            mean = _parse_positive(row["mean"], line, "mean")
            sd = _parse_positive(row["sd"], line, "sd")
            source = (row["source"] or "").strip()
            entries[(sex, site)] = (mean, sd)
            entry_sources[(sex, site)] = source
            if source and source not in sources:
                sources.append(source)

        absent = [f"{sex}/{site}" for sex in SEXES for site in SITES if (sex, site) not in entries]
        if absent:
            raise ValueError(f"T-score reference: missing entries (sex/site) {absent}; "
                             f"every site in {list(SITES)} is needed for both sexes")
        return cls(name=name or default_name, entries=entries, sources=tuple(sources),
                   entry_sources=entry_sources)

    @classmethod
    def default(cls) -> ReferenceTable:
        """The packaged reference (``screener/pipeline/data/tscore_reference.csv``)."""
        res = resources.files("screener.pipeline").joinpath("data/tscore_reference.csv")
        return cls.from_csv(res.read_text(encoding="utf-8"), name="default")

    def to_csv(self) -> str:
        """CSV text that :meth:`from_csv` reads back into an equal table.

        Entries without a recorded source get all of :attr:`sources` joined by "; ".
        """
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(_CSV_COLUMNS)
        fallback = "; ".join(self.sources)
        for sex in SEXES:
            for site in SITES:
                if (sex, site) not in self.entries:
                    continue
                mean, sd = self.entries[(sex, site)]
                source = self.entry_sources.get((sex, site), fallback)
                # repr() gives the shortest string that parses back to the same float.
                writer.writerow([sex, site, repr(float(mean)), repr(float(sd)), source])
        return buf.getvalue()

    def tscore(self, bmd: float, sex: str, site: str) -> float:
        """T-score of ``bmd`` (g/cm2) against the young-adult reference for sex and site."""
        s = normalise_sex(sex)
        if s is None:
            raise ValueError(f"tscore: sex must be M or F, got {sex!r}")
        if site not in SITES:
            raise ValueError(f"tscore: site {site!r} is not one of {list(SITES)}")
        if (s, site) not in self.entries:
            raise KeyError(f"tscore: reference table {self.name!r} has no entry for "
                           f"sex={s!r}, site={site!r}")
        mean, sd = self.entries[(s, site)]
        return (float(bmd) - mean) / sd


@dataclass(frozen=True)
class TScoreResult:
    """BMD for every site, and T-scores and WHO category when the patient sex is known."""

    bmd: dict[str, float]
    tscore: dict[str, float] | None
    category: WhoCategory | None
    reason: str | None

    @property
    def screen_positive(self) -> bool | None:
        """True when the L1-L4 category is osteoporosis; None when no category."""
        if self.category is None:
            return None
        return self.category is WhoCategory.OSTEOPOROSIS


def _unknown_sex_reason(sex: str | None) -> str:
    if sex is None or not str(sex).strip():
        detail = "PatientSex missing"
    elif str(sex).strip().upper() == "O":
        detail = "PatientSex 'O'"
    else:
        detail = f"PatientSex {str(sex).strip()!r} not recognised"
    return (f"patient sex unknown ({detail}): T-score needs a sex-specific reference, "
            f"BMD reported alone")


def compute_tscores(
    bmd_l1_l4: Sequence[float], sex: str | None, table: ReferenceTable
) -> TScoreResult:
    """BMD, T-scores and WHO category for one patient from the L1..L4 BMD (g/cm2).

    The L1-L4 BMD is the mean of the four vertebrae; the category comes from its T-score.
    """
    values = [float(v) for v in bmd_l1_l4]
    if len(values) != len(VERTEBRAE):
        raise ValueError(f"compute_tscores: bmd_l1_l4 needs {len(VERTEBRAE)} values "
                         f"({', '.join(VERTEBRAE)}), got {len(values)}")
    for name, v in zip(VERTEBRAE, values):
        if not math.isfinite(v):
            raise ValueError(f"compute_tscores: BMD for {name} is not finite ({v})")

    bmd = dict(zip(VERTEBRAE, values))
    bmd["L1-L4"] = sum(values) / len(values)

    s = normalise_sex(sex)
    if s is None:
        return TScoreResult(bmd=bmd, tscore=None, category=None,
                            reason=_unknown_sex_reason(sex))
    tscore = {site: table.tscore(bmd[site], s, site) for site in SITES}
    return TScoreResult(bmd=bmd, tscore=tscore, category=who_category(tscore["L1-L4"]),
                        reason=None)
