"""Attacks on the receive path, measured: what an honest caller sees while each one runs.

    python bench/hostile_input.py                 # this checkout
    python bench/hostile_input.py --repo ../old   # another checkout of the project (before/after)

Starts the SCP of the checkout given (screener.node.receive.start_scp, in this process, on a
free loopback port, with whatever timeout settings that version has, set to 2 s), then:

1. 20 connections send the first 3 bytes of a PDU (04 00 00); a C-ECHO from another address;
2. 50 connections send nothing; a C-ECHO from another address;
3. an associated peer sends a P-DATA header, then one byte every 150 ms: when is it closed?
4. a Deflated Explicit VR LE dataset of ~1 MB that inflates to 1 GiB, with max_dataset_bytes
   64 MiB: the C-STORE status and the growth of this process's peak resident memory.

Each attack is bounded (15 s); "held" means the node still had not let go when the bench did.
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                        help="checkout whose screener package is attacked (default: this one)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support.attacks import deflate_bomb  # this checkout's, before the other's path comes first

    sys.path.insert(0, str(args.repo.resolve()))  # the screener package attacked
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

    import screener
    from screener.node.receive import ReceiveSettings, bound_port, start_scp, stop
    from screener.store.db import create_schema, make_engine, session_factory

    print(f"screener from {Path(screener.__file__).resolve().parent}")
    work = Path(tempfile.mkdtemp(prefix="hostile-"))
    (work / "spool" / ".incoming").mkdir(parents=True)
    tempfile.tempdir = str(work / "spool" / ".incoming")
    engine = make_engine(f"sqlite:///{work / 'node.db'}")
    create_schema(engine)
    known = {f.name for f in dataclasses.fields(ReceiveSettings)}
    wanted = dict(spool_root=work / "spool", model_id="bench", patient_salt=b"bench", port=0, min_free_bytes=0,
                  max_dataset_bytes=64 << 20, acse_timeout_s=2.0, network_timeout_s=2.0)
    receive = ReceiveSettings(**{k: v for k, v in wanted.items() if k in known})
    # A fresh SCP per attack: what one attack leaves held must not decide the next one's result.
    server = start_scp(receive, session_factory(engine))
    port = bound_port(server)

    def restart() -> None:
        nonlocal server, port
        stop(server)
        server = start_scp(receive, session_factory(engine))
        port = bound_port(server)

    def echo(source: str = "127.0.0.2") -> str:
        ae = AE(ae_title="HONEST")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 5
        started = time.monotonic()
        assoc = ae.associate("127.0.0.1", port, ae_title="CXRBMD", bind_address=(source, 0))
        if not assoc.is_established:
            return f"{'A-ASSOCIATE-RJ' if assoc.is_rejected else 'no association'} after {time.monotonic() - started:.2f} s"
        status = assoc.send_c_echo()
        assoc.release()
        return f"C-ECHO status 0x{status.Status:04X} in {time.monotonic() - started:.2f} s"

    def released(sockets: list[socket.socket], limit_s: float = 15.0) -> str:
        started = time.monotonic()
        for sock in sockets:
            sock.settimeout(max(0.01, limit_s - (time.monotonic() - started)))
            try:
                while sock.recv(65536):
                    pass
            except (TimeoutError, socket.timeout):
                for other in sockets:  # let the node go, so it can be stopped
                    other.close()
                return f"held ({limit_s:g} s and counting)"
            except OSError:
                pass
        return f"all closed by the node after {time.monotonic() - started:.1f} s"

    partial = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    for sock in partial:
        sock.sendall(b"\x04\x00\x00")
    time.sleep(0.3)
    print(f"1. 20 partial PDUs:    honest caller: {echo()}; attack connections: {released(partial)}")

    restart()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    time.sleep(0.3)
    print(f"2. 50 idle connects:   honest caller: {echo()}; attack connections: {released(idle)}")

    restart()
    ae = AE(ae_title="SLOW")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRBMD")
    raw = assoc.dul.socket.socket
    started = time.monotonic()
    raw.sendall(b"\x04\x00" + struct.pack(">I", 1000))
    while assoc.is_alive() and time.monotonic() - started < 15:
        try:
            raw.sendall(b"\x00")
        except OSError:
            break
        time.sleep(0.15)
    state = "held (15 s and counting)" if assoc.is_alive() else f"closed by the node after {time.monotonic() - started:.1f} s"
    print(f"3. 1 byte per 150 ms:  {state}")
    if assoc.is_alive():
        raw.close()
    restart()

    bomb = work / "bomb.dcm"
    deflate_bomb(bomb, 1 << 30)
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file as it is
    ae = AE(ae_title="BOMBER")
    ae.add_requested_context(ComputedRadiographyImageStorage, DeflatedExplicitVRLittleEndian)
    before = _peak_rss()
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRBMD")
    status = assoc.send_c_store(bomb)
    assoc.release()
    answer = f"0x{status.Status:04X}" if status and "Status" in status else "no response"
    print(f"4. deflate bomb ({bomb.stat().st_size >> 10} KiB -> 1 GiB): C-STORE {answer} after "
          f"{time.monotonic() - started:.1f} s; peak resident memory +{(_peak_rss() - before) >> 20} MiB")
    stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
