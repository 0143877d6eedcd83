"""T-score maths, WHO categories and the reference-table CSV."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from screener.pipeline.tscore import (
    SITES,
    VERTEBRAE,
    ReferenceTable,
    TScoreResult,
    WhoCategory,
    compute_tscores,
    normalise_sex,
    who_category,
)


@pytest.fixture(scope="module")
def table() -> ReferenceTable:
    return ReferenceTable.default()


def _csv_rows(**override: str) -> str:
    """A valid CSV where every entry has mean 1.0, sd 0.1; ``override`` replaces whole lines."""
    lines = ["sex,site,mean,sd,source"]
    for sex in ("M", "F"):
        for site in SITES:
            lines.append(override.get(f"{sex}_{site}", f"{sex},{site},1.0,0.1,test"))
    return "\n".join(line for line in lines if line) + "\n"


def test_default_loads_all_entries(table: ReferenceTable) -> None:
    assert set(table.entries) == {(s, site) for s in ("M", "F") for site in SITES}
    assert table.entries[("M", "L1")] == (0.999, 0.123)
    assert table.entries[("F", "L1-L4")] == (1.064, 0.106)
    assert len(table.sources) == 2


def test_tscore_hand_computed(table: ReferenceTable) -> None:
    # (0.876 - 0.999) / 0.123 = -1.0 ; (0.704 - 1.064) / 0.128 = -2.8125
    assert table.tscore(0.876, "M", "L1") == pytest.approx(-1.0)
    assert table.tscore(0.704, "F", "L2") == pytest.approx(-2.8125)
    assert table.tscore(1.100, "female", "L3") == pytest.approx(0.0)
    with pytest.raises(ValueError, match="sex"):
        table.tscore(1.0, "O", "L1")
    with pytest.raises(ValueError, match="site"):
        table.tscore(1.0, "M", "L5")


def test_compute_tscores_men(table: ReferenceTable) -> None:
    bmd = [0.9, 1.0, 1.1, 0.8]
    res = compute_tscores(bmd, "M", table)
    assert res.bmd["L1-L4"] == pytest.approx(0.95)
    assert res.tscore is not None
    assert res.tscore["L1"] == pytest.approx((0.9 - 0.999) / 0.123)
    assert res.tscore["L4"] == pytest.approx((0.8 - 1.071) / 0.127)
    # L1-L4: (0.95 - 1.057) / 0.110 = -0.9727...
    assert res.tscore["L1-L4"] == pytest.approx(-0.97272727, abs=1e-7)
    assert res.category is WhoCategory.NORMAL
    assert res.screen_positive is False
    assert res.reason is None
    assert set(res.bmd) == set(SITES) == set(res.tscore)


def test_compute_tscores_women(table: ReferenceTable) -> None:
    bmd = [0.70, 0.75, 0.80, 0.75]
    res = compute_tscores(bmd, "f", table)
    assert res.bmd["L1-L4"] == pytest.approx(0.75)
    assert res.tscore is not None
    assert res.tscore["L2"] == pytest.approx((0.75 - 1.064) / 0.128)
    # L1-L4: (0.75 - 1.064) / 0.106 = -2.9623...
    assert res.tscore["L1-L4"] == pytest.approx(-2.96226415, abs=1e-7)
    assert res.category is WhoCategory.OSTEOPOROSIS
    assert res.screen_positive is True


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (0.5, WhoCategory.NORMAL),
        (-1.0, WhoCategory.NORMAL),
        (-0.999, WhoCategory.NORMAL),
        (-1.001, WhoCategory.OSTEOPENIA),
        (-2.499, WhoCategory.OSTEOPENIA),
        (-2.5, WhoCategory.OSTEOPOROSIS),
        (-2.501, WhoCategory.OSTEOPOROSIS),
        (-4.0, WhoCategory.OSTEOPOROSIS),
    ],
)
def test_who_category_boundaries(t: float, expected: WhoCategory) -> None:
    assert who_category(t) is expected


def test_boundaries_through_bmd(table: ReferenceTable) -> None:
    # L1-L4 BMD exactly 1.0 and 2.5 SD below the male mean: float noise must not move category.
    mean, sd = table.entries[("M", "L1-L4")]
    at_minus_1 = compute_tscores([mean - sd] * 4, "M", table)
    at_minus_25 = compute_tscores([mean - 2.5 * sd] * 4, "M", table)
    assert at_minus_1.category is WhoCategory.NORMAL
    assert at_minus_25.category is WhoCategory.OSTEOPOROSIS


def test_who_category_rejects_nan() -> None:
    with pytest.raises(ValueError):
        who_category(math.nan)


@pytest.mark.parametrize("sex", [None, "", "O", "o", "U", "other"])
def test_unknown_sex_reports_bmd_only(table: ReferenceTable, sex: str | None) -> None:
    res = compute_tscores([1.0, 1.0, 1.0, 1.0], sex, table)
    assert isinstance(res, TScoreResult)
    assert res.bmd["L1-L4"] == pytest.approx(1.0)
    assert res.tscore is None
    assert res.category is None
    assert res.screen_positive is None
    assert res.reason is not None and "sex unknown" in res.reason
    assert "BMD reported alone" in res.reason


def test_normalise_sex() -> None:
    assert normalise_sex("M") == "M"
    assert normalise_sex(" male ") == "M"
    assert normalise_sex("F") == "F"
    assert normalise_sex("Female") == "F"
    for v in (None, "", "O", "X"):
        assert normalise_sex(v) is None


def test_compute_tscores_validates_input(table: ReferenceTable) -> None:
    with pytest.raises(ValueError, match="4 values"):
        compute_tscores([1.0, 1.0, 1.0], "M", table)
    with pytest.raises(ValueError, match="L3"):
        compute_tscores([1.0, 1.0, math.nan, 1.0], "M", table)


def test_csv_round_trip(table: ReferenceTable, tmp_path: Path) -> None:
    text = table.to_csv()
    again = ReferenceTable.from_csv(text, name=table.name)
    assert again == table
    path = tmp_path / "ref.csv"
    path.write_text(text)
    from_path = ReferenceTable.from_csv(path)
    assert from_path.entries == table.entries
    assert from_path.name == "ref"
    assert ReferenceTable.from_csv(str(path)).entries == table.entries


def test_csv_missing_column() -> None:
    text = _csv_rows().replace("sex,site,mean,sd,source", "sex,site,mean,source", 1)
    with pytest.raises(ValueError, match="sd"):
        ReferenceTable.from_csv(text)


def test_csv_bad_sex() -> None:
    text = _csv_rows(M_L2="X,L2,1.0,0.1,test")
    with pytest.raises(ValueError, match=r"line 3, column 'sex'"):
        ReferenceTable.from_csv(text)


def test_csv_bad_site() -> None:
    text = _csv_rows(M_L2="M,L5,1.0,0.1,test")
    with pytest.raises(ValueError, match=r"line 3, column 'site'"):
        ReferenceTable.from_csv(text)


@pytest.mark.parametrize("sd", ["0", "-0.1", "abc"])
def test_csv_bad_sd(sd: str) -> None:
    text = _csv_rows(F_L4=f"F,L4,1.0,{sd},test")
    with pytest.raises(ValueError, match=r"line 10, column 'sd'"):
        ReferenceTable.from_csv(text)


def test_csv_bad_mean() -> None:
    text = _csv_rows(F_L1="F,L1,0,0.1,test")
    with pytest.raises(ValueError, match=r"column 'mean'"):
        ReferenceTable.from_csv(text)


def test_csv_missing_entry() -> None:
    text = _csv_rows(**{"F_L1-L4": ""})
    with pytest.raises(ValueError, match=r"missing entries.*F/L1-L4"):
        ReferenceTable.from_csv(text)


def test_csv_duplicate_entry() -> None:
    text = _csv_rows(M_L2="M,L1,1.0,0.1,test")
    with pytest.raises(ValueError, match="duplicate"):
        ReferenceTable.from_csv(text)


def test_missing_file_is_reported() -> None:
    with pytest.raises(FileNotFoundError):
        ReferenceTable.from_csv("/nonexistent/reference.csv")


def test_vertebrae_constant() -> None:
    assert VERTEBRAE == ("L1", "L2", "L3", "L4")
    assert SITES == VERTEBRAE + ("L1-L4",)
