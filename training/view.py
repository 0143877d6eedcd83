"""Train and cross-validate the view classifier (screener.pipeline.view) on JSRT.

Every training film gives, each epoch, itself (frontal) and one generated negative of a
kind in :data:`VIEW_KINDS` (the gate calibration's generators, ``make_negative``), both
through the landmark training's augmentation functions: a vendor-like intensity rendering
first, then a random scale, rotation (within 12 degrees) and shift of the letterboxed input.
The films are shrunk to 256 pixels first (``source_size``) for speed, so the rendering's
blur and noise act at twice the scale they have in the landmark training; validation and
the cross-validation score the full-size films, as the node sees them. A film
flipped left to right is the hardest kind, so it is drawn more often than the others.

Folds are the landmark cross-validation's (``training.jsrt.fold_ids``), so that
``landmarks calibrate --cv-dir ... --view-cv-dir ...`` probes every film with a detector and
a classifier that both never saw it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from screener.pipeline.estimate import cpu_has_fast_bf16
from screener.pipeline.geometry import Pyramid
from screener.pipeline.landmarks import landmark_input, normalise_crop
from screener.pipeline.view import VIEW_INPUT_SIZE, VIEW_KINDS, ViewClassifier, ViewNet
from training.common import check_resumable, load_checkpoint, load_grey_png, save_checkpoint, seed_everything
from training.jsrt import JsrtCase, split_cases
from training.landmarks import augment_intensity, make_negative, random_box

__all__ = ["ViewTrainConfig", "train_view", "cross_validate_view", "load_view_checkpoint", "view_probabilities"]

#: Thresholds on P(frontal) the cross-validation report tabulates.
REPORT_THRESHOLDS = (0.1, 0.2, 0.3, 0.5, 0.7)


@dataclass
class ViewTrainConfig:
    jsrt_root: str | None = None
    out_dir: str = "runs/view"
    input_size: int = VIEW_INPUT_SIZE
    width: int = 16
    epochs: int = 40
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    seed: int = 0
    threads: int = 0
    #: share of the negatives that are mirrored films (the rest spread evenly over the kinds)
    mirrored_share: float = 0.3
    folds: int = 0  # > 0: train on all folds but ``fold`` (a cross-validation run)
    fold: int = 0
    # bf16 autocast + channels-last on a CPU with AMX (2.5x faster per step here); the loss stays fp32
    amp: bool = field(default_factory=cpu_has_fast_bf16)
    #: films are shrunk to this longest side before augmentation: the input is 128 pixels,
    #: and rendering 512-pixel films would cost more than the network's step
    source_size: int = 256


def _split(config: ViewTrainConfig) -> tuple[list[JsrtCase], list[JsrtCase]]:
    return split_cases(config.jsrt_root, config.folds, config.fold, config.val_fraction)


def _shrunk(img: np.ndarray, size: int) -> np.ndarray:
    scale = size / max(img.shape)
    return img if scale >= 1.0 else np.clip(ndimage.zoom(img, scale, order=1), 0.0, 1.0).astype(np.float32)


def _kind_weights(mirrored_share: float) -> np.ndarray:
    if not 0.0 < mirrored_share < 1.0:
        raise ValueError(f"mirrored_share must be between 0 and 1, got {mirrored_share}")
    others = len(VIEW_KINDS) - 2
    w = np.full(len(VIEW_KINDS), (1.0 - mirrored_share) / others)
    w[0], w[VIEW_KINDS.index("mirrored")] = 0.0, mirrored_share
    return w


def _sample(img: np.ndarray, kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    rendered = augment_intensity(img, rng)
    probe = rendered if kind == "frontal" else make_negative(rendered, kind, rng)
    crop, _ = landmark_input(Pyramid(probe), size, random_box(rng, *probe.shape))
    return normalise_crop(crop)


def make_view_batch(images: list[np.ndarray], size: int, rng: np.random.Generator,
                    weights: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Each film as itself and as one negative of a random kind, augmented."""
    xs, ys = [], []
    for img in images:
        for k in (0, int(rng.choice(len(VIEW_KINDS), p=weights))):
            xs.append(_sample(img, VIEW_KINDS[k], size, rng))
            ys.append(k)
    return torch.from_numpy(np.stack(xs))[:, None], torch.tensor(ys)


def view_probabilities(classifier: ViewClassifier, images: list[np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """P(frontal) of each film as itself and as each negative kind (no augmentation;
    the negatives drawn with a fixed seed, so every run scores the same inputs)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {k: [] for k in VIEW_KINDS}
    for img in images:
        probes = [img if k == "frontal" else make_negative(img, k, rng) for k in VIEW_KINDS]
        for k, s in zip(VIEW_KINDS, classifier.classify(probes)):
            out[k].append(s.frontal)
    return {k: np.array(v) for k, v in out.items()}


def _acceptance(probs: dict[str, np.ndarray], threshold: float) -> dict[str, float]:
    return {k: float(np.mean(v >= threshold)) for k, v in probs.items()}


def train_view(config: ViewTrainConfig, resume: bool = False) -> dict:
    """Train; checkpoint after every epoch to out_dir/last.pt (the weights that are shipped
    and cross-validated: no selection on the validation films)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, val = _split(config)
    images = {c.case_id: _shrunk(load_grey_png(c.image_path), config.source_size) for c in train}
    val_images = [load_grey_png(c.image_path) for c in val]  # full size, as the node and the cv see them
    weights = _kind_weights(config.mirrored_share)
    net = ViewNet(width=config.width)
    if config.amp:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = math.ceil(len(train) / (config.batch_size // 2))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * steps, pct_start=0.15)
    start, history = 0, []
    if resume and (out / "last.pt").exists():
        state = load_checkpoint(out / "last.pt")
        check_resumable({**state["config"], "epochs": 0}, {**asdict(config), "epochs": 0})
        if state["config"]["epochs"] != config.epochs:
            raise ValueError(f"cannot --resume with epochs {config.epochs}: the run's schedule was built for {state['config']['epochs']}")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history = state["epoch"], state["history"]
    rng = np.random.default_rng(config.seed + start)
    for epoch in range(start, config.epochs):
        net.train()
        order = rng.permutation(len(train))
        losses = []
        bar = tqdm(range(steps), desc=f"view epoch {epoch + 1}/{config.epochs}", leave=False)
        for step in bar:
            idx = order[step * (config.batch_size // 2) : (step + 1) * (config.batch_size // 2)]
            x, y = make_view_batch([images[train[i].case_id] for i in idx], config.input_size, rng, weights)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.amp):
                logits = net(x.contiguous(memory_format=torch.channels_last) if config.amp else x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        record: dict = {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}
        if val and (epoch + 1 == config.epochs or (epoch + 1) % 5 == 0):
            probs = view_probabilities(ViewClassifier(net, config.input_size), val_images)
            record["val_accepted_at_0.5"] = _acceptance(probs, 0.5)
        history.append(record)
        tqdm.write(json.dumps(record))
        save_checkpoint(out / "last.pt", {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                          "epoch": epoch + 1, "history": history, "config": asdict(config)})
    (out / "history.json").write_text(json.dumps(history, indent=2))
    return {"history": history}


def load_view_checkpoint(path: str | Path) -> tuple[ViewNet, ViewTrainConfig]:
    """The classifier (eval mode) and its settings, from a training checkpoint or from a model
    bundle's view.pt (its weights only, with the width and input size in the manifest.json
    beside it), so a bundle can be exported again with the classifier it ships."""
    state = load_checkpoint(path)
    if "config" not in state:
        manifest = Path(path).parent / "manifest.json"
        if not manifest.is_file():
            raise ValueError(f"{path}: neither a training checkpoint (no 'config') nor a bundle's weights (no manifest.json beside it)")
        from screener.pipeline.bundle import ModelBundle

        bundle = ModelBundle.load(Path(path).parent)  # every check of the bundle: checksums, kinds
        spec = bundle.manifest.get("view")
        if bundle.view_net is None or not spec or spec["weights"] != Path(path).name:
            raise ValueError(f"{path}: not the view classifier of the bundle in {Path(path).parent} (it has "
                             f"{'none' if not spec else spec['weights']})")
        return bundle.view_net.float().eval(), ViewTrainConfig(input_size=int(spec["input_size"]), width=int(spec["width"]))
    config = ViewTrainConfig(**state["config"])
    net = ViewNet(width=config.width)
    net.load_state_dict(state["model"])
    return net.eval(), config


def view_fold_complete(fold_dir: Path, epochs: int) -> bool:
    try:
        return load_checkpoint(fold_dir / "last.pt")["epoch"] >= epochs
    except (FileNotFoundError, KeyError, OSError):
        return False


def cross_validate_view(config: ViewTrainConfig, folds: int = 5, resume: bool = True) -> dict:
    """Train one classifier per fold (resuming unfinished folds) and report, per kind, the
    share of held-out inputs whose P(frontal) reaches each of :data:`REPORT_THRESHOLDS`."""
    out = Path(config.out_dir)
    probs: dict[str, list[np.ndarray]] = {k: [] for k in VIEW_KINDS}
    names: list[str] = []
    for k in range(folds):
        cfg = ViewTrainConfig(**{**asdict(config), "folds": folds, "fold": k, "out_dir": str(out / f"fold{k}")})
        if view_fold_complete(Path(cfg.out_dir), cfg.epochs):  # a fold of other settings is not this recipe's
            saved = load_checkpoint(Path(cfg.out_dir) / "last.pt")["config"]
            check_resumable({**saved, "jsrt_root": None, "out_dir": None, "threads": 0},
                            {**asdict(cfg), "jsrt_root": None, "out_dir": None, "threads": 0})
        else:
            train_view(cfg, resume=resume)
        net, _ = load_view_checkpoint(Path(cfg.out_dir) / "last.pt")
        val = _split(cfg)[1]
        p = view_probabilities(ViewClassifier(net, cfg.input_size), [load_grey_png(c.image_path) for c in val], seed=k)
        for kind in VIEW_KINDS:
            probs[kind].append(p[kind])
        names.extend(c.case_id for c in val)
    joined = {k: np.concatenate(v) for k, v in probs.items()}
    report = {
        "folds": folds,
        "n": len(names),
        "accepted": {f"{t:g}": _acceptance(joined, t) for t in REPORT_THRESHOLDS},
        "frontal_p05": float(np.percentile(joined["frontal"], 5)),
        "lowest_frontal": sorted(zip(joined["frontal"].tolist(), names))[:5],
        "highest_mirrored": sorted(zip(joined["mirrored"].tolist(), names), reverse=True)[:5],
        "highest_upper_half": sorted(zip(joined["upper_half"].tolist(), names), reverse=True)[:5],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "cv_view.json").write_text(json.dumps(report, indent=2))
    lines = [f"view classifier, {folds}-fold cross-validation on {len(names)} JSRT films: share with P(frontal) >= threshold",
             f"{'input':<14}" + "".join(f"{'>= ' + format(t, 'g'):>10}" for t in REPORT_THRESHOLDS)]
    for kind in VIEW_KINDS:
        lines.append(f"{kind:<14}" + "".join(f"{100 * report['accepted'][f'{t:g}'][kind]:>9.1f}%" for t in REPORT_THRESHOLDS))
    (out / "cv_view.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report
