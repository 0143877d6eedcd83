"""Images per second through the running node, for 1..N worker processes, in the same run.

    python bench/throughput.py [--images 16] [--processes 1 2] [--json out.json]

For each worker-process count: starts `screener serve` (CPU, demo bundle, SQLite, the count as
`[worker] workers`, DCMTK storescp as the destination taking SR, GSPS, result image and PDF),
sends N films in two storescu associations at once (half the pydicom-data Philips CR uncompressed, half
its JPEG 2000 lossless copy, each with its own SOP Instance UID), and measures from the first
image received to the last SR acknowledged by the PACS, from the node's audit trail. Prints
images/s per count and the ratio to one process: the same films on the same machine in the
same run, so the ratio is what to compare, not the absolute figure of a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.support.common import rg1_file, wait_for  # noqa: E402
from tests.support.dcmtk import dcmtk_tool, storescp  # noqa: E402
from tests.support.films import renumbered_copies  # noqa: E402
from tests.support.serve import Node  # noqa: E402


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def run(processes: int, images: int, work: Path) -> dict[str, float]:
    work.mkdir(parents=True)
    paths = renumbered_copies([rg1_file(), rg1_file("RG1_J2KR.dcm")], work / "films", images,
                              f"1.2.826.0.1.3680043.10.511.{int(time.time())}")
    with storescp(work) as (port, _):
        node = Node(work, port)
        node.config.write_text(node.config.read_text().replace("workers = 1 ", f"workers = {processes} "))
        node.start()
        try:
            t0 = time.monotonic()
            # two associations at once, as two modalities would: the uncompressed films, and the
            # JPEG 2000 ones proposed as JPEG 2000 lossless (-xv), so the node decodes them
            senders = [subprocess.Popen([dcmtk_tool("storescu"), *extra, "-aet", node.calling, "-aec", "CXRBMD",
                                         "127.0.0.1", str(node.port), *map(str, paths[start::2])],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                       for start, extra in ((0, []), (1, ["-xv"]))]
            for sender in senders:
                out, _ = sender.communicate(timeout=600)
                assert sender.returncode == 0, out
            wait_for("every job finished", lambda: node.query(
                "select count(*) from jobs where state in ('done', 'ineligible', 'failed')") == [(images,)], 1800, 0.5)
            failed = node.query("select state, count(*) from jobs where state != 'done' group by state")
            if failed:
                raise SystemExit(f"{processes} process(es): not every film was screened: {failed}")
            wait_for("every SR acknowledged", lambda: node.query(
                "select count(*) from deliveries where kind = 'sr' and state = 'sent'") == [(images,)], 600, 0.5)
            wall = time.monotonic() - t0
            [(first, last)] = node.query(
                "select (select min(time) from events where kind = 'received'), "
                "(select max(time) from events where kind = 'sent' and delivery_id in "
                "(select id from deliveries where kind = 'sr'))")
        finally:
            node.stop()
    span = (_time(last) - _time(first)).total_seconds()
    return {"processes": processes, "images": images, "seconds": span, "images_per_s": images / span,
            "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.processes:
            results.append(run(n, a.images, Path(tmp) / f"p{n}"))
            r = results[-1]
            print(f"{n} worker process(es): {r['images']} images in {r['seconds']:.1f} s = "
                  f"{r['images_per_s']:.2f} images/s", flush=True)
    base = results[0]["images_per_s"]
    print(f"\n{'processes':>9} {'images/s':>9} {'ratio':>6}")
    for r in results:
        print(f"{r['processes']:>9} {r['images_per_s']:>9.2f} {r['images_per_s'] / base:>6.2f}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
