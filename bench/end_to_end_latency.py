"""End-to-end latency of the running node: image received -> SR acknowledged by the PACS.

    python bench/end_to_end_latency.py [--images 20] [--sr-gsps-only]

Starts `screener serve` (CPU, demo bundle, SQLite; worker poll 0.2 s, dispatch every 0.5 s)
with DCMTK storescp as the destination PACS, sends N copies of the pydicom-data Philips CR
(distinct SOP Instance UIDs) one storescu association each, back to back, waits until every
SR is delivered, and reads the latencies from the node's own audit trail
(`screener audit throughput`): "received" is written once the last byte is on disk and
committed, "sent" once the destination acknowledged the SR's C-STORE. The destination takes
all four objects (SR, GSPS, result image, PDF), as by default; --sr-gsps-only switches the
result image and the PDF off for it (`send_result_image`/`send_pdf = false`), so neither is
built: run both to see what the two pictures cost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.support.common import rg1_file  # noqa: E402
from tests.support.dcmtk import dcmtk_tool, run_tool  # noqa: E402
from tests.support.common import free_port, wait_for  # noqa: E402
from tests.support.serve import Node  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--sr-gsps-only", action="store_true", help="the destination takes no result image and no PDF")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp_name:
        tmp = Path(tmp_name)
        pacs_port, pacs_dir = free_port(), tmp / "pacs"
        pacs_dir.mkdir()
        pacs = subprocess.Popen([dcmtk_tool("storescp"), "--aetitle", "PACS", "--output-directory", str(pacs_dir), "+xa",
                                 str(pacs_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        node = Node(tmp, pacs_port)
        if a.sr_gsps_only:  # the destination table is the config's last
            node.config.write_text(node.config.read_text() + "send_result_image = false\nsend_pdf = false\n")
        try:
            wait_for("storescp", lambda: run_tool("echoscu", "-aec", "PACS", "127.0.0.1", pacs_port).returncode == 0, 15)
            node.start()
            ds = pydicom.dcmread(rg1_file())
            files = []
            for i in range(a.images):
                ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.7777.{int(time.time())}.{i + 1}"
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                files.append(tmp / f"img{i:03d}.dcm")
                ds.save_as(files[-1])
            t0 = time.perf_counter()
            for f in files:
                if node.send(f).returncode != 0:
                    raise RuntimeError(f"storescu failed for {f}")
            sent = "SELECT count(*) FROM deliveries WHERE state = 'sent' AND kind = 'sr'"
            wait_for("every SR delivered", lambda: node.query(sent)[0][0] >= a.images, 60 + 10 * a.images, 0.5)
            wall = time.perf_counter() - t0
            out = subprocess.run([sys.executable, "-m", "screener.cli", "audit", "throughput", "--since", "1h", "--bucket", "day",
                                  "--format", "json", "--config", str(node.config)], capture_output=True, text=True, cwd=ROOT, check=True)
            row = json.loads(out.stdout)[0]
        finally:
            node.stop()
            pacs.terminate()
            pacs.wait(timeout=10)
    objects = "SR + GSPS" if a.sr_gsps_only else "SR, GSPS, result image, PDF"
    print(f"{a.images} images ({objects}), one association each, back to back; all SRs acknowledged after {wall:.1f} s "
          f"({a.images / wall:.2f} images/s end to end on this machine)")
    print(f"received -> job done:         p50 {row['done_p50_s']:.2f} s, p95 {row['done_p95_s']:.2f} s")
    print(f"received -> SR acknowledged:  p50 {row['sr_p50_s']:.2f} s, p95 {row['sr_p95_s']:.2f} s")


if __name__ == "__main__":
    main()
