"""Memory of the node's SCP while it receives one large dataset.

    python bench/receive_memory.py [--mb 200]

Makes one uncompressed radiograph of about --mb megabytes (the pydicom-data Philips CR, its
pixel rows repeated), sends it with DCMTK storescu to the node's SCP in this process, and
reports this process's peak resident memory before and after. Datasets stream to a file in
spool/.incoming as they arrive, so the peak should not grow with the dataset's size.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from screener.node.receive import ReceiveSettings, bound_port, start_scp, stop  # noqa: E402
from screener.store.db import create_schema, make_engine, session_factory  # noqa: E402
from tests.support.dcmtk import run_tool  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def make_dataset(path: Path, mb: float) -> None:
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    repeat = max(1, round(mb * 1e6 / len(ds.PixelData)))
    ds.PixelData = ds.PixelData * repeat
    ds.Rows = ds.Rows * repeat
    ds.save_as(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=200.0, help="approximate dataset size in MB")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        big = work / "big.dcm"
        # In another process: building it here would raise this process's peak before we measure.
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                        "from bench.receive_memory import make_dataset; from pathlib import Path; "
                        f"make_dataset(Path({str(big)!r}), {a.mb})"], check=True)
        size_mb = big.stat().st_size / 1e6

        engine = make_engine(f"sqlite:///{work / 'node.db'}")
        create_schema(engine)
        settings = ReceiveSettings(spool_root=work / "spool", model_id="bench", patient_salt=b"bench", port=0,
                                   min_free_bytes=0, max_dataset_bytes=2**40)
        server = start_scp(settings, session_factory(engine))
        before = peak_rss_mb()
        try:
            result = run_tool("storescu", "-aec", settings.ae_title, "127.0.0.1", bound_port(server), big)
        finally:
            stop(server)
            engine.dispose()
        if result.returncode != 0:
            raise SystemExit(f"storescu failed:\n{result.stdout[-2000:]}")
        after = peak_rss_mb()
        print(f"one {size_mb:.0f} MB dataset received: peak RSS {before:.0f} MB before, {after:.0f} MB after "
              f"(+{after - before:.0f} MB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
