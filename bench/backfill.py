"""The backfill's rate against a real Orthanc, and what it does to Orthanc's C-FIND response time.

    python bench/backfill.py [--films 60] [--associations 2] [--workers 2] [--json out.json]

Starts Orthanc holding N generated chest films (tests/support/archive.py) and `screener serve`
(CPU, demo bundle, SQLite), times a study-level C-FIND of the month (our own SCU,
screener.node.retrieve) ten times with the PACS idle, then runs `screener backfill run` with no
images-per-minute limit and times the same C-FIND every half second while it runs. Prints
images retrieved per second (first to last received), images screened per second (first
received to last job finished), and the C-FIND median and 95th percentile idle and during the
backfill, with their ratio: the same Orthanc on the same machine in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import date, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from screener.node.retrieve import Peer, find_studies  # noqa: E402
from tests.support.archive import backfill_stack, make_archive, run_backfill  # noqa: E402
from tests.support.common import wait_for  # noqa: E402


def _find_seconds(peer: Peer) -> float:
    t0 = time.perf_counter()
    find_studies(peer, date(2024, 1, 1), date(2024, 1, 31), ("CR", "DX"))
    return time.perf_counter() - t0


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def run(films: int, associations: int, workers: int, work: Path) -> dict[str, float]:
    archive = make_archive(work / "films", films)
    orthanc, node = backfill_stack(work, archive, workers, associations=associations, images_per_minute=0.0,
                                   max_queued_jobs=20)
    try:
        node.start()
        peer = Peer("ORTHANC", "127.0.0.1", orthanc.dicom, calling_ae="CXRBMD")  # a modality Orthanc knows
        idle = [_find_seconds(peer) for _ in range(10)]
        proc = run_backfill(node, "run", "--from", "2024-01-01", "--to", "2024-01-31", "--quiet",
                            log=work / "backfill.log")
        busy = []
        while proc.poll() is None:
            busy.append(_find_seconds(peer))
            time.sleep(0.5)
        if proc.returncode != 0:
            raise SystemExit(f"the backfill failed ({proc.returncode}):\n{(work / 'backfill.log').read_text()}")
        wait_for("every film screened", lambda: node.query(
            "select count(*) from jobs where state in ('done', 'ineligible', 'failed')") == [(films,)], 1800, 1.0)
        [(first, last_received)] = node.query("select min(time), max(time) from events where kind = 'received'")
        [(last_done,)] = node.query("select max(time) from events where kind in ('done', 'ineligible', 'failed')")
    finally:
        node.stop()
        orthanc.stop()
    t0 = datetime.fromisoformat(first)
    retrieved_s = (datetime.fromisoformat(last_received) - t0).total_seconds()
    screened_s = (datetime.fromisoformat(last_done) - t0).total_seconds()
    return {"films": films, "associations": associations, "workers": workers,
            "retrieved_per_s": films / retrieved_s, "screened_per_s": films / screened_s,
            "find_idle_median_s": statistics.median(idle), "find_idle_p95_s": _p95(idle),
            "find_busy_median_s": statistics.median(busy), "find_busy_p95_s": _p95(busy), "find_busy_n": len(busy)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--films", type=int, default=60)
    ap.add_argument("--associations", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(a.films, a.associations, a.workers, Path(tmp))
    print(f"{r['films']} films, {r['associations']} C-MOVE association(s), {r['workers']} worker process(es)")
    print(f"retrieved {r['retrieved_per_s']:.2f} images/s; screened {r['screened_per_s']:.2f} images/s "
          "(the queue limit holds retrieval to the screening pace)")
    print(f"C-FIND of the month: idle median {r['find_idle_median_s'] * 1000:.0f} ms (p95 "
          f"{r['find_idle_p95_s'] * 1000:.0f}); during the backfill median {r['find_busy_median_s'] * 1000:.0f} ms "
          f"(p95 {r['find_busy_p95_s'] * 1000:.0f}, {r['find_busy_n']} queries): "
          f"{r['find_busy_median_s'] / r['find_idle_median_s']:.2f}x")
    if a.json:
        a.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
