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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from screener.pipeline.geometry import OrientedBox, Pyramid, letterbox_box
from screener.pipeline.landmarks import (
    LANDMARK_NAMES,
    LandmarkDetector,
    LandmarkNet,
    landmark_input,
    normalise_crop,
    soft_argmax,
)
from training.common import check_resumable, load_checkpoint, load_grey_png, save_checkpoint, seed_everything
from training.jsrt import PIXEL_MM, JsrtCase, load_jsrt, split_ids

__all__ = ["LandmarkTrainConfig", "train_landmarks", "evaluate_landmarks"]


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
    cases: list[JsrtCase], images: dict[str, np.ndarray], size: int, stride: int, rng: np.random.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for case in cases:
        img = images[case.case_id]
        if rng is not None:
            img = augment_intensity(img, rng)
            box = random_box(rng, *img.shape)
        else:
            box = None
        crop, box = landmark_input(Pyramid(img), size, box)
        crop_pts = box.source_to_crop(case.landmarks, size)
        xs.append(normalise_crop(crop))
        ys.append((crop_pts - (stride - 1) / 2.0) / stride)
    return torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(ys)).float()


def _split(config: LandmarkTrainConfig) -> tuple[list[JsrtCase], list[JsrtCase]]:
    cases = load_jsrt(config.jsrt_root)
    train_ids, val_ids = split_ids([c.case_id for c in cases], config.val_fraction)
    by_id = {c.case_id: c for c in cases}
    train = [by_id[i] for i in train_ids]
    if config.limit:
        train = train[: config.limit]
    return train, [by_id[i] for i in val_ids]


def train_landmarks(config: LandmarkTrainConfig, resume: bool = False) -> dict:
    """Train; checkpoints after every epoch to out_dir/last.pt, best on validation MRE to best.pt."""
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, val = _split(config)
    images = {c.case_id: load_grey_png(c.image_path) for c in train + val}
    stride = 4
    net = LandmarkNet(width=config.width)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.1
    )
    start_epoch, best, history = 0, math.inf, []
    if resume and (out / "last.pt").exists():
        state = load_checkpoint(out / "last.pt")
        # epochs too: the one-cycle schedule's length is fixed by it
        check_resumable({**state["config"], "epochs": 0}, {**asdict(config), "epochs": 0})
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
            x, y = make_batch([train[i] for i in idx], images, config.input_size, stride, rng)
            loss = landmark_loss(net(x), y, config.heatmap_sigma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        metrics = mean_radial_error(LandmarkDetector(net, config.input_size), val, images)
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
    return {
        "mre_mm": float(err_mm.mean()),
        "median_mm": float(np.median(err_mm)),
        "per_landmark_mm": {n: float(e) for n, e in zip(LANDMARK_NAMES, err_mm.mean(axis=0))},
        "within_10mm": float((err_mm <= 10.0).mean()),
        "mean_confidence": float(np.mean(confs)),
        "n_images": len(cases),
        "_pred": pred,
        "_conf": np.stack(confs),
    }


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
        cfg = LandmarkTrainConfig(jsrt_root=jsrt_root, input_size=int(spec["input_size"]), width=int(spec["width"]))
        weights = state
    else:
        cfg = LandmarkTrainConfig(**{**state["config"], "jsrt_root": jsrt_root or state["config"].get("jsrt_root")})
        weights = state["model"]
    net = LandmarkNet(width=cfg.width)
    net.load_state_dict(weights)
    return net.eval(), cfg


def evaluate_landmarks(checkpoint: str | Path, out_dir: str | Path, jsrt_root: str | None = None) -> dict:
    """Validation-split MRE table (printed, JSON) and a PNG of predicted vs true points."""
    net, cfg = load_landmark_checkpoint(checkpoint, jsrt_root)
    _, val = _split(cfg)
    images = {c.case_id: load_grey_png(c.image_path) for c in val}
    t0 = time.perf_counter()
    metrics = mean_radial_error(LandmarkDetector(net, cfg.input_size), val, images)
    elapsed = time.perf_counter() - t0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred = metrics.pop("_pred")
    metrics.pop("_conf")
    metrics["seconds_per_image_cpu"] = elapsed / len(val)
    (out / "landmark_metrics.json").write_text(json.dumps(metrics, indent=2))
    lines = [f"{'landmark':<26}{'MRE (mm)':>10}"]
    lines += [f"{n:<26}{v:>10.2f}" for n, v in metrics["per_landmark_mm"].items()]
    lines.append(f"{'overall':<26}{metrics['mre_mm']:>10.2f}")
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


NEGATIVES = ("rotated_90", "rotated_270", "upside_down", "mirrored", "inverted", "lower_half", "upper_half",
             "blank", "noise")


def make_negative(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Images that are not a frontal chest film, built from one: what the gate must refuse."""
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


def _heart_sides(rows: list[dict], kind: str) -> np.ndarray:
    """Heart-side contrast of one kind's inputs, leaving out those where a zone was off the image."""
    return np.array([r["heart_side"] for r in rows if r["kind"] == kind and r["heart_side"] is not None])


def calibrate_confidence(checkpoint: str | Path, out_dir: str | Path, dicom_files: list[Path],
                         jsrt_root: str | None = None) -> dict:
    """Median landmark confidence on frontal films vs non-chest negatives, to set the gate.

    Positives: the JSRT validation split and the given frontal DICOM files. Negatives: each
    positive rotated either way, upside down, mirrored, inverted, cut to its lower or upper
    half, plus blank and noise.
    """
    from screener.pipeline.decode import DecodeError, decode_file
    from screener.pipeline.eligibility import EligibilityRules, check_image, check_landmarks, heart_side_contrast

    rules = EligibilityRules()
    net, cfg = load_landmark_checkpoint(checkpoint, jsrt_root)
    detector = LandmarkDetector(net, cfg.input_size)
    _, val = _split(cfg)
    positives = {c.case_id: load_grey_png(c.image_path) for c in val}
    for f in dicom_files:
        try:
            positives[f.name] = decode_file(f).pixels
        except DecodeError as exc:  # one bad file is named and left out, the others still count
            print(f"skipped {f}: {exc}")
    rng = np.random.default_rng(0)
    rows = []
    for name, img in tqdm(positives.items(), desc="calibrating", leave=False):
        for kind in ("frontal",) + NEGATIVES:
            probe = img if kind == "frontal" else make_negative(img, kind, rng)
            found = detector.detect([probe])[0]
            decision = check_landmarks(found, probe.shape, rules)
            if decision.eligible:
                decision = check_image(probe, found, rules)
            conf = found.confidence
            rows.append({"image": name, "kind": kind, "median": float(np.median(conf)), "min": float(conf.min()),
                         "heart_side": heart_side_contrast(probe, found), "eligible": decision.eligible,
                         "code": decision.code})
    pos = np.array([r["median"] for r in rows if r["kind"] == "frontal"])
    neg = {k: np.array([r["median"] for r in rows if r["kind"] == k]) for k in NEGATIVES}
    accepted = {k: float(np.mean([r["eligible"] for r in rows if r["kind"] == k])) for k in ("frontal",) + NEGATIVES}
    summary = {
        "threshold": rules.min_landmark_confidence,
        "accepted_share": accepted,
        "frontal": {"n": int(pos.size), "min": float(pos.min()), "p05": float(np.percentile(pos, 5)), "median": float(np.median(pos))},
        "negatives": {k: {"n": int(v.size), "max": float(v.max()), "p95": float(np.percentile(v, 95))} for k, v in neg.items()},
        "heart_side": {k: {"p05": float(np.percentile(v, 5)), "median": float(np.median(v)), "p95": float(np.percentile(v, 95))}
                       for k in ("frontal", "mirrored") for v in [_heart_sides(rows, k)]},
        "rows": rows,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "confidence_calibration.json").write_text(json.dumps(summary, indent=2))
    print(f"median landmark confidence per input; 'accepted' = share passing the whole gate "
          f"(confidence >= {rules.min_landmark_confidence}, geometry, inversion, heart side)")
    print(f"{'input':<14}{'n':>5}{'min':>8}{'p05':>8}{'median':>8}{'p95':>8}{'max':>8}{'accepted':>10}")
    for k, v in {"frontal": pos, **neg}.items():
        print(f"{k:<14}{v.size:>5}{v.min():>8.3f}{np.percentile(v, 5):>8.3f}{np.median(v):>8.3f}"
              f"{np.percentile(v, 95):>8.3f}{v.max():>8.3f}{100 * accepted[k]:>9.1f}%")
    print(f"\nheart-side contrast (image right minus left beside the midline; the gate wants >= {rules.min_heart_side_contrast:g})")
    print(f"{'input':<14}{'p05':>8}{'median':>8}{'p95':>8}")
    for k in ("frontal", "mirrored"):
        v = _heart_sides(rows, k)
        print(f"{k:<14}{np.percentile(v, 5):>8.3f}{np.median(v):>8.3f}{np.percentile(v, 95):>8.3f}")
    for r in rows:
        if r["kind"] in ("frontal", "mirrored") and r["eligible"] != (r["kind"] == "frontal"):
            print(f"  {r['kind']} {'refused' if r['kind'] == 'frontal' else 'accepted'}: {r['image']}: {r['code']}")
    return summary
