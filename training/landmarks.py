"""Train and evaluate the 16-landmark heatmap detector on JSRT.

Augmentation is done by sampling the network's input through a randomly perturbed
:class:`OrientedBox` (scale, rotation, translation), so the target points transform exactly
with :meth:`OrientedBox.source_to_crop`; intensity augmentation (gamma, window, unsharp mask,
blur, noise, collimation borders) makes JSRT film scans look like modern CR/DX.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from screener.pipeline.estimate import cpu_has_fast_bf16
from screener.pipeline.geometry import OrientedBox, Pyramid, letterbox_box
from screener.pipeline.landmarks import (
    DERIVED_LANDMARKS,
    EXTENT_RULE,
    LANDMARK_NAMES,
    NUM_LANDMARKS,
    SPINE_FROM_RULE,
    VIEWS,
    apply_spine_rule,
    LandmarkDetector,
    LandmarkNet,
    landmark_input,
    mirror_order,
    normalise_crop,
    soft_argmax,
)
from training.common import check_resumable, load_checkpoint, load_grey_png, save_checkpoint, seed_everything
from training.jsrt import PIXEL_MM, JsrtCase, split_cases

__all__ = ["LandmarkTrainConfig", "train_landmarks", "evaluate_landmarks", "cross_validate_landmarks"]


@dataclass
class LandmarkTrainConfig:
    jsrt_root: str | None = None
    out_dir: str = "runs/landmarks"
    input_size: int = 256
    width: int = 96
    epochs: int = 60
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    seed: int = 0
    limit: int = 0  # use only the first N training images (quick runs, tests)
    heatmap_sigma: float = 1.5
    threads: int = 0
    # bf16 autocast + channels-last: several times faster on a CPU with AMX (figures from
    # bench/landmark_training_step.py in the README); the loss and soft-argmax stay fp32.
    # On by default only where the CPU has native bf16 (elsewhere it can be slower than fp32).
    amp: bool = field(default_factory=lambda: cpu_has_fast_bf16())
    # k-fold cross-validation: fold k of `folds` is the validation set (0 folds: the fixed split)
    folds: int = 0
    fold: int = 0
    # also learn each lung's apex and base (EXTENT_POINTS), which the label rule hangs the
    # rib-cage rows and the spine points on
    extent_points: bool = False
    # share of training inputs mirrored left to right, each point relabelled as its twin (so
    # "right" stays the image's left, as on every frontal film): twice the views of each lung
    mirror: float = 0.0


#: Settings added after the first release, with the value a checkpoint saved before them ran
#: with (so such a run still resumes and reloads as it was trained).
_LEGACY_DEFAULTS = {"amp": False, "folds": 0, "fold": 0, "extent_points": False, "mirror": 0.0}


def _saved_config(state: dict) -> dict:
    return {**_LEGACY_DEFAULTS, **state["config"]}


def random_box(rng: np.random.Generator, h: int, w: int) -> OrientedBox:
    base = letterbox_box(h, w)
    scale = math.exp(rng.uniform(math.log(0.8), math.log(1.3)))
    angle = math.radians(rng.uniform(-12.0, 12.0))
    shift = rng.uniform(-0.08, 0.08, size=2) * base.side
    c, s = math.cos(angle), math.sin(angle)
    return OrientedBox(
        center=(base.center[0] + shift[0], base.center[1] + shift[1]),
        ex=(c, s),
        ey=(-s, c),
        side=base.side * scale,
    )


def augment_intensity(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Display-value image in [0, 1] -> a plausible other vendor's rendering of it."""
    x = img.astype(np.float32)
    if rng.random() < 0.5:  # edge enhancement, as most DX processing applies
        blur = ndimage.gaussian_filter(x, sigma=rng.uniform(2.0, 12.0))
        x = x + rng.uniform(0.3, 1.5) * (x - blur)
    if rng.random() < 0.3:
        x = ndimage.gaussian_filter(x, sigma=rng.uniform(0.5, 1.5))
    lo, hi = rng.uniform(-0.15, 0.25), rng.uniform(0.75, 1.2)
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    x = x ** math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    if rng.random() < 0.3:
        x = x + rng.normal(0.0, rng.uniform(0.005, 0.04), size=x.shape).astype(np.float32)
    if rng.random() < 0.3:  # collimator edges / burned-in borders
        h, w = x.shape
        t, b = rng.integers(0, h // 12, size=2)
        l, r = rng.integers(0, w // 12, size=2)
        fill = float(rng.choice([0.0, 1.0]))
        x[:t], x[h - b :], x[:, :l], x[:, w - r :] = fill, fill, fill, fill
    return np.clip(x, 0.0, 1.0)


def gaussian_targets(xy: torch.Tensor, h: int, w: int, sigma: float) -> torch.Tensor:
    """(B, L, 2) heatmap-pixel points -> normalised Gaussian distributions (B, L, H, W)."""
    ys = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w)
    g = torch.exp(-((xs - xy[..., 0, None, None]) ** 2 + (ys - xy[..., 1, None, None]) ** 2) / (2 * sigma**2))
    return g / g.sum(dim=(2, 3), keepdim=True).clamp_min(1e-12)


def landmark_loss(logits: torch.Tensor, target_xy: torch.Tensor, sigma: float) -> torch.Tensor:
    """Soft-argmax L1 (heatmap px) + cross-entropy to a Gaussian target (keeps maps peaked)."""
    b, n, h, w = logits.shape
    xy, _, _ = soft_argmax(logits)
    target = gaussian_targets(target_xy, h, w, sigma)
    logp = torch.log_softmax(logits.flatten(2), dim=-1).view(b, n, h, w)
    ce = -(target * logp).sum(dim=(2, 3)).mean()
    return F.l1_loss(xy, target_xy) + 0.1 * ce


def make_batch(
    cases: list[JsrtCase], images: dict[str, np.ndarray], size: int, stride: int, rng: np.random.Generator | None,
    extent_points: bool = False, mirror: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for case in cases:
        img = images[case.case_id]
        targets = np.concatenate([case.landmarks, case.extent]) if extent_points else case.landmarks
        if rng is not None and mirror > 0 and rng.random() < mirror:
            img = np.ascontiguousarray(img[:, ::-1])
            targets = targets[mirror_order(len(targets))].copy()
            targets[:, 0] = (img.shape[1] - 1) - targets[:, 0]
        if rng is not None:
            img = augment_intensity(img, rng)
            box = random_box(rng, *img.shape)
        else:
            box = None
        crop, box = landmark_input(Pyramid(img), size, box)
        crop_pts = box.source_to_crop(targets, size)
        xs.append(normalise_crop(crop))
        ys.append((crop_pts - (stride - 1) / 2.0) / stride)
    return torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(ys)).float()


def _split(config: LandmarkTrainConfig) -> tuple[list[JsrtCase], list[JsrtCase]]:
    train, val = split_cases(config.jsrt_root, config.folds, config.fold, config.val_fraction)
    return (train[: config.limit] if config.limit else train), val


def train_landmarks(config: LandmarkTrainConfig, resume: bool = False) -> dict:
    """Train; checkpoints after every epoch to out_dir/last.pt, best on validation MRE to best.pt."""
    if not 0.0 <= config.mirror <= 1.0:
        raise ValueError(f"mirror = {config.mirror}: the share of mirrored training inputs must be within 0..1")
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, val = _split(config)
    images = {c.case_id: load_grey_png(c.image_path) for c in train + val}
    stride = 4
    net = LandmarkNet(width=config.width, extent_points=config.extent_points)
    if config.amp:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.1
    )
    start_epoch, best, history = 0, math.inf, []
    if resume and (out / "last.pt").exists():
        state = load_checkpoint(out / "last.pt")
        # epochs too: the one-cycle schedule's length is fixed by it
        check_resumable({**_saved_config(state), "epochs": 0}, {**asdict(config), "epochs": 0})
        if state["config"]["epochs"] != config.epochs:
            raise ValueError(f"cannot --resume with epochs {config.epochs}: the run's one-cycle schedule was built for {state['config']['epochs']}")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, best, history = state["epoch"], state["best"], state["history"]
        print(f"resumed from {out / 'last.pt'} at epoch {start_epoch}")
    rng = np.random.default_rng(config.seed + start_epoch)
    for epoch in range(start_epoch, config.epochs):
        net.train()
        order = rng.permutation(len(train))
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"landmarks epoch {epoch + 1}/{config.epochs}", leave=False)
        for step in bar:
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            x, y = make_batch([train[i] for i in idx], images, config.input_size, stride, rng, config.extent_points,
                              config.mirror)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.amp):
                logits = net(x.contiguous(memory_format=torch.channels_last) if config.amp else x)
            loss = landmark_loss(logits.float(), y, config.heatmap_sigma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        metrics = mean_radial_error(LandmarkDetector(net, config.input_size, check_turned=False), val, images)
        net.train()
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_mre_mm": metrics["mre_mm"]}
        history.append(record)
        tqdm.write(json.dumps(record))
        improved = metrics["mre_mm"] < best
        best = min(best, metrics["mre_mm"])
        save_checkpoint(
            out / "last.pt",
            {
                "model": net.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": epoch + 1,
                "best": best,
                "history": history,
                "config": asdict(config),
            },
        )
        if improved:  # after last.pt: a crash between the two writes loses nothing counted
            save_checkpoint(out / "best.pt", {"model": net.state_dict(), "config": asdict(config), "epoch": epoch + 1})
    (out / "history.json").write_text(json.dumps(history, indent=2))
    return {"best_val_mre_mm": best, "history": history}


def mean_radial_error(
    detector: LandmarkDetector, cases: list[JsrtCase], images: dict[str, np.ndarray], batch: int = 16
) -> dict:
    """MRE in mm per landmark and overall (JSRT 512 px: 0.7 mm per pixel), plus predictions."""
    preds, confs = [], []
    for i in range(0, len(cases), batch):
        found = detector.detect([images[c.case_id] for c in cases[i : i + batch]])
        preds.extend(f.points for f in found)
        confs.extend(f.confidence for f in found)
    pred = np.stack(preds)
    true = np.stack([c.landmarks for c in cases])
    err_mm = np.linalg.norm(pred - true, axis=-1) * PIXEL_MM
    table = error_table(err_mm)
    return {
        "mre_mm": float(err_mm.mean()),
        "p95_mm": table["overall"]["p95"],
        "per_landmark": table["per_landmark"],
        "median_mm": float(np.median(err_mm)),
        "per_landmark_mm": {n: float(e) for n, e in zip(LANDMARK_NAMES, err_mm.mean(axis=0))},
        "within_10mm": float((err_mm <= 10.0).mean()),
        "mean_confidence": float(np.mean(confs)),
        "n_images": len(cases),
        "_pred": pred,
        "_conf": np.stack(confs),
    }


def error_table(err_mm: np.ndarray) -> dict:
    """Per-landmark and overall mean, median and 95th percentile of radial errors (N, 16) in mm."""
    def stats(e: np.ndarray) -> dict:
        return {"mean": float(e.mean()), "median": float(np.median(e)), "p95": float(np.percentile(e, 95)),
                "within_10mm": float((e <= 10.0).mean())}

    return {"overall": stats(err_mm), "per_landmark": {n: stats(err_mm[:, i]) for i, n in enumerate(LANDMARK_NAMES)}}


#: What the cross-validation compares: (name, test-time views, spine-rule weights).
CV_VARIANTS: tuple[tuple[str, int, dict[str, float], dict[str, float]], ...] = (
    ("network only", 1, {}, {}),
    ("+ spine rule", 1, SPINE_FROM_RULE, {}),
    ("+ spine rule, 5 views", 5, SPINE_FROM_RULE, {}),
    ("+ spine rule, 15 views", 15, SPINE_FROM_RULE, {}),
)

#: The variants added for a detector with extent points (the first is what the node runs).
CV_EXTENT_VARIANTS: tuple[tuple[str, int, dict[str, float], dict[str, float]], ...] = (
    ("+ spine and extent rule", 1, SPINE_FROM_RULE, EXTENT_RULE),
    ("+ spine and extent rule, 5 views", 5, SPINE_FROM_RULE, EXTENT_RULE),
    ("+ spine and extent rule, 15 views", 15, SPINE_FROM_RULE, EXTENT_RULE),
)

#: Each variant again with every view also run mirrored (``LandmarkDetector(flip=True)``).
FLIP_SUFFIX = ", + mirrored"

RULE_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


def fold_complete(fold_dir: Path, epochs: int) -> bool:
    """Has this cross-validation fold trained all its epochs (history, best.pt and last.pt)?"""
    history = fold_dir / "history.json"
    return (history.is_file() and (fold_dir / "best.pt").is_file() and (fold_dir / "last.pt").is_file()
            and len(json.loads(history.read_text())) >= epochs)


def cross_validate_landmarks(config: LandmarkTrainConfig, folds: int = 5, resume: bool = True,
                             max_folds: int | None = None) -> dict:
    """k-fold cross-validation of the detector recipe on JSRT: every image predicted by a model
    that never saw it, errors per landmark (mean, median, p95) for each :data:`CV_VARIANTS`.
    Each fold is scored with its last epoch's weights, so nothing is chosen on the images scored.

    Each fold trains into ``out_dir/fold<k>`` and is skipped when already complete, so an
    interrupted run resumes where it stopped; ``max_folds`` trains at most that many folds in
    this call (0: none, only report), and the report then covers the folds done, and says so. Writes cv_metrics.json/.txt and
    cv_errors.png (per-landmark error distribution) to ``out_dir``.
    """
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    views_all = len(VIEWS)
    pred_views, truth, ids, done = [], [], [], []
    trained_now = 0
    for k in range(folds):
        fold_cfg = LandmarkTrainConfig(**{**asdict(config), "folds": folds, "fold": k, "out_dir": str(out / f"fold{k}")})
        fold_dir = Path(fold_cfg.out_dir)
        if fold_complete(fold_dir, fold_cfg.epochs):  # a fold trained with other settings is not this recipe's: refuse to mix
            saved = {**_saved_config(load_checkpoint(fold_dir / "best.pt")), "jsrt_root": None, "out_dir": None, "threads": 0}
            check_resumable(saved, {**asdict(fold_cfg), "jsrt_root": None, "out_dir": None, "threads": 0})
        else:
            if max_folds is not None and trained_now >= max_folds:
                continue
            train_landmarks(fold_cfg, resume=resume and (fold_dir / "last.pt").exists())
            trained_now += 1
            if not (fold_dir / "best.pt").is_file():
                raise RuntimeError(f"fold {k} trained but wrote no {fold_dir / 'best.pt'}: its validation error was never finite")
        # The last epoch's weights, not best.pt: best.pt was picked on these very images, which
        # would flatter the figure; the one-cycle schedule ends annealed, so little is lost.
        net, _ = load_landmark_checkpoint(fold_dir / "last.pt", config.jsrt_root)
        _, val = _split(fold_cfg)
        detector = LandmarkDetector(net, fold_cfg.input_size, views=views_all, flip=True, check_turned=False)
        extent = detector.extent_points
        for i in range(0, len(val), 8):
            chunk = val[i : i + 8]
            pts, _, _ = detector.detect_views([load_grey_png(c.image_path) for c in chunk])
            pred_views.append(pts)
        truth.extend(c.landmarks for c in val)
        ids.extend(c.case_id for c in val)
        done.append(k)
    if not done:
        raise RuntimeError(f"no fold of {folds} is complete in {out}")
    # (N, 2V, P, 2): the V plain views, then the same V mirrored; P = the 16, then the extent points if any
    views = np.concatenate(pred_views)
    true = np.stack(truth)
    # Every view's raw points, so that another rule can be scored without predicting again.
    np.savez_compressed(out / "cv_predictions.npz", views=views, truth=true, ids=np.asarray(ids),
                        view_boxes=np.asarray(VIEWS))

    def errors(n_views: int, weights: dict[str, float], extent_rule: dict[str, float] | None = None,
               flip: bool = False) -> np.ndarray:
        chosen = views[:, :n_views] if not flip else np.concatenate(
            [views[:, :n_views], views[:, views_all : views_all + n_views]], axis=1)
        median = np.median(chosen, axis=1)
        ext = median[:, NUM_LANDMARKS:] if extent else None
        pred = apply_spine_rule(median[:, :NUM_LANDMARKS], weights, ext, extent_rule)
        return np.linalg.norm(pred - true, axis=-1) * PIXEL_MM

    runs = CV_VARIANTS + (CV_EXTENT_VARIANTS if extent else ())
    variants = {name: error_table(errors(v, w, e)) for name, v, w, e in runs}
    variants.update({name + FLIP_SUFFIX: error_table(errors(v, w, e, flip=True)) for name, v, w, e in runs[1:]})
    node_rule = EXTENT_RULE if extent else {}
    # How much of each derived point to take from the rule: the evidence for SPINE_FROM_RULE.
    rule_weights = {name: {f"{w:.2f}": float(errors(1, {name: w}, node_rule)[:, LANDMARK_NAMES.index(name)].mean())
                           for w in RULE_SHARES} for name in DERIVED_LANDMARKS}
    summary = {"folds": folds, "folds_done": done, "n_images": len(ids), "epochs": config.epochs,
               "input_size": config.input_size, "extent_points": bool(extent), "variants": variants,
               "spine_rule_weight_mre_mm": rule_weights}
    if extent:  # the evidence for EXTENT_RULE: overall mean error by both shares
        summary["extent_rule_mre_mm"] = {
            f"lung_extent={a:.2f} ribcage_rows={b:.2f}": float(errors(1, SPINE_FROM_RULE, {"lung_extent": a, "ribcage_rows": b}).mean())
            for a in RULE_SHARES for b in RULE_SHARES}
    (out / "cv_metrics.json").write_text(json.dumps(summary, indent=2))
    node_variant = "+ spine and extent rule" if extent else "+ spine rule"
    shipped = variants[node_variant]
    lines = [f"{len(done)} of {folds} folds ({len(ids)} JSRT images, each predicted by a model that never saw it); "
             f"{config.epochs} epochs at {config.input_size} px{', with extent points' if extent else ''}"
             f"{f', {config.mirror:g} of the training inputs mirrored' if config.mirror else ''}; "
             f"errors in mm (0.7 mm per pixel)", "",
             f"{'variant':<48}{'mean':>8}{'median':>8}{'p95':>8}{'<=10mm':>9}"]
    for name, table in variants.items():
        o = table["overall"]
        lines.append(f"{name:<48}{o['mean']:>8.2f}{o['median']:>8.2f}{o['p95']:>8.2f}{100 * o['within_10mm']:>8.1f}%")
    lines += ["", f"per landmark, {node_variant} (what the node runs by default):",
              f"{'landmark':<26}{'mean':>8}{'median':>8}{'p95':>8}{'<=10mm':>9}"]
    for name, o in shipped["per_landmark"].items():
        lines.append(f"{name:<26}{o['mean']:>8.2f}{o['median']:>8.2f}{o['p95']:>8.2f}{100 * o['within_10mm']:>8.1f}%")
    lines += ["", "mean error of each derived point by the share taken from the rule (0 = its heatmap, 1 = the rule):"]
    for name, by_w in rule_weights.items():
        lines.append(f"{name:<26}" + "  ".join(f"{w}: {v:.2f}" for w, v in by_w.items()))
    if extent:
        lines += ["", "overall mean error by the extent rule's shares (rows: lung_extent, columns: ribcage_rows):",
                  f"{'':<26}" + "".join(f"{b:>8.2f}" for b in RULE_SHARES)]
        for a in RULE_SHARES:
            lines.append(f"{a:<26.2f}" + "".join(
                f"{summary['extent_rule_mre_mm'][f'lung_extent={a:.2f} ribcage_rows={b:.2f}']:>8.2f}" for b in RULE_SHARES))
    text = "\n".join(lines)
    print(text)
    (out / "cv_metrics.txt").write_text(text + "\n")
    _plot_errors(errors(1, SPINE_FROM_RULE, node_rule), out / "cv_errors.png", f"{len(done)}-fold CV, {len(ids)} JSRT images")
    return summary


def _plot_errors(err_mm: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.boxplot([err_mm[:, i] for i in range(err_mm.shape[1])], whis=(5, 95), showfliers=False)
    ax.set_xticks(range(1, len(LANDMARK_NAMES) + 1), LANDMARK_NAMES, rotation=60, ha="right", fontsize=8)
    ax.axhline(10.0, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("radial error (mm); whiskers 5-95 %")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def load_landmark_checkpoint(path: str | Path, jsrt_root: str | None = None) -> tuple[LandmarkNet, LandmarkTrainConfig]:
    """The trained net (eval mode) and the settings it was trained with (``jsrt_root`` overrides).

    ``path`` is a training checkpoint, or the landmarks.pt of a model bundle (the shipped demo
    bundle included): its weights only, with the input size and width in the bundle's
    manifest.json, and the default split, which is the one the bundled detector was trained on.
    """
    state = load_checkpoint(path)
    if "config" not in state:
        manifest = Path(path).parent / "manifest.json"
        if not manifest.is_file():
            raise ValueError(f"{path}: neither a training checkpoint (no 'config') nor a bundle's weights (no manifest.json beside it)")
        spec = json.loads(manifest.read_text())["landmarks"]
        cfg = LandmarkTrainConfig(jsrt_root=jsrt_root, input_size=int(spec["input_size"]), width=int(spec["width"]),
                                  extent_points="extent_points" in spec)
        weights = state
    else:
        cfg = LandmarkTrainConfig(**{**_saved_config(state), "jsrt_root": jsrt_root or state["config"].get("jsrt_root")})
        weights = state["model"]
    net = LandmarkNet(width=cfg.width, extent_points=cfg.extent_points)
    net.load_state_dict(weights)
    return net.eval(), cfg


def evaluate_landmarks(checkpoint: str | Path, out_dir: str | Path, jsrt_root: str | None = None,
                       flip: bool = False) -> dict:
    """Validation-split MRE table (printed, JSON) and a PNG of predicted vs true points;
    ``flip``: the detector also runs the mirrored view."""
    net, cfg = load_landmark_checkpoint(checkpoint, jsrt_root)
    manifest = Path(checkpoint).parent / "manifest.json"
    if manifest.is_file():  # a bundle's weights: score them as the bundle runs them
        bundle_flip = bool(json.loads(manifest.read_text())["landmarks"].get("flip", False))
        if flip != bundle_flip:
            raise ValueError(f"evaluate: the bundle of {checkpoint} runs {'with' if bundle_flip else 'without'} "
                             f"mirrored views; {'add' if bundle_flip else 'leave out'} --flip")
    _, val = _split(cfg)
    images = {c.case_id: load_grey_png(c.image_path) for c in val}
    t0 = time.perf_counter()
    metrics = mean_radial_error(LandmarkDetector(net, cfg.input_size, flip=flip, check_turned=False), val, images)
    metrics["flip"] = flip
    elapsed = time.perf_counter() - t0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred = metrics.pop("_pred")
    metrics.pop("_conf")
    metrics["seconds_per_image_cpu"] = elapsed / len(val)
    (out / "landmark_metrics.json").write_text(json.dumps(metrics, indent=2))
    lines = [f"{'landmark':<26}{'mean':>8}{'median':>8}{'p95':>8}   (radial error, mm)"]
    lines += [f"{n:<26}{v['mean']:>8.2f}{v['median']:>8.2f}{v['p95']:>8.2f}" for n, v in metrics["per_landmark"].items()]
    lines.append(f"{'overall':<26}{metrics['mre_mm']:>8.2f}{metrics['median_mm']:>8.2f}{metrics['p95_mm']:>8.2f}")
    lines.append(f"validation images: {metrics['n_images']}, within 10 mm: {100 * metrics['within_10mm']:.1f} %")
    print("\n".join(lines))
    (out / "landmark_metrics.txt").write_text("\n".join(lines) + "\n")
    _plot_predictions(val[:6], images, pred[:6], out / "landmarks_validation.png")
    return metrics


def _plot_predictions(cases: list[JsrtCase], images: dict[str, np.ndarray], pred: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 8))
    for ax, case, p in zip(axes.ravel(), cases, pred):
        ax.imshow(images[case.case_id], cmap="gray", vmin=0, vmax=1)
        ax.scatter(*case.landmarks.T, s=14, c="lime", label="true")
        ax.scatter(*p.T, s=14, c="red", marker="x", label="predicted")
        ax.set_title(case.case_id)
        ax.axis("off")
    axes.ravel()[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


NEGATIVES = ("rotated_90", "rotated_180", "rotated_270", "upside_down", "mirrored", "inverted", "lower_half",
             "upper_half", "lateral_like", "non_chest", "blank", "noise")


def make_negative(img: np.ndarray, kind: str, rng: np.random.Generator,
                  non_chest: list[np.ndarray] | None = None) -> np.ndarray:
    """Images that are not a frontal chest film, built from one: what the gate must refuse.

    ``non_chest`` kind: a random crop (60-100 %), quarter turn and flip of one of the given
    non-chest radiographs (the frontal film itself is not used).
    """
    if kind == "non_chest":
        if not non_chest:
            raise ValueError("the non_chest kind needs non-chest radiographs (calibrate --non-chest)")
        src = non_chest[int(rng.integers(len(non_chest)))]
        h, w = src.shape
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out = np.rot90(src[y0 : y0 + ch, x0 : x0 + cw], int(rng.integers(4)))
        return np.ascontiguousarray(out[:, ::-1] if rng.random() < 0.5 else out)
    if kind == "lateral_like":  # one hemithorax and the spine stretched to the full width
        w = img.shape[1]
        half = img[:, : int(0.55 * w)] if rng.random() < 0.5 else img[:, int(0.45 * w) :]
        return np.clip(ndimage.zoom(half, (1.0, w / half.shape[1]), order=1), 0.0, 1.0).astype(img.dtype)
    if kind == "rotated_180":
        return np.ascontiguousarray(img[::-1, ::-1])
    if kind == "rotated_90":
        return np.ascontiguousarray(np.rot90(img))
    if kind == "rotated_270":
        return np.ascontiguousarray(np.rot90(img, -1))
    if kind == "upside_down":
        return np.ascontiguousarray(img[::-1])
    if kind == "mirrored":  # left-right flipped: a viewer cannot tell, the left/right ROIs can
        return np.ascontiguousarray(img[:, ::-1])
    if kind == "inverted":
        return 1.0 - img
    if kind == "lower_half":  # an abdomen-like field: no clavicles, no apices
        return np.ascontiguousarray(img[img.shape[0] // 2 :])
    if kind == "upper_half":  # neck and apices only: no rib-cage bases, no T12
        return np.ascontiguousarray(img[: img.shape[0] // 2])
    if kind == "blank":
        return np.full_like(img, 0.5)
    if kind == "noise":
        return rng.random(img.shape).astype(np.float32)
    raise ValueError(f"unknown negative kind {kind!r}")


def _spread(rows: list[dict], kind: str, key: str) -> dict:
    v = np.array([r[key] for r in rows if r["kind"] == kind and r[key] is not None], dtype=float)
    if v.size == 0:
        return {"min": math.nan, "p05": math.nan, "p95": math.nan, "max": math.nan}
    return {"min": float(v.min()), "p05": float(np.percentile(v, 5)), "p95": float(np.percentile(v, 95)), "max": float(v.max())}


def _heart_sides(rows: list[dict], kind: str) -> np.ndarray:
    """Heart-side contrast of one kind's inputs, leaving out those where a zone was off the image."""
    return np.array([r["heart_side"] for r in rows if r["kind"] == kind and r["heart_side"] is not None])


def default_non_chest_files() -> list[Path]:
    """The real non-chest radiograph in pydicom-data (a CR of the lower leg), if installed."""
    try:
        from pydicom.data import get_testdata_file

        path = get_testdata_file("RG3_UNCI.dcm", download=False)
    except Exception:  # pydicom-data not installed: the kind is left out, and the table says so
        return []
    return [Path(path)] if path else []


def _one_recipe(settings: dict | None, cfg: object, k: int, cv_dir: str | Path) -> dict:
    """Fold ``k``'s settings, refused unless they are fold 0's (``settings``) but for the fold
    and where it ran: a calibration over folds of several recipes would describe none of them."""
    mine = {**asdict(cfg), "fold": 0, "out_dir": None, "threads": 0}  # type: ignore[call-overload]
    if settings is not None and mine != settings:
        raise ValueError(f"fold {k} in {cv_dir} was trained with other settings than fold 0: not one recipe")
    return mine


def calibrate_confidence(checkpoint: str | Path | None, out_dir: str | Path, dicom_files: list[Path],
                         jsrt_root: str | None = None, non_chest_files: list[Path] | None = None,
                         cv_dir: str | Path | None = None, view_cv_dir: str | Path | None = None,
                         view: str | Path | None = None, flip: bool = False) -> dict:
    """Acceptance by the whole gate of frontal films vs each kind of negative, to set the gate.

    Positives (held out from the detector's training): the JSRT validation split and the
    given frontal DICOM files. Negatives, one of each kind per positive: turned by 90, 180 or
    270 degrees, flipped top to bottom or left to right, inverted, cut to its lower or upper
    half, a lateral-like stretch of one hemithorax, a variant of a non-chest radiograph
    (``non_chest_files``, default pydicom-data's lower-leg CR), blank and noise.

    With ``cv_dir`` (a ``landmarks cv`` run) instead of ``checkpoint``: every JSRT film is
    probed by the fold's detector that never saw it, five times as many films as the fixed
    split holds, by detectors of the same recipe; the DICOM files by fold 0's. With
    ``view_cv_dir`` (a ``view cv`` run on the same folds) each fold's view classifier joins
    its detector; with ``view`` (a classifier checkpoint) it joins the one ``checkpoint``.
    ``flip``: the detectors also run each view mirrored (a bundle's own detector keeps its
    manifest's setting).
    """
    from screener.pipeline.decode import DecodeError, decode_file
    from screener.pipeline.eligibility import (
        EligibilityRules,
        check_film,
        heart_side_contrast,
        lung_and_mediastinum,
        roi_landmark_confidence,
        thorax_aspect,
    )

    if (checkpoint is None) == (cv_dir is None):
        raise ValueError("calibrate needs exactly one of a checkpoint and a cross-validation folder")
    if view_cv_dir is not None and cv_dir is None or view is not None and checkpoint is None:
        raise ValueError("calibrate: a view cv folder goes with a landmark cv folder, a view checkpoint with a detector checkpoint")
    from screener.pipeline.view import ViewClassifier
    from training.view import load_view_checkpoint, view_fold_complete
    rules = EligibilityRules()
    non_chest_files = default_non_chest_files() if non_chest_files is None else non_chest_files
    non_chest = []
    for f in non_chest_files:
        try:
            non_chest.append(decode_file(f).pixels)
        except DecodeError as exc:
            print(f"skipped non-chest {f}: {exc}")
    kinds = ("frontal",) + tuple(k for k in NEGATIVES if k != "non_chest" or non_chest)
    groups: list[tuple[LandmarkDetector, list[JsrtCase]]] = []
    if cv_dir is not None:
        first = Path(cv_dir) / "fold0" / "last.pt"  # last.pt as the cv report: not picked on these films
        if not first.is_file():
            raise FileNotFoundError(f"{first} is missing (run `screener-train landmarks cv` first)")
        folds = load_landmark_checkpoint(first, jsrt_root)[1].folds
        settings = view_settings = None
        for k in range(folds):  # every fold complete and of one recipe, or the table would mix detectors
            fold_dir = Path(cv_dir) / f"fold{k}"
            if not (fold_dir / "last.pt").is_file():
                raise FileNotFoundError(f"fold {k} of {folds} in {cv_dir} is not complete (run `screener-train landmarks cv`)")
            net, cfg = load_landmark_checkpoint(fold_dir / "last.pt", jsrt_root)
            if not fold_complete(fold_dir, cfg.epochs):
                raise ValueError(f"fold {k} in {cv_dir} stopped before its {cfg.epochs} epochs (resume `landmarks cv` first)")
            settings = _one_recipe(settings, cfg, k, cv_dir)
            classifier = None
            if view_cv_dir is not None:
                view_dir = Path(view_cv_dir) / f"fold{k}"
                if not (view_dir / "last.pt").is_file():
                    raise FileNotFoundError(f"fold {k} of {folds} in {view_cv_dir} is missing (run `screener-train view cv --folds {folds}`)")
                view_net, view_cfg = load_view_checkpoint(view_dir / "last.pt")
                if (view_cfg.folds, view_cfg.fold) != (folds, k) or not view_fold_complete(view_dir, view_cfg.epochs):
                    raise ValueError(f"{view_dir} is not a complete fold {k} of {folds}: the view cv must use the landmark cv's folds")
                view_settings = _one_recipe(view_settings, view_cfg, k, view_cv_dir)
                classifier = ViewClassifier(view_net, view_cfg.input_size)
            groups.append((LandmarkDetector(net, cfg.input_size, flip=flip, view=classifier), _split(cfg)[1]))
    else:
        net, cfg = load_landmark_checkpoint(checkpoint, jsrt_root)
        if (Path(checkpoint).parent / "manifest.json").is_file():  # a bundle's weights: its views and spine rule
            from screener.pipeline.bundle import ModelBundle

            detector = ModelBundle.load(Path(checkpoint).parent).detector()
            if flip and not detector.flip:
                raise ValueError(f"calibrate --flip: the bundle of {checkpoint} runs without mirrored views "
                                 "(its manifest's landmarks.flip); export it with --landmark-flip first")
        else:
            detector = LandmarkDetector(net, cfg.input_size, flip=flip)
        if view is not None:
            view_net, view_cfg = load_view_checkpoint(view)
            detector.view = ViewClassifier(view_net, view_cfg.input_size)
        groups.append((detector, _split(cfg)[1]))
    films = []  # (detector, name, image)
    for detector, val in groups:
        films.extend((detector, c.case_id, load_grey_png(c.image_path)) for c in val)
    for f in dicom_files:
        try:
            films.append((groups[0][0], f.name, decode_file(f).pixels))
        except DecodeError as exc:  # one bad file is named and left out, the others still count
            print(f"skipped {f}: {exc}")
    rng = np.random.default_rng(0)
    rows = []
    for detector, name, img in tqdm(films, desc="calibrating", leave=False):
        for kind in kinds:
            probe = img if kind == "frontal" else make_negative(img, kind, rng, non_chest)
            found = detector.detect([probe])[0]
            decision = check_film(probe, found, rules)
            conf = found.confidence
            median = float(np.median(conf))
            aspect = thorax_aspect(found)
            rows.append({"image": name, "kind": kind, "median": median, "min": float(conf.min()), "thorax_aspect": aspect,
                         "turned_ratio": float(found.turned_confidence) / max(median, 1e-9),
                         "roi_min": min(roi_landmark_confidence(found).values()),
                         "heart_side": heart_side_contrast(probe, found),
                         "mediastinum": None if (lm := lung_and_mediastinum(probe, found)) is None else lm[1] - lm[0],
                         "view_frontal": None if found.view is None else found.view.frontal,
                         "eligible": decision.eligible,
                         "code": decision.code})
    negatives = kinds[1:]
    pos = np.array([r["median"] for r in rows if r["kind"] == "frontal"])
    neg = {k: np.array([r["median"] for r in rows if r["kind"] == k]) for k in negatives}
    accepted = {k: float(np.mean([r["eligible"] for r in rows if r["kind"] == k])) for k in kinds}
    summary = {
        "flip": bool(groups[0][0].flip),
        "threshold": rules.min_landmark_confidence,
        "view_threshold": rules.min_view_frontal_probability if rows and rows[0]["view_frontal"] is not None else None,
        "accepted_share": accepted,
        "frontal": {"n": int(pos.size), "min": float(pos.min()), "p05": float(np.percentile(pos, 5)), "median": float(np.median(pos))},
        "negatives": {k: {"n": int(v.size), "max": float(v.max()), "p95": float(np.percentile(v, 95))} for k, v in neg.items()},
        "heart_side": {k: {"p05": float(np.percentile(v, 5)), "median": float(np.median(v)), "p95": float(np.percentile(v, 95))}
                       for k in ("frontal", "mirrored") for v in [_heart_sides(rows, k)]},
        "turned_ratio": {k: _spread(rows, k, "turned_ratio") for k in ("frontal", "upside_down", "rotated_180")},
        "roi_landmark_confidence": {k: _spread(rows, k, "roi_min") for k in kinds},
        "thorax_aspect": {k: _spread(rows, k, "thorax_aspect") for k in ("frontal", "lower_half", "upper_half")},
        "mediastinum_contrast": {k: _spread(rows, k, "mediastinum")
                                 for k in ("frontal", "lateral_like", "upper_half", "mirrored")},
        "view_frontal": {k: _spread(rows, k, "view_frontal") for k in kinds},
        "rows": rows,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "confidence_calibration.json").write_text(json.dumps(summary, indent=2))
    print(f"median landmark confidence per input; 'accepted' = share passing the whole gate "
          f"(confidence >= {rules.min_landmark_confidence}, turned ratio, ROI landmarks, geometry, inversion, heart side, "
          f"view classifier when given)")
    print(f"{'input':<14}{'n':>5}{'min':>8}{'p05':>8}{'median':>8}{'p95':>8}{'max':>8}{'accepted':>10}")
    for k, v in {"frontal": pos, **neg}.items():
        print(f"{k:<14}{v.size:>5}{v.min():>8.3f}{np.percentile(v, 5):>8.3f}{np.median(v):>8.3f}"
              f"{np.percentile(v, 95):>8.3f}{v.max():>8.3f}{100 * accepted[k]:>9.1f}%")
    print(f"\nheart-side contrast (image right minus left beside the midline; the gate wants >= {rules.min_heart_side_contrast:g}, "
          f"or >= {rules.min_heart_side_contrast_with_view:g} with a view classifier)")
    print(f"{'input':<14}{'p05':>8}{'median':>8}{'p95':>8}")
    for k in ("frontal", "mirrored"):
        v = _heart_sides(rows, k)
        print(f"{k:<14}{np.percentile(v, 5):>8.3f}{np.median(v):>8.3f}{np.percentile(v, 95):>8.3f}")
    print(f"\nturned-by-180 confidence over the input's own (the gate refuses >= {rules.max_turned_confidence_ratio:g}) and the "
          f"least sure ROI's landmark confidence (refused < {rules.min_roi_landmark_confidence:g})")
    print(f"{'input':<14}{'ratio min':>10}{'p05':>8}{'p95':>8}{'max':>8}{'roi min':>10}{'p05':>8}")
    for k in kinds:
        t, r_ = _spread(rows, k, "turned_ratio"), _spread(rows, k, "roi_min")
        print(f"{k:<14}{t['min']:>10.3f}{t['p05']:>8.3f}{t['p95']:>8.3f}{t['max']:>8.3f}{r_['min']:>10.3f}{r_['p05']:>8.3f}")
    print(f"\nthorax aspect, cervical-to-T12 over the 40 % rib-cage width (the gate wants {rules.min_thorax_aspect:g} to {rules.max_thorax_aspect:g})")
    print(f"{'input':<14}{'min':>8}{'p05':>8}{'p95':>8}{'max':>8}")
    for k, v in summary["thorax_aspect"].items():
        print(f"{k:<14}{v['min']:>8.3f}{v['p05']:>8.3f}{v['p95']:>8.3f}{v['max']:>8.3f}")
    print(f"\nmediastinum minus lung fields (display values; the gate wants >= {rules.min_mediastinum_contrast:g})")
    print(f"{'input':<14}{'min':>8}{'p05':>8}{'p95':>8}{'max':>8}")
    for k, v in summary["mediastinum_contrast"].items():
        print(f"{k:<14}{v['min']:>8.3f}{v['p05']:>8.3f}{v['p95']:>8.3f}{v['max']:>8.3f}")
    if summary["view_threshold"] is not None:
        print(f"\nview classifier's P(frontal) (the gate wants >= {rules.min_view_frontal_probability:g})")
        print(f"{'input':<14}{'min':>8}{'p05':>8}{'p95':>8}{'max':>8}")
        for k, v in summary["view_frontal"].items():
            print(f"{k:<14}{v['min']:>8.3f}{v['p05']:>8.3f}{v['p95']:>8.3f}{v['max']:>8.3f}")
    if "non_chest" not in kinds:
        print("non_chest: no non-chest radiograph given (--non-chest) and pydicom-data not installed: kind left out")
    for r in rows:
        if r["kind"] == "frontal" and not r["eligible"] or r["kind"] != "frontal" and r["eligible"]:
            print(f"  {r['kind']} {'refused' if r['kind'] == 'frontal' else 'accepted'}: {r['image']}: {r['code']}")
    return summary


def prediction_sheet(files: list[Path], out_path: str | Path, bundle: str | Path | None = None) -> list[dict]:
    """One panel per DICOM file: the film, the 16 predicted points, the six ROI boxes and the
    gate's decision, as the node would run them (a bundle's detector; the demo's by default).

    For looking at the detector on films from other vendors by eye; returns one row per file
    (name, decision code, median confidence) and writes the sheet as a PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from screener.pipeline.bundle import ModelBundle
    from screener.pipeline.decode import DecodeError, decode_file
    from screener.pipeline.eligibility import check_film
    from screener.pipeline.rois import LOCAL_ROI_NAMES, roi_boxes

    detector = ModelBundle.load(bundle).detector()
    panels, rows = [], []
    for f in files:
        try:
            pixels = decode_file(f).pixels
        except DecodeError as exc:
            rows.append({"file": Path(f).name, "code": exc.code.value, "median_confidence": None, "view_frontal": None})
            continue
        found = detector.detect([pixels])[0]
        decision = check_film(pixels, found)
        rows.append({"file": Path(f).name, "code": decision.code.value, "median_confidence": float(np.median(found.confidence)),
                     "view_frontal": None if found.view is None else found.view.frontal})
        panels.append((Path(f).name, pixels, found, decision))
    cols = min(3, max(1, len(panels)))
    n_rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(5.5 * cols, 6 * n_rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, pixels, found, decision) in zip(axes.ravel(), panels):
        ax.imshow(pixels, cmap="gray", vmin=0, vmax=1)
        try:
            boxes = roi_boxes(found, pixels.shape)
        except ValueError:
            boxes = {}
        for roi in LOCAL_ROI_NAMES:
            if roi in boxes:
                corners = boxes[roi].corners()
                ax.plot(*np.vstack([corners, corners[:1]]).T, lw=1.0, color="orange" if decision.eligible else "grey")
        ax.scatter(*found.points.T, s=14, c=found.confidence, cmap="RdYlGn", vmin=0, vmax=0.5, edgecolors="black", linewidths=0.3)
        view = "" if found.view is None else f", frontal {found.view.frontal:.2f}"
        ax.set_title(f"{name}\n{decision.code.value} (median confidence {np.median(found.confidence):.2f}{view})", fontsize=9)
    fig.suptitle("landmarks (colour = confidence, red low) and ROIs; orange boxes = eligible", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    plt.close(fig)
    return rows
