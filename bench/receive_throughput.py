"""Receive throughput: the node's C-STORE SCP against DCMTK storescp, same files, same run.

    python bench/receive_throughput.py [--images 100] [--associations 4] [--repeats 3] [--source RG1_UNCR.dcm]

Makes N copies of a pydicom-data chest radiograph with distinct SOP Instance UIDs, then sends
them with DCMTK storescu over A parallel associations (N/A files each) to:

- the node's SCP as `screener serve` runs it (screener.node.receivers: [node] receive_processes
  processes on one port): every dataset streamed to a file as it arrives, fsynced, renamed into
  the spool, directory fsynced, and its instance + job + event rows committed to SQLite (WAL,
  synchronous=FULL) before the C-STORE response says Success;
- DCMTK storescp (single process, the default) and storescp --fork (one process per
  association), writing files without fsync.

Reports MB/s and images/s from the first association opened to the last one closed. The
receivers take turns, --repeats rounds of each, and the table gives each one's median round
(with the slowest and fastest): on a small shared machine one round can be off by 30 %.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from screener.config import NodeSettings  # noqa: E402
from screener.node.receive import ReceiveSettings  # noqa: E402
from screener.node.receivers import ReceiverPool  # noqa: E402
from screener.store.db import create_schema, make_engine  # noqa: E402
from tests.support.dcmtk import dcmtk_tool  # noqa: E402  (the real DCMTK, not pynetdicom's apps)


def make_files(source: str, n: int, folder: Path) -> list[Path]:
    ds = pydicom.dcmread(get_testdata_file(source))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.9999.{os.getpid()}.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"img{i:04d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


def send_all(port: int, files: list[Path], associations: int, called_ae: str) -> float:
    """Seconds from the first association to the last, A storescu processes in parallel."""
    chunks = [files[i::associations] for i in range(associations)]
    storescu = dcmtk_tool("storescu")

    def send(chunk: list[Path]) -> None:
        out = subprocess.run([storescu, "-aet", "BENCH", "-aec", called_ae, "127.0.0.1", str(port), *map(str, chunk)],
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"storescu failed: {out.stdout[-500:]} {out.stderr[-500:]}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(associations) as pool:
        list(pool.map(send, chunks))
    return time.perf_counter() - t0


def bench_node(files: list[Path], associations: int, work: Path, max_pdu: int, processes: int) -> float:
    url = f"sqlite:///{work / 'node.db'}"
    engine = make_engine(url)
    create_schema(engine)
    engine.dispose()
    settings = ReceiveSettings(spool_root=work / "spool", model_id="bench", patient_salt=b"bench-salt", port=0,
                               min_free_bytes=0, max_pdu=max_pdu)
    pool = ReceiverPool(settings, url, processes, log_level=logging.WARNING)  # what screener serve runs, quieter
    try:
        return send_all(pool.start(), files, associations, settings.ae_title)
    finally:
        pool.stop()


def bench_storescp(files: list[Path], associations: int, work: Path, fork: bool) -> float:
    port = free_port()
    out_dir = work / ("storescp_fork" if fork else "storescp")
    out_dir.mkdir()
    args = [dcmtk_tool("storescp"), "--aetitle", "STORESCP", "--output-directory", str(out_dir), "+xa"]
    proc = subprocess.Popen(args + (["--fork"] if fork else []) + [str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        return send_all(port, files, associations, "STORESCP")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--associations", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="rounds per receiver, taken in turn (median reported)")
    ap.add_argument("--max-pdu", type=int, default=ReceiveSettings.__dataclass_fields__["max_pdu"].default,
                    help="the node's maximum PDU length in bytes")
    ap.add_argument("--processes", type=int, default=NodeSettings.receive_processes,
                    help="the node's receive processes ([node] receive_processes; default as shipped)")
    ap.add_argument("--node-only", action="store_true", help="skip the storescp runs")
    ap.add_argument("--source", default="RG1_UNCR.dcm", help="pydicom-data file to copy (uncompressed: storescu sends it as is)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    node = f"node SCP, {a.processes} process{'es' if a.processes > 1 else ''} (fsync + SQLite journal)"
    receivers = {node: lambda out: bench_node(files, a.associations, out, a.max_pdu, a.processes)}
    if not a.node_only:
        receivers["DCMTK storescp"] = lambda out: bench_storescp(files, a.associations, out, fork=False)
        receivers["DCMTK storescp --fork"] = lambda out: bench_storescp(files, a.associations, out, fork=True)
    try:
        files = make_files(a.source, a.images, work / "sent")
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{a.images} x {a.source} ({mb:.0f} MB) over {a.associations} parallel associations (DCMTK storescu), "
              f"{a.repeats} rounds each")
        seconds: dict[str, list[float]] = {name: [] for name in receivers}
        for _ in range(a.repeats):
            for name, run in receivers.items():
                out = Path(tempfile.mkdtemp(dir=work))
                seconds[name].append(run(out))
                shutil.rmtree(out)  # each round starts from an empty folder, as the first did
        print(f"{'receiver':<52}{'MB/s':>8}{'(min-max)':>14}{'images/s':>10}")
        median = {name: statistics.median(times) for name, times in seconds.items()}
        for name, times in seconds.items():
            spread = f"{mb / max(times):.0f}-{mb / min(times):.0f}"
            print(f"{name:<52}{mb / median[name]:>8.1f}{spread:>14}{a.images / median[name]:>10.1f}")
        if not a.node_only:
            print(f"node / storescp: {median['DCMTK storescp'] / median[node]:.2f}x; "
                  f"node / storescp --fork: {median['DCMTK storescp --fork'] / median[node]:.2f}x (medians)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
