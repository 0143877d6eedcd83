"""GPU figures: what the networks make of the chip, half precision against fp32 on it, and the
whole pipeline in N processes sharing one GPU against the same N processes on its CPU.

    python bench/gpu.py [FILES...] [--device cuda] [--json out.json] [--quick]

Three parts, each printed as a table (and all of it in --json):

networks  images/s of each network alone (the bundle's BMD network, the paper's VGG16 at 256
          px with 7 ROIs, the landmark detector, the view classifier) for batch sizes and
          precisions (fp32, bf16, fp16 under torch.autocast; channels-last as the node runs
          them; torch.compile for the BMD networks), timed with CUDA events (median of 20
          after warm-up). FLOPs per image are counted by torch.utils.flop_counter (2 per
          multiply-add of the convolutions and matrix products), and the share is the achieved
          FLOP rate over the chip's bf16 matrix rate measured in the same run (an 8192^3 bf16
          product): the FLOP limit's share a network reaches.
agreement on real films (FILES, default the pydicom-data Philips CR): BMD under bf16 and fp16
          against fp32 on this device, fp32 on this device against fp32 on the CPU, and the
          landmarks on this device against the CPU's, in g/cm2 and mm.
pipeline  `Processor` (what `screener process` and each worker process run: decode threads,
          batched landmarks, gate, ROIs, BMD, all four report objects, written to disk) in N
          processes at once, each with its shard of the films, on the GPU and, for the same N,
          on the CPU. Each process first warms up on one batch of films (CUDA context, model
          load, cuDNN's kernel choice) and waits; images/s is the timed films over the time from
          the common go to the last result. Each row names the precision the node's default
          (auto) runs on that device.

--quick shrinks every part to a smoke test (used on machines without a GPU: --device cpu).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from screener.pipeline.bundle import ModelBundle  # noqa: E402
from screener.pipeline.estimate import BF16_TOLERANCE_G_CM2, BmdEstimator, Inference, Precision  # noqa: E402
from screener.pipeline.geometry import Pyramid  # noqa: E402
from screener.pipeline.model import Ensemble, MultiRoiConfig, MultiRoiNet  # noqa: E402
from screener.pipeline.rois import ROI_NAMES  # noqa: E402
from tests.support.films import renumbered_copies  # noqa: E402


def default_files() -> list[Path]:
    from pydicom.data import get_testdata_file

    found = [get_testdata_file(n) for n in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")]
    if None in found:
        raise SystemExit("no films given and pydicom-data is not installed: name the films (FILES), "
                         "an uncompressed and a JPEG 2000 one first")
    return [Path(f) for f in found]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def matmul_peak_tflops(device: torch.device, quick: bool) -> float:
    """The chip's bf16 matrix rate on random data, the ceiling the networks are held against."""
    n = 1024 if quick or device.type != "cuda" else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, device, repeats=3 if quick else 10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def flops_per_image(fn, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        fn(x[:1])
    return float(counter.get_total_flops())


def networks(bundle: ModelBundle, device: torch.device, quick: bool, peak: float, deadline: float) -> list[dict]:
    vgg = Ensemble([MultiRoiNet(MultiRoiConfig(backbone="vgg16", roi_size=256))])
    lm_size, view_size = bundle.landmark_input_size, int(bundle.manifest["view"]["input_size"]) if bundle.view_net else 0
    nets = [  # label, module, one image's input shape, forward, batch sizes, compile?
        (f"BMD bundled ({bundle.manifest['bmd']['models'][0]['config']['backbone']}, 7 ROIs at {bundle.roi_size} px)",
         bundle.bmd, (len(ROI_NAMES), bundle.roi_size, bundle.roi_size), lambda m: (lambda x: m(x, ROI_NAMES)),
         [1, 16, 64, 256], True),
        ("BMD paper (VGG16, 7 ROIs at 256 px)", vgg, (len(ROI_NAMES), 256, 256), lambda m: (lambda x: m(x, ROI_NAMES)),
         [1, 16, 64], True),
        (f"landmark detector ({lm_size} px, one pass)", bundle.landmark_net, (1, lm_size, lm_size), lambda m: m,
         [1, 16, 64, 256], False),
    ]
    if bundle.view_net is not None:
        nets.append((f"view classifier ({view_size} px)", bundle.view_net, (1, view_size, view_size), lambda m: m,
                     [1, 64, 256], False))
    precisions = [Precision.FP32, Precision.BF16, Precision.FP16]
    rows = []
    fp32 = "fp32"
    if device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        fp32 = "fp32 (tf32 conv)"  # PyTorch's default on a GPU: convolutions in TF32
    for label, module, shape, forward, batches, compilable in nets:
        # a copy: the bundle's own networks keep the layout the node gives them
        module = copy.deepcopy(module).to(device).eval().to(memory_format=torch.channels_last)
        fwd = forward(module)
        flops = flops_per_image(fwd, torch.randn(1, *shape, device=device))
        if quick:
            batches = batches[:2]
        for precision in precisions:
            for batch in batches:
                x = torch.randn(batch, *shape, device=device)
                inference = Inference(precision=precision)

                def run() -> None:
                    with torch.inference_mode(), inference.autocast(device):
                        fwd(x)

                ms = time_ms(run, device, repeats=3 if quick else 20)
                name = fp32 if precision is Precision.FP32 else precision.value
                rows.append(_row(label, name, batch, False, ms, flops, peak))
                print(_fmt(rows[-1]), flush=True)
        if compilable and time.monotonic() < deadline:
            batch = batches[-1]
            x = torch.randn(batch, *shape, device=device)
            compiled = torch.compile(module)
            cfwd = forward(compiled)
            inference = Inference(precision=Precision.BF16)

            def crun() -> None:
                with torch.inference_mode(), inference.autocast(device):
                    cfwd(x)

            t0 = time.perf_counter()
            crun()
            sync(device)
            compile_s = time.perf_counter() - t0
            ms = time_ms(crun, device, repeats=3 if quick else 20)
            rows.append(_row(label, "bf16", batch, True, ms, flops, peak) | {"compile_s": round(compile_s, 1)})
            print(_fmt(rows[-1]) + f"  (compiled in {compile_s:.0f} s)", flush=True)
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _row(label: str, precision: str, batch: int, compiled: bool, ms: float, flops: float, peak: float) -> dict:
    per_s = batch / (ms * 1e-3)
    return {"network": label, "precision": precision, "batch": batch, "compiled": compiled, "ms_per_batch": round(ms, 3),
            "images_per_s": round(per_s, 1), "gflop_per_image": round(flops / 1e9, 3),
            "share_of_bf16_peak": round(flops * per_s / (peak * 1e12), 4)}


def _fmt(r: dict) -> str:
    name = r["precision"] + (" compiled" if r["compiled"] else "")
    return (f"{r['network']:<48}{name:>14}{r['batch']:>6}{r['ms_per_batch']:>11.2f} ms{r['images_per_s']:>11.0f}/s"
            f"{r['gflop_per_image']:>9.2f} GF{100 * r['share_of_bf16_peak']:>8.2f} %")


def agreement(bundle: ModelBundle, files: list[Path], device: torch.device) -> dict:
    """Half precision against fp32 on this device; this device's fp32 against the CPU's."""
    from screener.pipeline.decode import decode_file

    images = [decode_file(f) for f in files]
    pyramids = [Pyramid(im.pixels) for im in images]
    sexes = ["F"] * len(pyramids)
    cpu = BmdEstimator(bundle, "cpu", Inference(precision=Precision.FP32))
    cpu_lm = cpu.detect(pyramids)
    cpu_bmd = np.array([e.bmd for e in cpu.estimate(pyramids, sexes, landmarks=cpu_lm)])
    out: dict = {"films": [f.name for f in files]}
    gpu = BmdEstimator(bundle, device, Inference(precision=Precision.FP32))
    gpu_lm = gpu.detect(pyramids)
    out["landmarks_max_diff_device_vs_cpu_px"] = float(max(  # source pixels (RG1: about 0.15 mm)
        np.linalg.norm(a.points - b.points, axis=1).max() for a, b in zip(gpu_lm, cpu_lm)))
    # the detector runs in fp32 in the node; what bf16 would move (points, and the confidences
    # the gate thresholds were calibrated on)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        half_lm = gpu.detect(pyramids)
    out["landmarks_bf16_vs_fp32_max_px"] = float(max(
        np.linalg.norm(a.points - b.points, axis=1).max() for a, b in zip(half_lm, gpu_lm)))
    out["landmark_confidence_bf16_vs_fp32_max"] = float(max(
        np.abs(a.confidence - b.confidence).max() for a, b in zip(half_lm, gpu_lm)))
    ref = np.array([e.bmd for e in gpu.estimate(pyramids, sexes, landmarks=cpu_lm)])
    out["bmd_fp32_device_vs_cpu_g_cm2"] = float(np.abs(ref - cpu_bmd).max())
    for precision in (Precision.BF16, Precision.FP16):
        half = BmdEstimator(bundle, device, Inference(precision=precision))
        bmd = np.array([e.bmd for e in half.estimate(pyramids, sexes, landmarks=cpu_lm)])
        out[f"bmd_{precision.value}_vs_fp32_g_cm2"] = float(np.abs(bmd - ref).max())
        out[f"bmd_{precision.value}_within_{BF16_TOLERANCE_G_CM2}"] = bool(np.abs(bmd - ref).max() <= BF16_TOLERANCE_G_CM2)
    # the paper's VGG16 (untrained weights: relative error of its outputs only)
    vgg = Ensemble([MultiRoiNet(MultiRoiConfig(backbone="vgg16", roi_size=256))]).to(device).eval()
    vgg = vgg.to(memory_format=torch.channels_last)
    x = torch.randn(8, len(ROI_NAMES), 256, 256, device=device)
    with torch.inference_mode():
        ref_v = vgg(x, ROI_NAMES).double()
        for precision in (Precision.BF16, Precision.FP16):
            with Inference(precision=precision).autocast(device):
                v = vgg(x, ROI_NAMES).double()
            out[f"vgg16_{precision.value}_relative_error"] = float((v - ref_v).norm() / ref_v.norm())
    return out


# -- the pipeline in N processes -----------------------------------------------------------------

def worker(args: argparse.Namespace) -> None:
    """One pipeline process: warms up on one film, says it is ready, waits for the go, then runs
    its shard and writes each outcome's finish time to --times."""
    from screener.process import Processor

    torch.set_num_threads(args.threads)
    processor = Processor(ModelBundle.load(), args.out, device=args.device, batch_size=args.batch_size,
                          decode_workers=args.decode_threads)
    files = [Path(p) for p in args.files]
    warm = files[: args.batch_size]
    list(processor.run(warm))  # CUDA context, cuDNN's kernel choice at the batch's shapes, lazy imports: not timed
    (args.times.parent / (args.times.name + ".ready")).touch()
    go = args.times.parent / "go"
    while not go.exists():
        time.sleep(0.01)
    times, statuses = [], []
    for outcome in processor.run(files[args.batch_size:]):
        times.append(time.time())
        statuses.append(str(outcome.status))
    args.times.write_text(json.dumps({"times": times, "statuses": statuses}))


def pipeline(films: list[Path], device: str, processes: int, threads: int, batch_size: int, work: Path) -> dict:
    """A batch of films per process warms it up; the rest are timed from the go to the last result."""
    warm, timed = films[: processes * batch_size], films[processes * batch_size:]
    shards = [[*warm[i * batch_size:(i + 1) * batch_size], *timed[i::processes]] for i in range(processes)]
    run_dir = work / f"run-{len(list(work.glob('run-*')))}-{device}-{processes}"
    run_dir.mkdir()
    procs, time_files = [], []
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
    for i, shard in enumerate(shards):
        tf = run_dir / f"times-{i}.json"
        time_files.append(tf)
        cmd = [sys.executable, __file__, "--worker", "--device", device, "--threads", str(threads),
               "--batch-size", str(batch_size), "--decode-threads", "2", "--out", str(run_dir / f"out-{i}"),
               "--times", str(tf), *map(str, shard)]
        procs.append(subprocess.Popen(cmd, env=env))
    while not all((tf.parent / (tf.name + ".ready")).exists() for tf in time_files):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.05)
    t_go = time.time()
    (run_dir / "go").touch()
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"pipeline worker exit codes {codes}")
    runs = [json.loads(tf.read_text()) for tf in time_files]
    t_end = max(r["times"][-1] for r in runs if r["times"])
    statuses = [s for r in runs for s in r["statuses"]]
    precision = Precision.AUTO.resolve(torch.device(device)).value  # what the node's default runs there
    return {"device": device, "precision": precision, "processes": processes, "torch_threads": threads, "batch_size": batch_size,
            "films": len(timed), "reported": statuses.count("reported"), "other": len(statuses) - statuses.count("reported"),
            "seconds": round(t_end - t_go, 2), "images_per_s": round(len(statuses) / (t_end - t_go), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, help="real films (default: the pydicom-data Philips CR)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script")
    ap.add_argument("--parts", default="networks,agreement,pipeline")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--cpu-processes", type=int, nargs="*", default=[16], help="the same pipeline on the CPU, for these counts")
    ap.add_argument("--films-per-process", type=int, default=16, help="timed films per process (plus a batch to warm up)")
    ap.add_argument("--budget-s", type=float, default=150, help="networks part: no torch.compile after this many seconds")
    # one pipeline process (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--decode-threads", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--times", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.files = [str(f) for f in a.files]
        worker(a)
        return
    device = torch.device(a.device)
    parts = set(a.parts.split(","))
    files = a.files or (default_files() if parts & {"agreement", "pipeline"} else [])
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                    "matmul_precision": torch.get_float32_matmul_precision()}

    def save() -> None:  # after every part: a run cut short keeps what it measured
        if a.json:
            a.json.write_text(json.dumps(result, indent=2))

    bundle = ModelBundle.load()
    if "networks" in parts:
        peak = matmul_peak_tflops(device, a.quick)
        result["bf16_matmul_tflops"] = round(peak, 1)
        print(f"\n{result['device']}: bf16 matrix product {peak:.0f} TFLOP/s (the ceiling below)\n", flush=True)
        print(f"{'network':<48}{'precision':>14}{'batch':>6}{'per batch':>14}{'images':>12}{'per image':>12}{'of peak':>10}")
        result["networks"] = networks(bundle, device, a.quick, peak, time.monotonic() + a.budget_s)
        save()
    if "agreement" in parts:
        result["agreement"] = agreement(bundle, files, device)
        print("\nagreement on real films:", json.dumps(result["agreement"], indent=1), flush=True)
        save()
    if "pipeline" in parts:
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            cores = os.cpu_count() or 1
            counts = [(a.device, n) for n in a.processes] + [("cpu", n) for n in a.cpu_processes]
            batch = 8
            films = renumbered_copies(files[:2], work / "films", max(n for _, n in counts) * (a.films_per_process + batch),
                                      f"1.2.826.0.1.3680043.10.511.9.{os.getpid()}")
            result["pipeline"] = rows
            for dev, n in counts:
                subset = films[: n * (a.films_per_process + batch)]
                try:
                    rows.append(pipeline(subset, dev, n, max(1, cores // n), batch, work))
                except Exception as exc:  # one configuration failing does not lose the others
                    rows.append({"device": dev, "processes": n, "error": f"{type(exc).__name__}: {exc}"})
                print(json.dumps(rows[-1]), flush=True)
                save()
        print(f"\n{'device':<8}{'processes':>10}{'films':>7}{'reported':>10}{'seconds':>9}{'images/s':>10}")
        for r in rows:
            if "error" in r:
                print(f"{r['device']:<8}{r['processes']:>10}  failed: {r['error']}")
            else:
                print(f"{r['device']:<8}{r['processes']:>10}{r['films']:>7}{r['reported']:>10}{r['seconds']:>9}{r['images_per_s']:>10}")
    save()


if __name__ == "__main__":
    main()
