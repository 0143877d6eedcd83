"""`screener`: the command line of the CXR-BMD screening node.

Commands available in this release:

  screener predict FILE...    landmarks, ROIs, BMD, T-scores and WHO category for radiographs
  screener bundle [DIR]       show a model bundle's manifest (the shipped demo bundle by default)
  screener check-config FILE  validate a TOML configuration and print the effective settings
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser"]


def _cmd_predict(a: argparse.Namespace) -> int:
    from screener.pipeline.bundle import ModelBundle
    from screener.pipeline.decode import DecodeError, decode_file
    from screener.pipeline.estimate import BmdEstimator

    bundle = ModelBundle.load(a.bundle)
    estimator = BmdEstimator(bundle, a.device)
    if bundle.demo:
        print(f"NOTE: {bundle.manifest['demo_statement']}", file=sys.stderr)
    results, failures = [], 0
    for path in a.files:
        t0 = time.perf_counter()
        try:
            decoded = decode_file(path)
        except (DecodeError, OSError) as exc:
            failures += 1
            results.append({"file": str(path), "error": str(exc)})
            continue
        est = estimator.estimate([decoded.pixels], [decoded.patient_sex])[0]
        if a.png:
            from screener.report.preview import render_preview

            render_preview(decoded.pixels, est, a.png / f"{Path(path).stem}.png")
        t = est.tscores
        results.append(
            {
                "file": str(path),
                "model": est.model_id,
                "demo": est.demo,
                "bmd_g_cm2": dict(zip(("L1", "L2", "L3", "L4", "L1-L4"), [*est.bmd, t.bmd["L1-L4"]])),
                "tscore": t.tscore,
                "who_category": t.category.value if t.category else None,
                "tscore_note": t.reason,
                "landmark_min_confidence": est.landmarks.min_confidence,
                "landmarks": {"points_xy": est.landmarks.points.round(1).tolist(), "confidence": est.landmarks.confidence.round(3).tolist()},
                "roi_corners_xy": {n: c.round(1).tolist() for n, c in zip(est.rois.names, est.rois.corners)},
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
    if a.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'file':<40} {'L1-L4 BMD':>10} {'T-score':>8} {'category':<13} {'conf':>5} {'s':>5}")
        for r in results:
            name = Path(r["file"]).name[:40]
            if "error" in r:
                print(f"{name:<40} error: {r['error']}")
                continue
            tscore = f"{r['tscore']['L1-L4']:.1f}" if r["tscore"] else "-"
            print(f"{name:<40} {r['bmd_g_cm2']['L1-L4']:>10.3f} {tscore:>8} {r['who_category'] or '-':<13} "
                  f"{r['landmark_min_confidence']:>5.2f} {r['seconds']:>5.1f}")
    return 1 if failures == len(results) and results else 0


def _cmd_bundle(a: argparse.Namespace) -> int:
    from screener.pipeline.bundle import ModelBundle

    bundle = ModelBundle.load(a.path)
    m = bundle.manifest
    print(json.dumps(m, indent=2) if a.json else "\n".join([
        f"bundle      {bundle.path}",
        f"model id    {bundle.model_id}",
        f"intended    {m['intended_use']}",
        f"demo        {'YES - ' + m['demo_statement'] if bundle.demo else 'no'}",
        f"landmarks   {m['landmarks']['scheme']} ({len(m['landmarks']['names'])} points), input {m['landmarks']['input_size']} px",
        f"ROIs        {m['rois']['recipe']}: {', '.join(m['rois']['names'])} at {m['rois']['size']} px",
        f"BMD models  " + "; ".join(f"{x['config']['backbone']}/{x['config']['head']} on {len(x['config']['rois'])} ROIs" for x in m['bmd']['models']),
        f"T-scores    {m['tscore_table']['name']}",
    ]))
    return 0


def _cmd_check_config(a: argparse.Namespace) -> int:
    from screener.config import ConfigError, load_config

    try:
        settings = load_config(a.path)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(settings.to_dict(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="screener", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", help="estimate BMD / T-score / WHO category for DICOM or PNG radiographs")
    pr.add_argument("files", nargs="+", type=Path, help="DICOM files (or grey PNGs)")
    pr.add_argument("--bundle", type=Path, default=None, help="model bundle directory (default: the shipped demo bundle)")
    pr.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    pr.add_argument("--json", action="store_true", help="print full results as JSON (landmarks, ROI corners)")
    pr.add_argument("--png", type=Path, default=None, metavar="DIR", help="also save a preview PNG per image (ROIs, landmarks, result)")
    pr.set_defaults(func=_cmd_predict)
    b = sub.add_parser("bundle", help="show a model bundle's manifest")
    b.add_argument("path", nargs="?", type=Path, default=None)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_cmd_bundle)
    c = sub.add_parser("check-config", help="validate a TOML configuration file")
    c.add_argument("path", type=Path)
    c.set_defaults(func=_cmd_check_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from screener.pipeline.bundle import BundleError

    try:
        return args.func(args)
    except (BundleError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
