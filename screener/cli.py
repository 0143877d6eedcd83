"""`screener`: the command line of the CXR-BMD screening node.

Commands available in this release:

  screener process PATH... --out DIR
                              the whole pipeline on files: a validated SR (TID 1500), a GSPS
                              overlay and a JSON result per eligible image, the reason otherwise
  screener bundle [DIR]       show a model bundle's manifest (the shipped demo bundle by default)
  screener check-config FILE  validate a TOML configuration and print the effective settings
  screener serve [--config FILE]
                              the DICOM node: receive, queue, process, deliver, audit
  screener status [--config FILE]
                              queue depth, delivery backlog, last errors
  screener conformance [--config FILE]
                              the DICOM Conformance Statement for this configuration
  screener echo DEST [--config FILE]
                              C-ECHO a configured destination
  screener requeue (--job ID | --failed-since TIME) [--config FILE]
                              queue finished jobs again
  screener backfill run --from DATE --to DATE [--config FILE]
                              screen a PACS archive: C-FIND chest studies, C-MOVE them to
                              this node, throttled, resumable; `backfill status` shows progress
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the commands import what they use when they run (a fast --help)
    from screener.store.backfill import RunProgress

__all__ = ["main", "build_parser"]


def _cmd_process(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    import dataclasses

    from screener.config import Settings, build_decode_limits, build_eligibility_rules, build_inference, load_config
    from screener.pipeline.bundle import ModelBundle
    from screener.process import Processor, find_inputs

    settings = load_config(a.config) if a.config else Settings()
    if a.precision:
        settings = dataclasses.replace(settings, model=dataclasses.replace(settings.model, precision=a.precision))
    files = find_inputs(a.paths, exclude=a.out)
    if not files:
        print("error: no input files found", file=sys.stderr)
        return 2
    bundle = ModelBundle.load(a.bundle or (settings.model.bundle or None))
    processor = Processor(
        bundle, a.out, device=a.device or settings.model.device, batch_size=a.batch_size or settings.model.batch_size,
        decode_workers=a.workers, rules=build_eligibility_rules(settings.eligibility), limits=build_decode_limits(settings.decode),
        previews=a.png, inference=build_inference(settings.model),
    )
    if bundle.demo:
        print(f"NOTE: {bundle.manifest['demo_statement']}", file=sys.stderr)
    rows = []
    with tqdm(total=len(files), desc="processing", unit="image", disable=len(files) < 2 or a.quiet, file=sys.stderr) as bar:
        for outcome in processor.run(files):
            rows.append(outcome)
            bar.update(1)
    print(f"{'file':<36} {'result':<34} {'L1-L4 BMD':>9} {'T':>6} {'category':<12} {'s':>5}")
    for o in rows:
        name = o.file.name[-36:]
        if o.status != "reported" or o.estimate is None:
            print(f"{name:<36} {(o.status + ': ' + o.code)[:34]:<34} {'':>9} {'':>6} {'':<12} {o.seconds['total']:>5.1f}")
            continue
        t = o.estimate.tscores
        tval = f"{t.tscore['L1-L4']:.2f}" if t.tscore else "-"
        cat = t.category.value if t.category else "-"
        print(f"{name:<36} {'reported' + (' (DEMO)' if o.estimate.demo else ''):<34} {t.bmd['L1-L4']:>9.3f} {tval:>6} {cat:<12} {o.seconds['total']:>5.1f}")
    counts = {s: sum(1 for o in rows if o.status == s) for s in ("reported", "ineligible", "error")}
    print(f"{len(rows)} files: {counts['reported']} reported, {counts['ineligible']} ineligible, {counts['error']} errors; "
          f"SR, GSPS, result image, PDF and JSON in {a.out}")
    for o in rows:
        if o.status != "reported":
            print(f"  {o.file.name}: {o.reason}")
    return 0


def _cmd_bundle(a: argparse.Namespace) -> int:
    from screener.pipeline.bundle import ModelBundle

    bundle = ModelBundle.load(a.path)
    m = bundle.manifest
    print(json.dumps(m, indent=2) if a.json else "\n".join([
        f"bundle      {bundle.path}",
        f"model id    {bundle.model_id}",
        f"intended    {m['intended_use']}",
        f"demo        {'YES - ' + m['demo_statement'] if bundle.demo else 'no'}",
        f"landmarks   {m['landmarks']['scheme']} ({len(m['landmarks']['names'])} points), input {m['landmarks']['input_size']} px, "
        f"{m['landmarks'].get('views', 1)} view(s){' and each mirrored' if m['landmarks'].get('flip') else ''}"
        + ("" if "extent_points" not in m["landmarks"] else ", with the lungs' apex and base (extent rule "
           + ", ".join(f"{k} {v:g}" for k, v in m["landmarks"].get("extent_rule", {}).items()) + ")"),
        "view check  " + (f"classifier at {m['view']['input_size']} px over {len(m['view']['kinds'])} kinds (frontal, "
                          + ", ".join(m["view"]["kinds"][1:]) + ")" if "view" in m else "none (the landmark gate alone)"),
        f"ROIs        {m['rois']['recipe']}: {', '.join(m['rois']['names'])} at {m['rois']['size']} px",
        "BMD models  " + "; ".join(f"{x['config']['backbone']}/{x['config']['head']} on {len(x['config']['rois'])} ROIs" for x in m['bmd']['models']),
        f"T-scores    {m['tscore_table']['name']}",
    ]))
    return 0


def _cmd_check_config(a: argparse.Namespace) -> int:
    from screener.config import ConfigError, load_config

    try:
        settings = load_config(a.path)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(settings.to_dict(), indent=2))
    return 0


def _cmd_conformance(a: argparse.Namespace) -> int:
    from screener.conformance import statement

    settings = _settings(a)
    # the patient salt and model id do not show in the statement: placeholders, nothing generated
    receive = settings.node.receive_settings(spool_root=settings.data_dir / "spool", model_id="-", patient_salt=b"-")
    print(statement(receive, settings.dispatch.calling_ae, settings.backfill.calling_ae))
    return 0


def _settings(a: argparse.Namespace):  # type: ignore[no-untyped-def]
    from screener.config import Settings, load_config

    # --config, else $SCREENER_CONFIG (the container image sets it), else the embedded defaults
    path = a.config or os.environ.get("SCREENER_CONFIG")
    return load_config(path) if path else Settings(base_dir=str(Path.cwd()))


def _cmd_serve(a: argparse.Namespace) -> int:
    from screener.node.receivers import PortInUse
    from screener.logs import configure_logging
    from screener.service import Service

    settings = _settings(a)
    configure_logging()
    try:
        return Service(settings).serve_forever()
    except PortInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _sessions(settings):  # type: ignore[no-untyped-def]
    from screener.store.db import make_engine, session_factory

    if not settings.storage.database_url and not (settings.data_dir / "screener.db").exists():
        raise FileNotFoundError(f"no database at {settings.data_dir / 'screener.db'}: has `screener serve` run?")
    return session_factory(make_engine(settings.database_url))


def _cmd_status(a: argparse.Namespace) -> int:
    from screener.store.status import status_report

    with _sessions(_settings(a))() as session:
        report = status_report(session)
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    print("jobs        " + "  ".join(f"{k} {v}" for k, v in report["jobs"].items()))
    for row in report["deliveries"]:
        print(f"deliveries  {row['destination']:<16} {row['state']:<8} {row['count']}")
    print("last errors" + ("" if report["last_errors"] else "  none"))
    for e in report["last_errors"]:
        print(f"  {e['time']} {e['kind']:<20} job {e['job_id']} {e['sop_instance_uid'] or ''} {e['reason_code'] or ''} "
              f"{(e['message'] or '')[:120]}")
    return 0


def _cmd_echo(a: argparse.Namespace) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    settings = _settings(a)
    found = [d for d in settings.destinations if d.name == a.destination]
    if not found:
        names = ", ".join(d.name for d in settings.destinations) or "none configured"
        print(f"error: no destination {a.destination!r} ({names})", file=sys.stderr)
        return 2
    dest = found[0].destination()
    ae = AE(ae_title=settings.dispatch.calling_ae)
    ae.add_requested_context(Verification)
    for attribute in ("connection_timeout", "acse_timeout", "dimse_timeout", "network_timeout"):
        setattr(ae, attribute, a.timeout)
    t = time.perf_counter()
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        print(f"{dest.name} ({dest.label}): no association ({'rejected' if assoc.is_rejected else 'unreachable or aborted'})",
              file=sys.stderr)
        return 1
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = status.get("Status") if status else None
    if code != 0:
        print(f"{dest.name} ({dest.label}): C-ECHO failed (status {code})", file=sys.stderr)
        return 1
    print(f"{dest.name} ({dest.label}): C-ECHO ok in {time.perf_counter() - t:.3f} s")
    return 0


def _cmd_requeue(a: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from screener.store.queue import failed_job_ids, requeue_jobs

    sessions = _sessions(_settings(a))
    with sessions() as session:
        if a.job is not None:
            ids = [a.job]
        else:
            since = datetime.fromisoformat(a.failed_since)
            ids = failed_job_ids(session, since if since.tzinfo else since.replace(tzinfo=UTC))
        done = requeue_jobs(session, ids, reason="screener requeue")
    print(f"requeued {len(done)} job(s): {', '.join(map(str, done)) or '-'}")
    skipped = sorted(set(ids) - set(done))
    if skipped:
        print(f"not requeued (unknown, queued or running): {', '.join(map(str, skipped))}", file=sys.stderr)
    return 0 if done or not ids else 1


def _cmd_backfill_run(a: argparse.Namespace) -> int:
    import signal
    import threading

    # First, before torch and the bundle load (seconds), so that a stop asked for meanwhile is
    # a clean stop too.
    stop = threading.Event()
    signalled = threading.Event()

    def on_signal(*_: object) -> None:
        signalled.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    from datetime import date

    from tqdm import tqdm

    from screener.backfill import AgeBand, Backfill, Plan
    from screener.config import ConfigError
    from screener.logs import configure_logging
    from screener.node.retrieve import Peer, QueryError
    from screener.pipeline.bundle import model_id_of, read_manifest

    settings = _settings(a)
    config = settings.backfill
    for key in ("source_ae_title", "source_host"):
        if not getattr(config, key):
            raise ConfigError(f"backfill.{key}: required for `screener backfill run`: the PACS to query and "
                              "retrieve from ([backfill] source_ae_title, source_host, source_port)")
    first, last = date.fromisoformat(a.first), date.fromisoformat(a.last)
    if last < first:
        raise ValueError(f"--to {last} is before --from {first}")
    rules = settings.eligibility
    _, manifest = read_manifest(settings.model.bundle or None)  # its id only: the node's workers screen
    plan = Plan(
        peer=Peer(ae_title=config.source_ae_title, host=config.source_host, port=config.source_port,
                  calling_ae=config.calling_ae or settings.node.ae_title),
        destination_ae=config.move_destination or settings.node.ae_title, first=first, last=last,
        band=AgeBand(a.min_age if a.min_age is not None else rules.min_age, a.max_age,
                     include_unknown=rules.missing_age == "accept"),
        modalities=tuple(m.upper() for m in rules.modalities), body_parts=tuple(b.upper() for b in rules.body_parts),
        model_id=model_id_of(manifest))
    configure_logging()
    backfill = Backfill(plan, config.limits(), _sessions(settings))
    print(f"backfill run {backfill.run_id} ({'new' if backfill.created else 'resumed'}): {plan.peer.label}, "
          f"studies {first}..{last}, age {plan.band.min_age}..{plan.band.max_age or ''}, into {plan.destination_ae}, "
          f"model {plan.model_id}", file=sys.stderr)
    errors: list[BaseException] = []

    def body() -> None:
        try:
            backfill.query(stop)
            backfill.retrieve(stop)
        except (QueryError, OSError) as error:
            errors.append(error)
            stop.set()

    worker = threading.Thread(target=body, name="backfill", daemon=True)
    worker.start()
    with tqdm(desc="studies", unit="study", disable=a.quiet, file=sys.stderr) as bar:
        while worker.is_alive():
            worker.join(1.0)
            now = backfill.progress()
            bar.total = now.total
            bar.n = now.total - now.left
            bar.set_postfix(images=now.images, screened=now.screened, failed=now.counts.get("failed", 0))
            bar.refresh()
    final = backfill.progress()
    print(_progress_line(final))
    errors += backfill.fatal
    if errors:
        print(f"error: {errors[0]}; run the same command again to resume", file=sys.stderr)
        return 1
    if final.finished_at is None:
        if signalled.is_set():
            print("stopped; run the same command again to resume", file=sys.stderr)
            return 0
        print("error: the run did not finish (see the log); run the same command again to resume", file=sys.stderr)
        return 1
    return 1 if final.counts.get("failed") else 0


def _progress_line(p: RunProgress) -> str:
    counts = "  ".join(f"{k} {p.counts.get(k, 0)}" for k in ("pending", "running", "done", "skipped", "failed"))
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(p.skipped.items()))
    state = f"finished {p.finished_at:%Y-%m-%d %H:%M}" if p.finished_at else (
        f"queried through {p.queried_through}" if p.queried_through else "not queried yet")
    return (f"run {p.run_id}  {p.source}  {p.first_date}..{p.last_date}  {state}\n"
            f"  studies {p.total}: {counts}" + (f" ({skipped})" if skipped else "") +
            f"\n  images retrieved {p.images}, screened {p.screened}  model {p.model_id}")


def _cmd_backfill_status(a: argparse.Namespace) -> int:
    from dataclasses import asdict

    from screener.store.backfill import progress, runs

    with _sessions(_settings(a))() as session:
        found = [progress(session, run_id) for run_id in runs(session)]
    if a.json:
        print(json.dumps([asdict(p) for p in found], indent=2, default=str))
        return 0
    if not found:
        print("no backfill has run")
    for p in found:
        print(_progress_line(p))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from screener.config import PRECISIONS

    p = argparse.ArgumentParser(prog="screener", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    from screener.audit import add_audit_parser

    add_audit_parser(sub)
    ps = sub.add_parser("process", help="run the whole pipeline on files: SR, GSPS, result image, PDF and JSON per image",
                        description="Runs decode, eligibility, landmarks, ROIs, BMD, T-score and report on DICOM files. "
                        "Writes <SOPInstanceUID>.sr.dcm, .gsps.dcm and .json per eligible image and a .json with the "
                        "reason for every other file. Exits non-zero only on usage errors: one bad file never stops the others.")
    ps.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders (searched recursively)")
    ps.add_argument("--out", type=Path, required=True, help="output folder")
    ps.add_argument("--bundle", type=Path, default=None, help="model bundle (default: config model.bundle, else the demo bundle)")
    ps.add_argument("--config", type=Path, default=None, help="TOML configuration for [model], [decode], [eligibility]")
    ps.add_argument("--device", default=None, help="cpu, cuda or auto (default: config model.device)")
    ps.add_argument("--batch-size", type=_positive_int, default=None, help="images per network batch (default: config model.batch_size)")
    ps.add_argument("--precision", choices=PRECISIONS, default=None,
                    help="number format of the BMD network (default: config model.precision; auto: half precision on a GPU, fp32 on the CPU)")
    ps.add_argument("--workers", type=_positive_int, default=2, help="decode threads")
    ps.add_argument("--png", action="store_true", help="also save <uid>.gsps.png: the GSPS graphics drawn on the image")
    ps.add_argument("--quiet", action="store_true", help="no progress bar")
    ps.set_defaults(func=_cmd_process)
    b = sub.add_parser("bundle", help="show a model bundle's manifest")
    b.add_argument("path", nargs="?", type=Path, default=None)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_cmd_bundle)
    c = sub.add_parser("check-config", help="validate a TOML configuration file")
    c.add_argument("path", type=Path)
    c.set_defaults(func=_cmd_check_config)
    cfg = dict(type=Path, default=None, help="TOML configuration (default: $SCREENER_CONFIG if set, else the embedded "
               "defaults, data in ./screener-data)")
    sv = sub.add_parser("serve", help="run the DICOM node until SIGTERM / Ctrl-C")
    sv.add_argument("--config", **cfg)
    sv.set_defaults(func=_cmd_serve)
    st = sub.add_parser("status", help="queue depth, delivery backlog, last errors")
    st.add_argument("--config", **cfg)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)
    cf = sub.add_parser("conformance", help="print the DICOM Conformance Statement for this configuration",
                        description="The DICOM Conformance Statement (Markdown), generated from the code and the "
                        "configuration: AE titles, accepted and proposed presentation contexts, statuses, limits "
                        "and timeouts, TLS, the objects sent, character sets.")
    cf.add_argument("--config", **cfg)
    cf.set_defaults(func=_cmd_conformance)
    ec = sub.add_parser("echo", help="C-ECHO a configured destination; non-zero exit when it fails")
    ec.add_argument("destination", help="the destination's name in [[destinations]]")
    ec.add_argument("--config", **cfg)
    ec.add_argument("--timeout", type=float, default=10.0, help="seconds")
    ec.set_defaults(func=_cmd_echo)
    rq = sub.add_parser("requeue", help="queue a finished job again, or all failed since a time")
    which = rq.add_mutually_exclusive_group(required=True)
    which.add_argument("--job", type=int, default=None, help="job id")
    which.add_argument("--failed-since", default=None, help="ISO time, e.g. 2025-01-31T08:00 (UTC unless an offset is given)")
    rq.add_argument("--config", **cfg)
    rq.set_defaults(func=_cmd_requeue)
    bf = sub.add_parser("backfill", help="screen a PACS archive: query, retrieve, throttled and resumable",
                        description="Screen the chest radiographs a PACS already holds. `run` queries the [backfill] "
                        "source by C-FIND for CR/DX studies in the date range, keeps patients in the age band and "
                        "retrieves their chest series by C-MOVE to this node's SCP (`screener serve` must be "
                        "running), throttled by [backfill] associations, images_per_minute, quiet_hours and "
                        "max_queued_jobs. Progress is in the database: the same command again resumes, and nodes "
                        "sharing a PostgreSQL database share the work. Ctrl-C stops after the retrievals in hand.")
    bsub = bf.add_subparsers(dest="backfill_command", required=True)
    br = bsub.add_parser("run", help="query and retrieve a date range (resumes a run with the same range)")
    br.add_argument("--from", dest="first", required=True, help="first study date, YYYY-MM-DD")
    br.add_argument("--to", dest="last", required=True, help="last study date, YYYY-MM-DD (inclusive)")
    br.add_argument("--min-age", type=float, default=None, help="youngest patient, years (default: eligibility.min_age)")
    br.add_argument("--max-age", type=float, default=None, help="oldest patient, years (default: none)")
    br.add_argument("--config", **cfg)
    br.add_argument("--quiet", action="store_true", help="no progress bar")
    br.set_defaults(func=_cmd_backfill_run)
    bs = bsub.add_parser("status", help="every backfill run: studies by state, images retrieved and screened")
    bs.add_argument("--config", **cfg)
    bs.add_argument("--json", action="store_true")
    bs.set_defaults(func=_cmd_backfill_status)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from screener.config import ConfigError
    from screener.pipeline.bundle import BundleError

    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`screener status | head`): stop quietly, as a Unix tool killed by
        # SIGPIPE would (exit 128 + 13). Point stdout at /dev/null so the flush at exit cannot
        # raise the same error again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except (BundleError, ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
