"""`python -m training` / `screener-train`: train, evaluate and export the screening models.

Typical site workflow::

    screener-train landmarks train --jsrt-root ../shared/data/jsrt --out runs/landmarks
    screener-train landmarks evaluate --checkpoint runs/landmarks/best.pt --out runs/landmarks/eval
    screener-train landmarks cv --jsrt-root ../shared/data/jsrt --folds 5 --out runs/landmarks-cv
    screener-train view cv --folds 5 --out runs/view-cv
    screener-train landmarks calibrate --cv-dir runs/landmarks-cv --view-cv-dir runs/view-cv --out runs/calib
    screener-train bmd train --manifest site/manifest.csv --out runs/bmd --landmarks-from BUNDLE_DIR
    screener-train bmd evaluate --checkpoint runs/bmd/best.pt --manifest site/manifest.csv --out runs/bmd/eval
    screener-train export --landmarks runs/landmarks/best.pt --bmd runs/bmd/best.pt --out my-bundle \\
        --name site-bmd --version 1.0.0 --intended-use "..." --bmd-metrics runs/bmd/eval/metrics.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from screener.pipeline.rois import ROI_NAMES

__all__ = ["main", "build_parser"]

EXAMPLES = __doc__.split("::", 1)[1] if __doc__ else ""


def _landmarks_train(a: argparse.Namespace) -> int:
    from training.landmarks import LandmarkTrainConfig, train_landmarks

    cfg = LandmarkTrainConfig(jsrt_root=a.jsrt_root, out_dir=a.out, input_size=a.input_size, epochs=a.epochs,
                              batch_size=a.batch_size, lr=a.lr, seed=a.seed, limit=a.limit, threads=a.threads,
                              extent_points=a.extent_points, mirror=a.mirror, **({} if a.amp is None else {"amp": a.amp}))
    result = train_landmarks(cfg, resume=a.resume)
    print(f"best validation mean radial error: {result['best_val_mre_mm']:.2f} mm -> {Path(a.out) / 'best.pt'}")
    return 0


def _landmarks_cv(a: argparse.Namespace) -> int:
    from training.landmarks import LandmarkTrainConfig, cross_validate_landmarks

    cfg = LandmarkTrainConfig(jsrt_root=a.jsrt_root, out_dir=a.out, input_size=a.input_size, epochs=a.epochs,
                              batch_size=a.batch_size, lr=a.lr, seed=a.seed, threads=a.threads,
                              extent_points=a.extent_points, mirror=a.mirror, **({} if a.amp is None else {"amp": a.amp}))
    cross_validate_landmarks(cfg, folds=a.folds, max_folds=a.max_folds)
    print(f"wrote {Path(a.out) / 'cv_metrics.txt'}, cv_metrics.json and cv_errors.png")
    return 0


def _landmarks_sheet(a: argparse.Namespace) -> int:
    from training.landmarks import prediction_sheet

    print(f"{'file':<44}{'gate':<28}{'conf':>8}{'frontal':>8}   (median landmark confidence, view classifier's P(frontal))")
    for row in prediction_sheet([Path(f) for f in a.files], a.out, a.bundle or None):
        conf = "-" if row["median_confidence"] is None else f"{row['median_confidence']:.3f}"
        view = "-" if row["view_frontal"] is None else f"{row['view_frontal']:.3f}"
        print(f"{row['file']:<44}{row['code']:<28}{conf:>8}{view:>8}")
    print(f"wrote {a.out}")
    return 0


def _landmarks_evaluate(a: argparse.Namespace) -> int:
    from training.landmarks import evaluate_landmarks

    evaluate_landmarks(a.checkpoint, a.out, a.jsrt_root, flip=a.flip)
    print(f"wrote {Path(a.out) / 'landmark_metrics.json'} and {Path(a.out) / 'landmarks_validation.png'}")
    return 0


def _landmarks_calibrate(a: argparse.Namespace) -> int:
    from training.landmarks import calibrate_confidence

    non_chest = None if a.non_chest is None else [Path(f) for f in a.non_chest]
    if bool(a.checkpoint) == bool(a.cv_dir):
        print("calibrate: give exactly one of --checkpoint (a detector) and --cv-dir (a `landmarks cv` run)", file=sys.stderr)
        return 2
    if a.view and a.cv_dir:
        print("calibrate: --view goes with --checkpoint; with --cv-dir give the view folds as --view-cv-dir", file=sys.stderr)
        return 2
    if a.view_cv_dir and not a.cv_dir:
        print("calibrate: --view-cv-dir goes with --cv-dir (fold k's classifier with fold k's detector); use --view with --checkpoint",
              file=sys.stderr)
        return 2
    calibrate_confidence(a.checkpoint or None, a.out, [Path(f) for f in a.dicom], a.jsrt_root, non_chest,
                         cv_dir=a.cv_dir or None, view_cv_dir=a.view_cv_dir or None, view=a.view or None,
                         flip=a.flip)
    print(f"wrote {Path(a.out) / 'confidence_calibration.json'}")
    return 0


def _view_config(a: argparse.Namespace):
    from training.view import ViewTrainConfig

    return ViewTrainConfig(jsrt_root=a.jsrt_root, out_dir=a.out, epochs=a.epochs, lr=a.lr, seed=a.seed, threads=a.threads,
                           mirrored_share=a.mirrored_share, **({} if a.amp is None else {"amp": a.amp}))


def _view_train(a: argparse.Namespace) -> int:
    from training.view import train_view

    train_view(_view_config(a), resume=a.resume)
    print(f"wrote {Path(a.out) / 'last.pt'} (export it with --view)")
    return 0


def _view_cv(a: argparse.Namespace) -> int:
    from training.view import cross_validate_view

    cross_validate_view(_view_config(a), folds=a.folds)
    print(f"wrote {Path(a.out) / 'cv_view.txt'} and cv_view.json")
    return 0


def _bmd_train(a: argparse.Namespace) -> int:
    from training.bmd import BmdTrainConfig, train_bmd

    cfg = BmdTrainConfig(
        manifest=a.manifest, out_dir=a.out, backbone=a.backbone, head=a.head, rois=tuple(a.rois.split(",")),
        roi_size=a.roi_size, optimizer=a.optimizer, schedule=a.schedule, lr=a.lr, weight_decay=a.weight_decay, batch_size=a.batch_size,
        epochs=a.epochs, val_fraction=a.val_fraction, test_fraction=a.test_fraction, seed=a.seed,
        landmarks_from=a.landmarks_from, threads=a.threads, init_weights=a.init_weights,
    )
    cfg.model_config()  # validate backbone / head / ROI names before any work
    result = train_bmd(cfg, resume=a.resume)
    print(f"best validation loss {result['best_val_loss']:.4f} -> {Path(a.out) / 'best.pt'}")
    return 0


def _bmd_evaluate(a: argparse.Namespace) -> int:
    from screener.pipeline.tscore import ReferenceTable
    from training.bmd import evaluate_bmd

    table = ReferenceTable.from_csv(Path(a.tscore_table)) if a.tscore_table else None
    evaluate_bmd(a.checkpoint, a.manifest, a.out, split=a.split, landmarks_from=a.landmarks_from, table=table, title=a.title)
    print(f"wrote metrics.json, table.txt and plots to {a.out}")
    return 0


def _synthetic(a: argparse.Namespace) -> int:
    from training.synthetic import make_synthetic

    manifest = make_synthetic(a.out, copies=a.copies, jsrt_root=a.jsrt_root, seed=a.seed, limit=a.limit)
    print(f"wrote {manifest}")
    return 0


def _demo_labels(a: argparse.Namespace) -> int:
    from training.demo_labels import write_demo_manifest

    print(f"wrote {write_demo_manifest(a.out, a.jsrt_root)}")
    return 0


def _export(a: argparse.Namespace) -> int:
    from screener.pipeline.bundle import ModelBundle, write_bundle
    from screener.pipeline.tscore import ReferenceTable
    from training.bmd import load_bmd_checkpoint
    from training.demo_labels import DEMO_STATEMENT
    from training.landmarks import load_landmark_checkpoint

    lm_net, lm_cfg = load_landmark_checkpoint(a.landmarks)
    if not a.bmd and not a.bmd_bundle:
        print("export needs the BMD networks: --bmd CHECKPOINT (repeatable) or --bmd-bundle DIR", file=sys.stderr)
        return 2
    if a.bmd and a.bmd_bundle:
        print("export: give the BMD networks either as --bmd checkpoints or as --bmd-bundle DIR, not both", file=sys.stderr)
        return 2
    source = ModelBundle.load(a.bmd_bundle) if a.bmd_bundle else None
    # a new detector for an existing BMD model: its networks, table and records
    bmd_nets = list(source.bmd.members) if source is not None else [load_bmd_checkpoint(c)[0] for c in a.bmd]
    if a.tscore_table:
        table = ReferenceTable.from_csv(Path(a.tscore_table))
    else:
        table = source.table if source is not None else ReferenceTable.default()
    validation = {}
    if (a.view_cv_metrics or a.gate_calibration) and not a.view:
        print("export: --view-cv-metrics and --gate-calibration describe a view classifier: give it with --view", file=sys.stderr)
        return 2
    view_net = view_size = None
    if a.view:
        from training.view import load_view_checkpoint

        view_net, view_cfg = load_view_checkpoint(a.view)
        view_size = view_cfg.input_size
    for key, path in (("landmarks", a.landmark_metrics), ("landmarks_cv", a.landmark_cv_metrics), ("bmd", a.bmd_metrics),
                      ("view_cv", a.view_cv_metrics), ("gate", a.gate_calibration)):
        if path:
            validation[key] = json.loads(Path(path).read_text())
            if key == "gate":  # the acceptance table, not the per-film rows
                if bool(validation[key].get("flip", False)) != a.landmark_flip:
                    print(f"export: {path} was calibrated {'with' if validation[key].get('flip') else 'without'} mirrored "
                          f"views, the bundle runs {'with' if a.landmark_flip else 'without'} them (--landmark-flip): "
                          "calibrate again with the bundle's setting", file=sys.stderr)
                    return 2
                validation[key] = {k: v for k, v in validation[key].items()
                                   if k in ("accepted_share", "threshold", "view_threshold", "flip")}
        elif key == "bmd" and source is not None and "bmd" in source.manifest.get("validation", {}):
            validation[key] = source.manifest["validation"]["bmd"]
    from training.bmd import summarise_manifest

    if a.training_manifest:
        training_data = summarise_manifest(a.training_manifest, a.label_source)
    else:
        training_data = dict(source.manifest.get("training_data", {})) if source is not None else {}
    out = write_bundle(
        a.out, name=a.name, version=a.version, intended_use=a.intended_use, demo=a.demo,
        demo_statement=a.demo_statement or (DEMO_STATEMENT if a.demo else ""),
        landmark_net=lm_net, landmark_input_size=lm_cfg.input_size,
        landmark_width=lm_cfg.width, bmd_nets=bmd_nets, table=table,
        training_data=training_data, validation=validation, landmark_views=a.landmark_views,
        landmark_flip=a.landmark_flip,
        view_net=view_net, **({"view_input_size": view_size} if view_size else {}),
    )
    bundle = ModelBundle.load(out)  # prove it loads before anyone ships it
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"wrote bundle {bundle.model_id} to {out} ({size:.1f} MB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="screener-train",
        description="Train, evaluate and export the landmark detector and the multi-ROI BMD network.",
        epilog="examples:" + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    lm = sub.add_parser("landmarks", help="the 16-landmark detector").add_subparsers(dest="action", required=True)
    t = lm.add_parser("train", help="train on JSRT contours (fixed by-image split, resumable)")
    t.add_argument("--jsrt-root", help="folder with images/, landmarks.json, clinical.csv (default ../shared/data/jsrt)")
    t.add_argument("--out", default="runs/landmarks", help="run folder: last.pt, best.pt, history.json")
    t.add_argument("--epochs", type=int, default=60)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle AdamW)")
    t.add_argument("--input-size", type=int, default=256, help="detector input side in pixels")
    t.add_argument("--limit", type=int, default=0, help="use only N training images (quick checks)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast + channels-last (default: on where the CPU has native bf16, AMX or AVX512-BF16)")
    t.add_argument("--extent-points", action="store_true",
                   help="also learn each lung's apex and base, which the label rule places the rib-cage rows and spine points by")
    t.add_argument("--mirror", type=float, default=0.0, metavar="SHARE",
                   help="mirror this share of training inputs left to right, each point relabelled as its twin (0..1)")
    t.set_defaults(func=_landmarks_train)
    v = lm.add_parser("cv", help="k-fold cross-validation of the training recipe on JSRT: per-landmark mean, median, p95 (resumable)",
                      description="Trains one detector per fold into OUT/fold<k> (a complete fold is skipped, an interrupted "
                                  "one resumed), predicts each fold's held-out images, and reports errors per landmark for "
                                  "the network alone, with the spine rule, and with 5 or 15 test-time views.")
    v.add_argument("--jsrt-root", help="folder with images/, landmarks.json, clinical.csv (default ../shared/data/jsrt)")
    v.add_argument("--out", default="runs/landmarks-cv", help="folder for fold<k>/ runs and cv_metrics.{txt,json}, cv_errors.png")
    v.add_argument("--folds", type=int, default=5)
    v.add_argument("--max-folds", type=int, default=None,
                   help="train at most N folds in this call (0: train none, report on the folds already complete)")
    v.add_argument("--epochs", type=int, default=60)
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--lr", type=float, default=2e-3)
    v.add_argument("--input-size", type=int, default=256)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    v.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast + channels-last (default: on where the CPU has native bf16, AMX or AVX512-BF16)")
    v.add_argument("--extent-points", action="store_true",
                   help="also learn each lung's apex and base, which the label rule places the rib-cage rows and spine points by")
    v.add_argument("--mirror", type=float, default=0.0, metavar="SHARE",
                   help="mirror this share of training inputs left to right, each point relabelled as its twin (0..1)")
    v.set_defaults(func=_landmarks_cv)
    h = lm.add_parser("sheet", help="a PNG sheet of the detector's points, ROIs and gate decision on DICOM files (to check other vendors by eye)")
    h.add_argument("files", nargs="+", help="DICOM files")
    h.add_argument("--out", required=True, help="PNG to write")
    h.add_argument("--bundle", default="", help="model bundle directory (default: the demo bundle)")
    h.set_defaults(func=_landmarks_sheet)
    e = lm.add_parser("evaluate", help="mean radial error (mm) on the validation split, table + PNG")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--jsrt-root")
    e.add_argument("--flip", action="store_true", help="also run the view mirrored (as a bundle exported with --landmark-flip)")
    e.set_defaults(func=_landmarks_evaluate)
    c = lm.add_parser("calibrate", help="median landmark confidence on frontal films vs non-chest negatives (sets the eligibility gate)")
    c.add_argument("--checkpoint", default="", help="the detector to calibrate: a training checkpoint or a bundle's landmarks.pt")
    c.add_argument("--cv-dir", default="",
                   help="instead of --checkpoint: a `landmarks cv` run; every JSRT film is probed by the fold detector that never saw it")
    c.add_argument("--view-cv-dir", default="",
                   help="with --cv-dir: a `view cv` run of the same folds; each film is also classified by the fold's classifier")
    c.add_argument("--view", default="",
                   help="with --checkpoint: a view classifier checkpoint (a bundle's own classifier is used without it)")
    c.add_argument("--out", required=True)
    c.add_argument("--flip", action="store_true",
                   help="the detectors also run each view mirrored (a bundle exported with --landmark-flip); "
                        "a bundle's own setting is taken from its manifest")
    c.add_argument("--jsrt-root")
    c.add_argument("--dicom", nargs="*", default=[], help="frontal chest DICOM files to add to the positives")
    c.add_argument("--non-chest", nargs="*", default=None,
                   help="non-chest radiographs (DICOM) for the non_chest negatives (default: pydicom-data's lower-leg CR, RG3_UNCI.dcm)")
    c.set_defaults(func=_landmarks_calibrate)

    view = sub.add_parser("view", help="the gate's view classifier (frontal chest film the right way round, or not)"
                          ).add_subparsers(dest="action", required=True)
    for name, func, helptext in (
        ("train", _view_train, "train on JSRT films and generated negatives (mirrored, halves, turned, lateral-like, inverted)"),
        ("cv", _view_cv, "k-fold cross-validation on the landmark folds: share of held-out inputs called frontal, per kind"),
    ):
        t = view.add_parser(name, help=helptext, description=helptext)
        t.add_argument("--jsrt-root", help="folder with images/, landmarks.json, clinical.csv (default ../shared/data/jsrt)")
        t.add_argument("--out", default="runs/view" if name == "train" else "runs/view-cv")
        if name == "cv":
            t.add_argument("--folds", type=int, default=5, help="must match the `landmarks cv` run it is calibrated with")
        else:
            t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
        t.add_argument("--epochs", type=int, default=40)
        t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle AdamW)")
        t.add_argument("--mirrored-share", type=float, default=0.3, help="share of the negatives that are left-right flipped films")
        t.add_argument("--seed", type=int, default=0)
        t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
        t.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 autocast + channels-last (default: on where the CPU has native bf16)")
        t.set_defaults(func=func)

    bmd = sub.add_parser("bmd", help="the multi-ROI BMD network").add_subparsers(dest="action", required=True)
    t = bmd.add_parser("train", help="train from a CSV manifest (paper defaults; by-patient split; resumable)")
    t.add_argument("--manifest", required=True, help="CSV: image,L1,L2,L3,L4,sex,age[,patient_id,split,landmarks]")
    t.add_argument("--out", default="runs/bmd")
    t.add_argument("--backbone", default="vgg16", help="vgg11, vgg16, vgg11_bn, vgg16_bn, resnet18, resnet34, resnet50")
    t.add_argument("--head", default="concat", help="concat (paper 1) or attention (paper 2: transformer over ROI tokens)")
    t.add_argument("--rois", default=",".join(ROI_NAMES),
                   help="comma-separated ROI subset, e.g. whole_image for the global-only model (Table 2)")
    t.add_argument("--roi-size", type=int, default=256)
    t.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    t.add_argument("--schedule", default="constant", choices=["constant", "cosine"], help="learning rate per epoch (paper: constant)")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--weight-decay", type=float, default=4e-4)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--epochs", type=int, default=100)
    t.add_argument("--val-fraction", type=float, default=0.2)
    t.add_argument("--test-fraction", type=float, default=0.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--landmarks-from", default="", help="bundle dir or landmark checkpoint for rows without landmarks (default: the demo bundle)")
    t.add_argument("--init-weights", default="", help="local backbone state dict to start from (no downloads)")
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--resume", action="store_true")
    t.set_defaults(func=_bmd_train)
    e = bmd.add_parser("evaluate", help="r, MAE, AUC, sens/spec, Bland-Altman; JSON, table, plots")
    e.add_argument("--checkpoint", required=True, action="append", help="repeat to evaluate an ensemble (Table 3)")
    e.add_argument("--manifest", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--split", default="val", choices=["train", "val", "test"])
    e.add_argument("--landmarks-from", default="")
    e.add_argument("--tscore-table", default="", help="reference CSV (sex,site,mean,sd,source); default: packaged table")
    e.add_argument("--title", default="")
    e.set_defaults(func=_bmd_evaluate)

    s = sub.add_parser("synthetic", help="synthetic benchmark: JSRT images with a BMD signal only local ROIs see")
    s.add_argument("--out", required=True)
    s.add_argument("--copies", type=int, default=2, help="synthetic images per JSRT radiograph")
    s.add_argument("--jsrt-root")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--limit", type=int, default=0)
    s.set_defaults(func=_synthetic)

    d = sub.add_parser("demo-labels", help="manifest of JSRT with demo BMD derived from age and sex (NOT DXA)")
    d.add_argument("--out", required=True, help="manifest CSV path to write")
    d.add_argument("--jsrt-root")
    d.set_defaults(func=_demo_labels)

    x = sub.add_parser("export", help="write a model bundle (weights + manifest) and check that it loads")
    x.add_argument("--landmarks", required=True, help="landmark checkpoint (best.pt)")
    x.add_argument("--bmd", action="append", default=[], help="BMD checkpoint; repeat for an ensemble")
    x.add_argument("--bmd-bundle", default="",
                   help="instead of --bmd: take the BMD networks, T-score table, BMD metrics and training summary of this "
                        "bundle (a new landmark detector for a model whose ROIs came from label landmarks, as the demo's)")
    x.add_argument("--out", required=True)
    x.add_argument("--name", required=True)
    x.add_argument("--version", required=True)
    x.add_argument("--intended-use", required=True)
    x.add_argument("--demo", action="store_true", help="mark as demo (labels not from DXA)")
    x.add_argument("--demo-statement", default="")
    x.add_argument("--tscore-table", default="")
    x.add_argument("--landmark-metrics", default="", help="landmark_metrics.json to record")
    x.add_argument("--landmark-cv-metrics", default="", help="cv_metrics.json of `landmarks cv` to record")
    x.add_argument("--landmark-views", type=int, default=1,
                   help="test-time views the detector runs per image (1..15; more: a little more accurate, one pass each)")
    x.add_argument("--landmark-flip", action="store_true",
                   help="also run each view mirrored left to right (one more pass each; README, Landmark accuracy)")
    x.add_argument("--view", default="", help="the gate's view classifier (`screener-train view train`'s last.pt); none: no view check")
    x.add_argument("--view-cv-metrics", default="", help="cv_view.json of `screener-train view cv` to record")
    x.add_argument("--gate-calibration", default="", help="confidence_calibration.json of `landmarks calibrate` (its acceptance table is recorded)")
    x.add_argument("--bmd-metrics", default="", help="metrics.json to record")
    x.add_argument("--training-manifest", default="", help="the BMD training manifest, summarised into the bundle")
    x.add_argument("--label-source", default="DXA", help="what the BMD labels are, e.g. 'DXA (Hologic), 2019-2023'")
    x.set_defaults(func=_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
