"""Evaluation metrics and plots for BMD regression, laid out like the papers' tables.

Per site (L1..L4 and the L1-L4 mean) we report agreement (Pearson r, MAE, RMSE, Bland-Altman
bias and limits of agreement) and, over cases with a known sex (a T-score needs one),
screening performance for osteoporosis (ground-truth T <= threshold): AUC with the predicted
T-score as the score, and sensitivity/specificity of predicted T <= threshold.

AUC is the Mann-Whitney statistic computed from ranks, so ties count one half, as in
sklearn's ``roc_auc_score``; it is written out here to keep sklearn out of the dependencies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from screener.pipeline.tscore import SITES, VERTEBRAE, ReferenceTable, normalise_sex

__all__ = [
    "pearson_r",
    "roc_auc",
    "roc_curve",
    "bmd_metrics",
    "to_json",
    "papers_table",
    "save_plots",
]


def pearson_r(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation; nan when fewer than 2 values or either side is constant."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"pearson_r: a has {x.size} values, b has {y.size}")
    if x.size < 2:
        return math.nan
    dx = x - x.mean()
    dy = y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denom == 0.0:
        return math.nan  # constant input: correlation undefined (numpy would warn and give nan)
    # Clip: rounding can push a perfect correlation to 1.0000000000000002.
    return float(np.clip(float(dx @ dy) / denom, -1.0, 1.0))


def _labels_scores(labels: np.ndarray, scores: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    lab = np.asarray(labels).ravel()
    sc = np.asarray(scores, dtype=np.float64).ravel()
    if lab.shape != sc.shape:
        raise ValueError(f"{where}: labels has {lab.size} values, scores has {sc.size}")
    if lab.dtype != np.bool_:
        if lab.size and not np.all(np.isin(lab, (0, 1))):
            raise ValueError(f"{where}: labels must be boolean or 0/1")
        lab = lab.astype(bool)
    if not np.all(np.isfinite(sc)):
        raise ValueError(f"{where}: scores contain non-finite values")
    return lab, sc


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (higher score = more likely positive); ties count one half.

    nan when only one class is present.
    """
    lab, sc = _labels_scores(labels, scores, "roc_auc")
    n_pos = int(lab.sum())
    n_neg = int(lab.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # Mann-Whitney U from average ranks: a positive tied with a negative scores 1/2.
    ranks = rankdata(sc, method="average")
    u = float(ranks[lab].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC points (fpr, tpr) from (0, 0) to (1, 1), one per distinct score.

    Tied scores make one diagonal step, so the trapezoidal area equals :func:`roc_auc`.
    Raises ValueError when only one class is present (the curve is undefined).
    """
    lab, sc = _labels_scores(labels, scores, "roc_curve")
    n_pos = int(lab.sum())
    n_neg = int(lab.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_curve: needs both positive and negative labels")
    order = np.argsort(-sc, kind="mergesort")
    sc_sorted = sc[order]
    lab_sorted = lab[order]
    tp = np.cumsum(lab_sorted)
    fp = np.cumsum(~lab_sorted)
    # Keep only the last index of each run of equal scores: a threshold cannot split ties.
    last_of_run = np.r_[sc_sorted[1:] != sc_sorted[:-1], True]
    tpr = np.r_[0.0, tp[last_of_run] / n_pos]
    fpr = np.r_[0.0, fp[last_of_run] / n_neg]
    return fpr, tpr


def _validate_bmd(pred: np.ndarray, true: np.ndarray, sex: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    for name, arr in (("pred", p), ("true", t)):
        if arr.ndim != 2 or arr.shape[1] != len(VERTEBRAE):
            raise ValueError(f"{name} must have shape (N, {len(VERTEBRAE)}) "
                             f"({', '.join(VERTEBRAE)}), got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains non-finite BMD values")
    if p.shape != t.shape:
        raise ValueError(f"pred has shape {p.shape}, true has {t.shape}")
    if len(sex) != p.shape[0]:
        raise ValueError(f"sex has {len(sex)} entries, pred/true have {p.shape[0]} rows")
    return p, t


def _with_mean_site(bmd: np.ndarray) -> dict[str, np.ndarray]:
    """Per-site BMD columns, with "L1-L4" as the row mean of the four vertebrae."""
    out = {v: bmd[:, i] for i, v in enumerate(VERTEBRAE)}
    out["L1-L4"] = bmd.mean(axis=1)
    return out


def _tscores(values: np.ndarray, sexes: list[str], site: str, table: ReferenceTable) -> np.ndarray:
    return np.array([table.tscore(float(v), s, site) for v, s in zip(values, sexes)],
                    dtype=np.float64)


def _safe_ratio(num: int, den: int) -> float:
    return num / den if den > 0 else math.nan


def _nanless_mean(values: list[float]) -> float:
    """Mean that is nan when any value is nan: an average over missing sites would mislead."""
    return float(np.mean(values)) if values and all(np.isfinite(values)) else math.nan


def bmd_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    sex: Sequence[str | None],
    table: ReferenceTable,
    threshold: float = -2.5,
) -> dict[str, Any]:
    """Agreement and screening metrics per site, plus the papers' "average" row.

    Parameters
    ----------
    pred, true
        (N, 4) BMD in g/cm2, columns L1..L4.
    sex
        Per-case sex (anything :func:`normalise_sex` accepts); unknown sex cases count for
        agreement but not for AUC/sensitivity/specificity.
    table
        Young-adult reference used for T-scores.
    threshold
        Osteoporosis when T <= threshold.

    Returns
    -------
    dict
        ``{"n", "threshold", "reference", <site>: {...} for each site, "average": {...}}``;
        floats may be nan (see :func:`to_json`).
    """
    p, t = _validate_bmd(pred, true, sex)
    sexes = [normalise_sex(s) for s in sex]
    known = np.array([s is not None for s in sexes], dtype=bool)
    known_sexes = [s for s in sexes if s is not None]
    p_sites = _with_mean_site(p)
    t_sites = _with_mean_site(t)

    out: dict[str, Any] = {"n": int(p.shape[0]), "threshold": float(threshold),
                           "reference": table.name}
    for site in SITES:
        ps, ts = p_sites[site], t_sites[site]
        diff = ps - ts
        bias = float(diff.mean()) if diff.size else math.nan
        # Sample SD (ddof=1), as in Bland & Altman; undefined for a single case.
        sd = float(diff.std(ddof=1)) if diff.size > 1 else math.nan
        m: dict[str, Any] = {
            "pearson_r": pearson_r(ps, ts),
            "mae": float(np.abs(diff).mean()) if diff.size else math.nan,
            "rmse": float(np.sqrt((diff**2).mean())) if diff.size else math.nan,
            "bias": bias,
            "loa_low": bias - 1.96 * sd,
            "loa_high": bias + 1.96 * sd,
        }
        t_true = _tscores(ts[known], known_sexes, site, table)
        t_pred = _tscores(ps[known], known_sexes, site, table)
        positive = t_true <= threshold
        called = t_pred <= threshold
        n_pos = int(positive.sum())
        n_neg = int(positive.size - n_pos)
        m["auc"] = roc_auc(positive, -t_pred) if positive.size else math.nan
        m["sensitivity"] = _safe_ratio(int((called & positive).sum()), n_pos)
        m["specificity"] = _safe_ratio(int((~called & ~positive).sum()), n_neg)
        m["n_positive"] = n_pos
        m["n_with_sex"] = int(known.sum())
        out[site] = m

    out["average"] = {
        key: _nanless_mean([out[v][key] for v in VERTEBRAE])
        for key in ("pearson_r", "mae", "auc")
    }
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None  # JSON has no nan/inf
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def to_json(metrics: dict[str, Any]) -> str:
    """Strict JSON text of a metrics dict; nan/inf become null."""
    return json.dumps(_jsonable(metrics), indent=2, allow_nan=False)


def _fmt(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(float(x), spec)


def papers_table(metrics: dict[str, Any]) -> str:
    """Fixed-width text table in the papers' layout (rows L1..L4, L1-L4, Avg).

    Accepts the dict from :func:`bmd_metrics` or the same read back from :func:`to_json`.
    """
    header = ("Site", "Pearson r", "MAE (g/cm2)", "AUC", "Sens", "Spec", "Bias", "LoA")
    widths = (6, 10, 12, 7, 7, 7, 8, 18)
    rows: list[tuple[str, ...]] = []
    for site in SITES:
        if site not in metrics:
            raise KeyError(f"papers_table: metrics has no entry for site {site!r}")
        m = metrics[site]
        loa = f"[{_fmt(m.get('loa_low'), '+.3f')}, {_fmt(m.get('loa_high'), '+.3f')}]"
        rows.append((site, _fmt(m.get("pearson_r"), ".3f"), _fmt(m.get("mae"), ".3f"),
                     _fmt(m.get("auc"), ".3f"), _fmt(m.get("sensitivity"), ".3f"),
                     _fmt(m.get("specificity"), ".3f"), _fmt(m.get("bias"), "+.3f"), loa))
    avg = metrics.get("average", {})
    # The papers' Avg row averages r, MAE and AUC over the four vertebrae only.
    rows.append(("Avg", _fmt(avg.get("pearson_r"), ".3f"), _fmt(avg.get("mae"), ".3f"),
                 _fmt(avg.get("auc"), ".3f"), "-", "-", "-", "-"))

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [line(header), line(["-" * w for w in widths])]
    lines += [line(r) for r in rows]
    n_with_sex = metrics[SITES[-1]].get("n_with_sex")
    lines.append(f"n = {metrics.get('n', 'n/a')}; screening (AUC/Sens/Spec) over "
                 f"{n_with_sex} cases with known sex, positive when T <= "
                 f"{_fmt(metrics.get('threshold', -2.5), '.1f')}")
    return "\n".join(lines)


def _new_figure(nrows: int, ncols: int, size: tuple[float, float]) -> tuple[Any, np.ndarray]:
    # A Figure with its own Agg canvas: no pyplot global state and no GUI backend, so plots
    # work headless and from worker threads regardless of the process's default backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    return fig, axes


def save_plots(
    pred: np.ndarray,
    true: np.ndarray,
    sex: Sequence[str | None],
    table: ReferenceTable,
    out_dir: Path,
    title: str = "",
    threshold: float = -2.5,
) -> list[Path]:
    """Write scatter.png, roc.png, bland_altman.png and calibration.png into ``out_dir``.

    Returns the paths written, in that order.
    """
    p, t = _validate_bmd(pred, true, sex)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sexes = [normalise_sex(s) for s in sex]
    known = np.array([s is not None for s in sexes], dtype=bool)
    known_sexes = [s for s in sexes if s is not None]
    p_sites = _with_mean_site(p)
    t_sites = _with_mean_site(t)
    colours = {"M": "tab:blue", "F": "tab:red", None: "tab:grey"}
    labels = {"M": "male", "F": "female", None: "sex unknown"}
    paths: list[Path] = []

    # Scatter, one panel per site (Figure 2 layout): predicted vs reference with identity.
    fig, axes = _new_figure(2, 3, (12, 8))
    lo = float(min(p.min(), t.min()))
    hi = float(max(p.max(), t.max()))
    pad = 0.05 * (hi - lo) if hi > lo else 0.1
    lims = (lo - pad, hi + pad)
    for ax, site in zip(axes, SITES):
        ps, ts = p_sites[site], t_sites[site]
        for s in ("M", "F", None):
            sel = np.array([x == s for x in sexes], dtype=bool)
            if sel.any():
                ax.scatter(ts[sel], ps[sel], s=10, alpha=0.6, c=colours[s], label=labels[s])
        ax.plot(lims, lims, "k--", lw=1)
        ax.set_xlim(lims)
        ax.set_ylim(lims)
        ax.set_aspect("equal")
        r = pearson_r(ps, ts)
        mae = float(np.abs(ps - ts).mean())
        ax.set_title(f"{site}: r = {_fmt(r, '.3f')}, MAE = {mae:.3f}")
        ax.set_xlabel("reference BMD (g/cm$^2$)")
        ax.set_ylabel("predicted BMD (g/cm$^2$)")
    axes[0].legend(loc="upper left", fontsize=8)
    axes[-1].set_axis_off()
    if title:
        fig.suptitle(title)
    paths.append(out_dir / "scatter.png")
    fig.savefig(paths[-1], dpi=120)

    # ROC per site over known-sex cases; the score is the negated predicted T-score.
    fig, axes = _new_figure(1, 1, (6, 6))
    ax = axes[0]
    ax.plot([0, 1], [0, 1], color="lightgrey", lw=1)
    for site in SITES:
        t_true = _tscores(t_sites[site][known], known_sexes, site, table)
        t_pred = _tscores(p_sites[site][known], known_sexes, site, table)
        positive = t_true <= threshold
        if positive.all() or not positive.any():
            # Plot nothing but keep the site in the legend, so its absence is explained.
            ax.plot([], [], ls="none", label=f"{site}: n/a (one class only)")
            continue
        fpr, tpr = roc_curve(positive, -t_pred)
        ax.plot(fpr, tpr, lw=1.5, label=f"{site}: AUC = {roc_auc(positive, -t_pred):.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"{title + ': ' if title else ''}osteoporosis (T <= {threshold:g}), "
                 f"n = {int(known.sum())} with known sex")
    ax.legend(loc="lower right", fontsize=8)
    paths.append(out_dir / "roc.png")
    fig.savefig(paths[-1], dpi=120)

    # Bland-Altman for L1-L4.
    fig, axes = _new_figure(1, 1, (7, 5))
    ax = axes[0]
    ps, ts = p_sites["L1-L4"], t_sites["L1-L4"]
    mean = (ps + ts) / 2.0
    diff = ps - ts
    bias = float(diff.mean())
    sd = float(diff.std(ddof=1)) if diff.size > 1 else 0.0
    ax.scatter(mean, diff, s=10, alpha=0.6, c=[colours[s] for s in sexes])
    ax.axhline(bias, color="k", lw=1.5, label=f"bias {bias:+.3f}")
    for v, name in ((bias - 1.96 * sd, "-1.96 SD"), (bias + 1.96 * sd, "+1.96 SD")):
        ax.axhline(v, color="k", ls="--", lw=1, label=f"{name} {v:+.3f}")
    ax.set_xlabel("mean of predicted and reference L1-L4 BMD (g/cm$^2$)")
    ax.set_ylabel("predicted - reference (g/cm$^2$)")
    ax.set_title(f"{title + ': ' if title else ''}Bland-Altman, L1-L4")
    ax.legend(loc="best", fontsize=8)
    paths.append(out_dir / "bland_altman.png")
    fig.savefig(paths[-1], dpi=120)

    # Calibration: cases binned by predicted BMD (quantiles), mean reference per bin.
    fig, axes = _new_figure(1, 1, (6, 6))
    ax = axes[0]
    n_bins = max(1, min(10, p.shape[0] // 5))
    for site in SITES:
        ps, ts = p_sites[site], t_sites[site]
        edges = np.unique(np.quantile(ps, np.linspace(0.0, 1.0, n_bins + 1)))
        idx = np.clip(np.searchsorted(edges, ps, side="right") - 1, 0, max(len(edges) - 2, 0))
        bins = [b for b in np.unique(idx)]
        xs = [float(ps[idx == b].mean()) for b in bins]
        ys = [float(ts[idx == b].mean()) for b in bins]
        ax.plot(xs, ys, marker="o", ms=4, lw=1, label=site)
    ax.plot(lims, lims, "k--", lw=1, label="identity")
    ax.set_xlim(lims)
    ax.set_ylim(lims)
    ax.set_aspect("equal")
    ax.set_xlabel("mean predicted BMD in bin (g/cm$^2$)")
    ax.set_ylabel("mean reference BMD in bin (g/cm$^2$)")
    ax.set_title(f"{title + ': ' if title else ''}calibration ({n_bins} quantile bins)")
    ax.legend(loc="upper left", fontsize=8)
    paths.append(out_dir / "calibration.png")
    fig.savefig(paths[-1], dpi=120)

    return paths
