"""Receive throughput: the node's C-STORE SCP against DCMTK storescp, same files, same run.

    python bench/receive_throughput.py [--images 100] [--associations 4] [--source RG1_UNCR.dcm]

Makes N copies of a pydicom-data chest radiograph with distinct SOP Instance UIDs, then sends
them with DCMTK storescu over A parallel associations (N/A files each) to:

- the node's SCP (screener.node.receive): every file written to the spool through a temporary
  name, fsynced, renamed, directory fsynced, and its instance + job + event rows committed to
  SQLite (WAL, synchronous=FULL) before the C-STORE response says Success;
- DCMTK storescp (single process, the default) and storescp --fork (one process per
  association), writing files without fsync.

Reports MB/s and images/s from the first association opened to the last one closed.
"""

from __future__ import annotations

import argparse
import os
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
from screener.node.receive import ReceiveSettings, bound_port, start_scp, stop  # noqa: E402
from screener.store.db import create_schema, make_engine, session_factory  # noqa: E402
from tests.dcmtk import dcmtk_tool  # noqa: E402  (the real DCMTK, not pynetdicom's apps)


def make_files(source: str, n: int, folder: Path) -> list[Path]:
    ds = pydicom.dcmread(get_testdata_file(source))
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


def bench_node(files: list[Path], associations: int, work: Path, max_pdu: int) -> float:
    engine = make_engine(f"sqlite:///{work / 'node.db'}")
    create_schema(engine)
    settings = ReceiveSettings(spool_root=work / "spool", model_id="bench", patient_salt=b"bench-salt", port=0,
                               min_free_bytes=0, max_pdu=max_pdu)
    server = start_scp(settings, session_factory(engine))
    try:
        return send_all(bound_port(server), files, associations, settings.ae_title)
    finally:
        stop(server)
        engine.dispose()


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
    ap.add_argument("--max-pdu", type=int, default=ReceiveSettings.__dataclass_fields__["max_pdu"].default,
                    help="the node's maximum PDU length in bytes")
    ap.add_argument("--node-only", action="store_true", help="skip the storescp runs")
    ap.add_argument("--source", default="RG1_UNCR.dcm", help="pydicom-data file to copy (uncompressed: storescu sends it as is)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    try:
        files = make_files(a.source, a.images, work)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{a.images} x {a.source} ({mb:.0f} MB) over {a.associations} parallel associations (DCMTK storescu)")
        results = {f"node SCP (fsync + SQLite journal), max PDU {a.max_pdu}": bench_node(files, a.associations, work, a.max_pdu)}
        if not a.node_only:
            results["DCMTK storescp"] = bench_storescp(files, a.associations, work, fork=False)
            results["DCMTK storescp --fork"] = bench_storescp(files, a.associations, work, fork=True)
        print(f"{'receiver':<56}{'seconds':>9}{'MB/s':>9}{'images/s':>10}")
        for name, seconds in results.items():
            print(f"{name:<56}{seconds:>9.2f}{mb / seconds:>9.1f}{a.images / seconds:>10.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
