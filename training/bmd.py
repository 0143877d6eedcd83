"""Train and evaluate the multi-ROI BMD network from a site's CSV manifest.

Manifest columns (header row required; paths relative to the CSV's folder):

=============  =========================================================================
image          DICOM file or grey PNG of a frontal chest radiograph
L1 L2 L3 L4    DXA BMD of each vertebra in g/cm2
sex            M or F (blank allowed: no T-score for that case in evaluation)
age            years (used for the training summary only)
patient_id     optional; splits are by patient (by image when absent)
split          optional; train / val / test, overrides the hashed split
landmarks      optional; 32 numbers "x0 y0 x1 y1 ..." in source pixels (else detected)
=============  =========================================================================

ROI crops are extracted once per image and cached next to the run (``crops.pt``); training
augments the cached crops (scale, rotation, translation, horizontal flip), as the paper did.
Defaults are the paper's: VGG16, SGD lr 1e-4, weight decay 4e-4, batch 64, 100 epochs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from screener.pipeline.decode import decode_file
from screener.pipeline.landmarks import NUM_LANDMARKS, LandmarkDetector, Landmarks, normalise_crop
from screener.pipeline.model import Ensemble, MultiRoiConfig, MultiRoiNet, multi_roi_loss
from screener.pipeline.rois import ROI_NAMES, extract_rois
from screener.pipeline.tscore import VERTEBRAE, ReferenceTable
from training.common import check_resumable, load_checkpoint, save_checkpoint, seed_everything

__all__ = ["ManifestRow", "read_manifest", "assign_split", "BmdTrainConfig", "train_bmd", "evaluate_bmd", "prepare_crops"]


@dataclass(frozen=True)
class ManifestRow:
    image: Path
    bmd: tuple[float, float, float, float]
    sex: str | None
    age: float | None
    patient_id: str
    split: str | None
    landmarks: np.ndarray | None = field(default=None, compare=False)


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Parse and validate the manifest; errors name the line and the column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    rows: list[ManifestRow] = []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"image", *VERTEBRAE} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: manifest lacks column(s) {sorted(missing)}; required: image, L1, L2, L3, L4")
        for line, rec in enumerate(reader, start=2):
            where = f"{path}:{line}"
            image = (path.parent / rec["image"].strip()).resolve()
            if not image.is_file():
                raise ValueError(f"{where}: column image: file {image} not found")
            try:
                bmd = tuple(float(rec[v]) for v in VERTEBRAE)
            except ValueError as exc:
                raise ValueError(f"{where}: columns L1-L4 must be numbers in g/cm2 ({exc})") from exc
            if not all(0.1 < b < 3.0 for b in bmd):
                raise ValueError(f"{where}: columns L1-L4 {bmd} outside 0.1-3.0 g/cm2: are they in g/cm2?")
            sex = (rec.get("sex") or "").strip().upper()[:1] or None
            if sex not in (None, "M", "F"):
                raise ValueError(f"{where}: column sex must be M, F or blank, got {rec['sex']!r}")
            age_text = (rec.get("age") or "").strip()
            split = (rec.get("split") or "").strip().lower() or None
            if split not in (None, "train", "val", "test"):
                raise ValueError(f"{where}: column split must be train, val, test or blank, got {split!r}")
            lm_text = (rec.get("landmarks") or "").strip()
            landmarks = None
            if lm_text:
                values = np.array(lm_text.split(), dtype=float)
                if values.size != 2 * NUM_LANDMARKS:
                    raise ValueError(f"{where}: column landmarks needs {2 * NUM_LANDMARKS} numbers, got {values.size}")
                landmarks = values.reshape(NUM_LANDMARKS, 2)
            rows.append(
                ManifestRow(
                    image=image,
                    bmd=bmd,  # type: ignore[arg-type]
                    sex=sex,
                    age=float(age_text) if age_text else None,
                    patient_id=(rec.get("patient_id") or "").strip() or rec["image"].strip(),
                    split=split,
                    landmarks=landmarks,
                )
            )
    if not rows:
        raise ValueError(f"{path}: manifest has no rows")
    return rows


def assign_split(row: ManifestRow, val_fraction: float, test_fraction: float = 0.0) -> str:
    """Deterministic by-patient split: a hash of the patient id, same on every machine."""
    if row.split:
        return row.split
    u = int(hashlib.sha256(row.patient_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


@dataclass
class BmdTrainConfig:
    manifest: str = ""
    out_dir: str = "runs/bmd"
    backbone: str = "vgg16"
    head: str = "concat"
    rois: tuple[str, ...] = ROI_NAMES
    roi_size: int = 256
    optimizer: str = "sgd"
    schedule: str = "constant"  # constant (paper) or cosine (decay to 0: settles BatchNorm statistics)
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 4e-4
    batch_size: int = 64
    epochs: int = 100
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0
    landmarks_from: str = ""  # bundle dir or landmark checkpoint, for rows without landmarks
    threads: int = 0
    init_weights: str = ""  # optional local backbone weights (e.g. ImageNet) to start from

    def model_config(self) -> MultiRoiConfig:
        return MultiRoiConfig(backbone=self.backbone, rois=tuple(self.rois), head=self.head, roi_size=self.roi_size)


def _load_detector(source: str) -> LandmarkDetector:
    from screener.pipeline.bundle import ModelBundle
    from training.landmarks import load_landmark_checkpoint

    p = Path(source) if source else None
    if p is None or p.is_dir():
        return ModelBundle.load(p).detector(with_view=False)  # crops need only the points
    net, cfg = load_landmark_checkpoint(p)
    return LandmarkDetector(net, cfg.input_size, check_turned=False)  # crops never need the turned score


def _detector_identity(source: str) -> str:
    """What decides the detected landmarks: the bundle's model id or the checkpoint's bytes."""
    from screener.pipeline.bundle import ModelBundle, sha256_file

    p = Path(source) if source else None
    if p is None or p.is_dir():
        return ModelBundle.load(p).model_id  # covers the manifest's views and spine rule
    from screener.pipeline.landmarks import EXTENT_RULE, SPINE_FROM_RULE

    # a checkpoint runs with the detector's defaults: they move the derived points, so they key too
    return f"{sha256_file(p)}:views=1:spine_rule={sorted(SPINE_FROM_RULE.items())}:extent_rule={sorted(EXTENT_RULE.items())}"


def prepare_crops(rows: list[ManifestRow], roi_size: int, landmarks_from: str, cache: Path | None) -> torch.Tensor:
    """(N, 7, S, S) float16 crops of every ROI, in ROI_NAMES order; cached in ``cache``.

    The cache key covers everything the crops depend on: each image's path, size and mtime,
    given landmarks, the detector that finds the others, the ROI recipe and size, and the
    software version. A cache that does not match, or cannot be read, is rebuilt.
    """
    import screener
    from screener.pipeline.rois import IMAGE_STRETCH, ROI_RECIPE

    needs_detector = any(r.landmarks is None for r in rows)
    parts = [[str(r.image), r.image.stat().st_size, r.image.stat().st_mtime_ns,
              None if r.landmarks is None else r.landmarks.round(3).tolist()] for r in rows]
    parts.append([roi_size, ROI_RECIPE, list(IMAGE_STRETCH), screener.__version__,
                  _detector_identity(landmarks_from) if needs_detector else None])
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    if cache is not None and cache.exists():
        try:
            stored = torch.load(cache, weights_only=True)
            if stored.get("key") == key:
                return stored["crops"]
        except Exception:  # an interrupted write or another format: rebuild
            pass
    detector = _load_detector(landmarks_from) if needs_detector else None
    crops = torch.empty((len(rows), len(ROI_NAMES), roi_size, roi_size), dtype=torch.float16)
    for i, row in enumerate(tqdm(rows, desc="extracting ROIs", leave=False)):
        img = decode_file(row.image).pixels
        if row.landmarks is not None:
            lm = Landmarks(points=row.landmarks, confidence=np.ones(NUM_LANDMARKS))
        else:
            assert detector is not None
            lm = detector.detect([img])[0]
        crops[i] = torch.from_numpy(extract_rois(img, lm, roi_size).crops).half()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(cache, {"key": key, "crops": crops})
    return crops


def augment_crops(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random scale (0.9-1.1), rotation (+-10 deg), translation (+-5 %) and h-flip per crop (the paper's)."""
    n = x.shape[0] * x.shape[1]
    flat = x.flatten(0, 1).unsqueeze(1)
    scale = torch.empty(n).uniform_(0.9, 1.1, generator=gen)
    angle = torch.empty(n).uniform_(-math.pi / 18, math.pi / 18, generator=gen)
    shift = torch.empty(n, 2).uniform_(-0.05, 0.05, generator=gen)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
    # Nearest, not bilinear: the crop was already resampled once from the source; a second
    # bilinear pass low-passes fine bone texture, so the network would learn a smoothed texture
    # level it never sees at inference (on the synthetic benchmark this biased predictions by
    # -0.26 g/cm2 while r stayed 0.94). Nearest keeps texture amplitude, moves pixels only.
    out = F.grid_sample(flat, grid, mode="nearest", padding_mode="reflection", align_corners=False)
    return out.view_as(x)


def _subset(crops: torch.Tensor, rois: tuple[str, ...]) -> torch.Tensor:
    return crops[:, [ROI_NAMES.index(r) for r in rois]]


def _optimizer(config: BmdTrainConfig, net: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer must be sgd or adamw, got {config.optimizer!r}")


def _scheduler(config: BmdTrainConfig, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch learning-rate schedule."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, config.epochs))
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    raise ValueError(f"schedule must be constant or cosine, got {config.schedule!r}")


def _split_rows(config: BmdTrainConfig, rows: list[ManifestRow]) -> dict[str, list[int]]:
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, r in enumerate(rows):
        splits[assign_split(r, config.val_fraction, config.test_fraction)].append(i)
    return splits


def train_bmd(config: BmdTrainConfig, resume: bool = False) -> dict:
    """Train; last.pt after every epoch (resumable), best.pt on validation loss."""
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_manifest(config.manifest)
    splits = _split_rows(config, rows)
    if not splits["train"]:
        raise ValueError("no training rows after the split: check the manifest's split column and --val-fraction")
    crops = prepare_crops(rows, config.roi_size, config.landmarks_from, out / "crops.pt")
    crops = _subset(crops, tuple(config.rois))
    labels = torch.tensor([r.bmd for r in rows], dtype=torch.float32)
    train_idx = torch.tensor(splits["train"])
    val_idx = torch.tensor(splits["val"])
    net = MultiRoiNet(config.model_config())
    if config.init_weights:
        missing, _ = net.backbone.load_state_dict(torch.load(config.init_weights, weights_only=True), strict=False)
        print(f"backbone initialised from {config.init_weights} ({len(missing)} tensors not in the file)")
    net.target_mean.copy_(labels[train_idx].mean(dim=0))
    net.target_std.copy_(labels[train_idx].std(dim=0).clamp_min(0.02) if len(train_idx) > 1 else torch.full((4,), 0.15))
    opt = _optimizer(config, net)
    sched = _scheduler(config, opt)
    start, best, history = 0, math.inf, []
    if resume and (out / "last.pt").exists():
        state = load_checkpoint(out / "last.pt")
        check_resumable(state["config"], _config_dict(config))
        if config.schedule == "cosine" and state["config"]["epochs"] != config.epochs:
            raise ValueError(f"cannot --resume a cosine schedule with epochs {config.epochs}: it was built for {state['config']['epochs']}")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, best, history = state["epoch"], state["best"], state["history"]
        print(f"resumed from {out / 'last.pt'} at epoch {start}")
    gen = torch.Generator().manual_seed(config.seed * 1000 + start)
    for epoch in range(start, config.epochs):
        net.train()
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        losses = []
        batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        bar = tqdm(batches, desc=f"bmd epoch {epoch + 1}/{config.epochs}", leave=False)
        for idx in bar:
            x = normalise_crop(augment_crops(crops[idx].float(), gen))
            loss = multi_roi_loss(net(x), labels[idx], net.target_std)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        sched.step()
        val_loss = _eval_loss(net, crops, labels, val_idx) if len(val_idx) else float(np.mean(losses))
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val_loss}
        history.append(record)
        tqdm.write(json.dumps(record))
        improved = val_loss < best
        best = min(best, val_loss)
        # last.pt first: a crash between the two writes then redoes nothing already counted.
        save_checkpoint(
            out / "last.pt",
            {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch + 1, "best": best,
             "history": history, "config": _config_dict(config)},
        )
        if improved:
            save_checkpoint(out / "best.pt", {"model": net.state_dict(), "config": _config_dict(config), "epoch": epoch + 1})
    (out / "history.json").write_text(json.dumps(history, indent=2))
    return {"best_val_loss": best, "history": history}


def _config_dict(config: BmdTrainConfig) -> dict:
    d = asdict(config)
    d["rois"] = list(config.rois)
    return d


@torch.inference_mode()
def _eval_loss(net: MultiRoiNet, crops: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> float:
    net.eval()
    total = 0.0
    for i in range(0, len(idx), 32):
        b = idx[i : i + 32]
        total += multi_roi_loss(net(normalise_crop(crops[b].float())), labels[b], net.target_std).item() * len(b)
    return total / len(idx)


def load_bmd_checkpoint(path: str | Path) -> tuple[MultiRoiNet, dict]:
    state = load_checkpoint(path)
    cfg = state["config"]
    net = MultiRoiNet(MultiRoiConfig(backbone=cfg["backbone"], rois=tuple(cfg["rois"]), head=cfg["head"], roi_size=cfg["roi_size"]))
    net.load_state_dict(state["model"])
    return net.eval(), cfg


@torch.inference_mode()
def predict_crops(model: Ensemble, crops: torch.Tensor, batch: int = 32) -> np.ndarray:
    preds = [model(normalise_crop(crops[i : i + batch].float()), ROI_NAMES) for i in range(0, len(crops), batch)]
    return torch.cat(preds).double().numpy()


def evaluate_bmd(
    checkpoints: list[str], manifest: str, out_dir: str, split: str = "val", landmarks_from: str = "",
    table: ReferenceTable | None = None, title: str = "",
) -> dict:
    """Metrics JSON, the papers' table and plots for one model or an ensemble of several."""
    from training.metrics import bmd_metrics, papers_table, save_plots, to_json

    nets, cfgs = zip(*(load_bmd_checkpoint(c) for c in checkpoints))
    sizes = {c["roi_size"] for c in cfgs}
    if len(sizes) != 1:
        raise ValueError(f"ensemble members must share roi_size, got {sorted(sizes)}")
    first = cfgs[0]
    config = BmdTrainConfig(manifest=manifest, val_fraction=first["val_fraction"], test_fraction=first.get("test_fraction", 0.0))
    rows = read_manifest(manifest)
    idx = _split_rows(config, rows)[split]
    if not idx:
        raise ValueError(f"split {split!r} of {manifest} is empty")
    sel = [rows[i] for i in idx]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    crops = prepare_crops(sel, sizes.pop(), landmarks_from or first.get("landmarks_from", ""), out / f"crops_{split}.pt")
    pred = predict_crops(Ensemble(list(nets)).eval(), crops)
    true = np.array([r.bmd for r in sel])
    table = table or ReferenceTable.default()
    sexes = [r.sex for r in sel]
    metrics = bmd_metrics(pred, true, sexes, table)
    metrics["models"] = [{"checkpoint": str(c), "backbone": k["backbone"], "head": k["head"], "rois": k["rois"]} for c, k in zip(checkpoints, cfgs)]
    metrics["split"] = split
    (out / "metrics.json").write_text(to_json(metrics))
    text = papers_table(metrics)
    (out / "table.txt").write_text(text + "\n")
    print(text)
    save_plots(pred, true, sexes, table, out, title=title)
    np.savetxt(out / "predictions.csv", np.column_stack([pred, true]), delimiter=",",
               header="pred_L1,pred_L2,pred_L3,pred_L4,true_L1,true_L2,true_L3,true_L4", comments="")
    return metrics


def summarise_manifest(path: str | Path, label_source: str) -> dict:
    """What a bundle's manifest says about its training data (no identifiers)."""
    rows = read_manifest(path)
    ages = [r.age for r in rows if r.age is not None]
    bmd = np.array([r.bmd for r in rows])
    return {
        "label_source": label_source,
        "images": len(rows),
        "patients": len({r.patient_id for r in rows}),
        "sex": {s: sum(1 for r in rows if r.sex == s) for s in ("F", "M")} | {"unknown": sum(1 for r in rows if r.sex is None)},
        "age_years": {"min": min(ages), "median": float(np.median(ages)), "max": max(ages)} if ages else None,
        "bmd_g_cm2": {"mean": [round(float(v), 4) for v in bmd.mean(axis=0)], "min": round(float(bmd.min()), 4), "max": round(float(bmd.max()), 4)},
    }
