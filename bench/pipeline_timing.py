"""Per-image CPU time of each pipeline stage, for the bundled model and the paper's VGG16.

    python bench/pipeline_timing.py [FILES...] [--repeats 3] [--threads 2] [--precisions auto fp32]
                                    [--device cpu|cuda] [--json out.json]

Default input: the pydicom-data Philips CR (RG1, 1955 x 1841) in its lossless and lossy
transfer syntaxes. Stages: decode (read + pixel decode + LUTs), landmarks (detector forward +
soft-argmax, the turned-by-180 view, and the view classifier when the bundle has one; its own
share is the "view" column), rois (7 oriented crops from full resolution), model (multi-ROI forward), tscore,
and the report objects, each built and encoded: SR, GSPS, result image (Secondary Capture),
PDF (Encapsulated PDF); "report" is their sum. "vgg16-256" swaps the
bundle's BMD network for the paper's configuration (VGG16, 7 ROIs at 256 px, concat head) with
untrained weights: timing only. Median over repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pydicom
import torch

from screener.pipeline.bundle import ModelBundle
from screener.pipeline.decode import decode_dataset
from screener.pipeline.estimate import Inference, Precision
from screener.pipeline.geometry import Pyramid
from screener.pipeline.landmarks import normalise_crop
from screener.pipeline.model import Ensemble, MultiRoiConfig, MultiRoiNet
from screener.pipeline.rois import ROI_NAMES, extract_rois
from screener.pipeline.tscore import compute_tscores


def default_files() -> list[Path]:
    from pydicom.data import get_testdata_file

    return [Path(get_testdata_file(n)) for n in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")]


def report_stage():
    """Times each report builder (build + encode); returns seconds per object kind."""
    from screener.pipeline.estimate import AlgorithmInfo, BmdEstimate
    from screener.report.overlay import build_gsps
    from screener.report.pdf import build_pdf
    from screener.report.result_image import build_result_image
    from screener.report.sr import build_sr

    def run(ds, pixels, landmarks, rois, bmd, tscores, bundle) -> dict[str, float]:
        est = BmdEstimate(landmarks, rois, tuple(bmd), tscores, AlgorithmInfo.from_bundle(bundle, "fp32"))  # the report's cost does not depend on it
        builders = {"sr": lambda: build_sr(ds, est), "gsps": lambda: build_gsps(ds, est),
                    "image": lambda: build_result_image(ds, est, pixels), "pdf": lambda: build_pdf(ds, est, pixels)}
        out = {}
        for kind, build in builders.items():
            t0 = time.perf_counter()
            build().save_as(io.BytesIO(), enforce_file_format=True)
            out[kind] = time.perf_counter() - t0
        return out

    return run


def time_one(path: Path, bundle: ModelBundle, bmd_net: Ensemble, roi_size: int, report, detector,
             inference: Inference) -> dict[str, float]:
    device = detector.device  # on a GPU the results come back to the host inside each timed stage
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    ds = pydicom.dcmread(path)
    img = decode_dataset(ds)
    t["decode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pyr = Pyramid(img.pixels)
    lm = detector.detect([pyr])[0]
    t["landmarks"] = time.perf_counter() - t0
    view_s = None
    if detector.view is not None:  # its share of "landmarks", timed once more on its own
        t0 = time.perf_counter()
        detector.view.classify([pyr])
        view_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rois = extract_rois(pyr, lm, roi_size)
    t["rois"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.inference_mode(), inference.autocast(device):
        x = torch.from_numpy(normalise_crop(rois.crops[None])).to(device)
        bmd = bmd_net(x, ROI_NAMES)[0].double().cpu().numpy()
    t["model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tscores = compute_tscores(bmd, img.patient_sex, bundle.table)
    t["tscore"] = time.perf_counter() - t0
    objects = report(ds, img.pixels, lm, rois, bmd, tscores, bundle)
    t["report"] = sum(objects.values())
    t["total"] = sum(t.values())
    t.update({f"  {kind}": seconds for kind, seconds in objects.items()})  # the report's parts
    if view_s is not None:
        t["  view"] = view_s  # part of landmarks
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the networks run")
    ap.add_argument("--precisions", nargs="+", default=["auto"], choices=[p.value for p in Precision],
                    help="of the BMD network, each timed in turn in the same run (auto: what the node picks "
                    "here); the landmark detector runs in fp32 as in the node")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    files = a.files or default_files()
    bundle = ModelBundle.load()
    vgg = MultiRoiNet(MultiRoiConfig(backbone="vgg16", roi_size=256)).eval()
    detector = bundle.detector(a.device)
    device = torch.device(a.device)
    # as the node runs them (Inference's default channels_last)
    bmd_nets = {"bundle": bundle.bmd.to(device).to(memory_format=torch.channels_last),
                "vgg": Ensemble([vgg]).eval().to(device).to(memory_format=torch.channels_last)}
    configs = {}
    for name in a.precisions:
        precision = Precision(name)
        tag = f"{name} = {precision.resolve(device).value}" if precision is Precision.AUTO else name
        configs[f"bundle ({bundle.manifest['bmd']['models'][0]['config']['backbone']}-{bundle.roi_size}, {tag})"] = (
            bmd_nets["bundle"], bundle.roi_size, Inference(precision=precision))
        configs[f"vgg16-256 (paper, {tag})"] = (bmd_nets["vgg"], 256, Inference(precision=precision))
    report = report_stage()
    results = {}
    for label, (net, size, inference) in configs.items():
        per_file = {}
        for f in files:
            time_one(f, bundle, net, size, report, detector, inference)  # warm-up
            runs = [time_one(f, bundle, net, size, report, detector, inference) for _ in range(a.repeats)]
            per_file[f.name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        results[label] = per_file
        stages = list(next(iter(per_file.values())))
        where = f"networks on {a.device}, " if a.device != "cpu" else ""
        print(f"\n{label}: median seconds per image, {where}{a.threads} CPU thread(s), {a.repeats} repeats")
        print(f"{'file':<16}" + "".join(f"{s:>10}" for s in stages))
        for name, row in per_file.items():
            print(f"{name:<16}" + "".join(f"{row[s]:>10.3f}" for s in stages))
        mean = {s: float(np.mean([row[s] for row in per_file.values()])) for s in stages}
        print(f"{'mean':<16}" + "".join(f"{mean[s]:>10.3f}" for s in stages))
    if a.json:
        a.json.write_text(json.dumps({"threads": a.threads, "repeats": a.repeats, "device": a.device, "results": results}, indent=2))


if __name__ == "__main__":
    main()
