"""Where the node's CPU goes while it screens: py-spy samples every process of `screener serve`
during bench/throughput.py, and the samples are summed by pipeline stage.

    pip install py-spy
    python bench/node_profile.py [--images 40] [--processes 2] [--seconds 25] [--raw out.txt]

Starts `bench/throughput.py --images N --processes P` (a real node, DCMTK storescu senders and
storescp as the PACS), waits until the node's service process is up and has been receiving
for a few seconds, records it and its children with `py-spy record --subprocesses` (50
samples/s, idle threads left out), and prints each stage's share of the samples and how many
cores the node kept busy on average. A sample belongs to a stage when its stack holds one of
the stage's functions; a stage shared by two (the image pyramid under both the detector and
the ROIs) is counted under the first that matches, in the order printed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: stage -> functions whose presence in a stack puts the sample there (first match wins)
STAGES = {
    "decode (read + pixel decode + LUTs)": ("decode_dataset", "read_dataset"),
    "landmark detector + view classifier": ("detect_views", "classify"),
    "report objects (SR, GSPS, image, PDF)": ("build_sr", "build_gsps", "build_result_image", "build_pdf"),
    "ROIs": ("extract_rois",),
    "BMD network": ("screener/pipeline/model.py",),
    "dispatch to the PACS": ("dispatch",),
    "receive": ("receive",),
    "database (SQLAlchemy)": ("sqlalchemy",),
}


def summarise(raw: str, seconds: float, rate: int) -> list[tuple[str, float]]:
    rows = [line.rsplit(" ", 1) for line in raw.splitlines() if line.strip()]
    total = sum(int(n) for _, n in rows) or 1
    counts = dict.fromkeys([*STAGES, "other"], 0)
    for stack, n in rows:
        stage = next((s for s, funcs in STAGES.items() if any(f in stack for f in funcs)), "other")
        counts[stage] += int(n)
    print(f"node busy on average: {total / (seconds * rate):.2f} cores ({total} samples in {seconds:.0f} s at {rate}/s)")
    out = [(stage, 100.0 * n / total) for stage, n in counts.items()]
    for stage, share in out:
        print(f"{share:6.1f} %  {stage}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=25)
    ap.add_argument("--rate", type=int, default=50)
    ap.add_argument("--raw", type=Path, help="also keep py-spy's raw (collapsed) stacks here")
    a = ap.parse_args()
    bench = subprocess.Popen([sys.executable, str(ROOT / "bench" / "throughput.py"), "--images", str(a.images),
                              "--processes", str(a.processes)])
    try:
        pid = None
        for _ in range(300):  # the node's service process, once throughput.py has started it
            found = subprocess.run(["pgrep", "-P", str(bench.pid), "-f", "screener.cli serve"], capture_output=True,
                                   text=True).stdout.split()
            if found:
                pid = found[0]
                break
            time.sleep(0.2)
        if pid is None:
            raise SystemExit("the node did not start")
        time.sleep(10)  # start-up, model load and the first films in flight
        with tempfile.TemporaryDirectory() as tmp:
            raw_path = a.raw or Path(tmp) / "raw.txt"
            subprocess.run(["py-spy", "record", "--subprocesses", "--nonblocking", "-p", pid, "-d", str(int(a.seconds)),
                            "-r", str(a.rate), "-f", "raw", "-o", str(raw_path)], check=True, stdout=subprocess.DEVNULL)
            summarise(raw_path.read_text(), a.seconds, a.rate)
    finally:
        bench.wait(timeout=900)


if __name__ == "__main__":
    main()
