"""Audit queries, output formats, the audit command line and the SQL views (migration 0002)."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from screener import audit
from screener.cli import main as cli_main
from screener.store.db import alembic_config, create_schema, make_engine, session_factory
from screener.store.models import Base
from tests.support.audit import VIEWS, minutes, outcome, populate
from tests.support.store import MODEL, T0


@pytest.fixture
def db(tmp_path: Path) -> tuple[Engine, sessionmaker[Session], str]:
    """Five instances: positive screen with one dead GSPS; normal with its SR pending; ineligible;
    failed; next day a second positive screen."""
    url = f"sqlite:///{tmp_path / 'screener.db'}"
    engine = make_engine(url)
    create_schema(engine)
    factory = session_factory(engine)

    populate(factory)
    yield engine, factory, url
    engine.dispose()


# ---------------------------------------------------------------- queries


def test_history_by_accession_study_and_sop(db) -> None:
    _, factory, _ = db
    with factory() as s:
        rows = audit.history(s, accession="ACC1")
        assert [r["kind"] for r in rows] == ["received", "claimed", "done", "sent", "dead", "sent"]
        assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
        assert [r["destination"] for r in rows][3:] == ["PACS", "PACS", "ARCHIVE"]
        assert "L1-L4 BMD 0.620 g/cm2" in rows[2]["detail"] and "osteoporosis" in rows[2]["detail"]
        assert "association rejected" in rows[4]["detail"]
        assert audit.history(s, study_uid="1.2.3.100") == rows
        assert audit.history(s, sop_uid="1.2.3.4.1") == rows
        assert audit.history(s, sop_uid="1.2.3.4.1", accession="ACC2") == []
        assert s.in_transaction() is False
        with pytest.raises(ValueError, match="history"):
            audit.history(s)


def test_failures_since(db) -> None:
    _, factory, _ = db
    with factory() as s:
        rows = audit.failures(s, T0)
        assert [(r["kind"], r["accession_number"]) for r in rows] == [
            ("dead", "ACC1"), ("ineligible", "ACC3"), ("failed", "ACC4")]
        dead, inel, failed = rows
        assert (dead["destination"], dead["delivery_kind"]) == ("PACS", "gsps")
        assert "association rejected" in dead["message"]
        assert inel["reason_code"] == "body-part" and inel["message"] == "BodyPartExamined is KNEE"
        assert "not retryable: decoder crashed" in failed["message"]
        assert [r["kind"] for r in audit.failures(s, minutes(25))] == ["failed"]
        with pytest.raises(ValueError, match="since"):
            audit.failures(s, datetime(2024, 6, 1))


def test_backlog_per_destination(db) -> None:
    _, factory, _ = db
    with factory() as s:
        rows = audit.backlog(s, now=minutes(60))
    assert rows == [{"destination": "PACS", "pending": 1, "retrying": 0, "oldest_queued_at": minutes(14),
                     "oldest_age_s": 46 * 60.0, "next_attempt_at": minutes(14)}]


def test_throughput_per_hour_and_day(db) -> None:
    _, factory, _ = db
    with factory() as s:
        hours = audit.throughput(s, T0, "hour")
        days = audit.throughput(s, T0, "day")
        assert audit.throughput(s, T0 + timedelta(days=3), "day") == []
        with pytest.raises(ValueError, match="bucket"):
            audit.throughput(s, T0, "week")
    assert [h["bucket"] for h in hours] == ["2024-06-01T12:00Z", "2024-06-02T12:00Z"]
    first = hours[0]
    assert (first["received"], first["done"], first["ineligible"], first["failed"], first["sr_sent"]) == (4, 2, 1, 1, 2)
    # received -> done: 120 s and 240 s; received -> SR acknowledged: 180 s (PACS) and 300 s (ARCHIVE)
    assert (first["done_p50_s"], first["done_p95_s"]) == (180.0, 234.0)
    assert (first["sr_p50_s"], first["sr_p95_s"]) == (240.0, 294.0)
    assert (hours[1]["done_p50_s"], hours[1]["sr_p50_s"]) == (60.0, 120.0)
    assert [(d["bucket"], d["received"], d["done"], d["sr_sent"]) for d in days] == [
        ("2024-06-01", 4, 2, 2), ("2024-06-02", 1, 1, 1)]
    # only events since the start count; latency still uses the earlier received time
    late = audit.throughput(factory(), minutes(4), "hour")[0]
    assert (late["received"], late["done"], late["sr_sent"], late["sr_p50_s"]) == (3, 1, 1, 300.0)


def test_percentile_interpolates() -> None:
    assert audit.percentile([], 50) is None
    assert audit.percentile([5.0], 95) == 5.0
    assert audit.percentile([1, 2, 3, 4], 50) == 2.5
    assert audit.percentile([10, 0, 20], 95) == pytest.approx(19.0)


def test_positives_in_period(db) -> None:
    _, factory, _ = db
    with factory() as s:
        rows = audit.positives(s, T0, T0 + timedelta(days=2))
        assert [(r["accession_number"], r["sop_instance_uid"]) for r in rows] == [
            ("ACC1", "1.2.3.4.1"), ("ACC5", "1.2.3.4.5")]
        assert rows[0]["bmd_l1_l4"] == pytest.approx(0.62) and rows[0]["tscore_l1_l4"] == pytest.approx(-3.1)
        assert rows[0]["bmd_l4"] == pytest.approx(0.65)
        assert rows[0]["who_category"] == "osteoporosis"
        assert [r["accession_number"] for r in audit.positives(s, T0, minutes(60))] == ["ACC1"]
        assert audit.positives(s, minutes(3), minutes(60)) == []
        with pytest.raises(ValueError, match="until"):
            audit.positives(s, minutes(60), T0)


def test_result_fields_read_the_versioned_document_only() -> None:
    doc = outcome(0.8, -1.5, "osteopenia").to_json()
    fields = audit.result_fields(doc)
    assert (fields["bmd_l1_l4"], fields["tscore_l1_l4"], fields["who_category"], fields["code"]) == (
        0.8, -1.5, "osteopenia", "eligible")
    assert audit.result_fields(outcome(0.8, None, None).to_json())["tscore_l1_l4"] is None
    assert audit.result_fields(None)["bmd_l1_l4"] is None
    # a document without a version (the shape before migration 0004) is not guessed at
    assert audit.result_fields(doc["result"]) == audit.result_fields(None)


# ---------------------------------------------------------------- formats


ROWS = [{"time": T0, "kind": "done", "detail": "a, \"b\"\nc", "n": 1.5},
        {"time": minutes(1), "kind": "sent", "detail": None, "n": None}]


def test_render_table() -> None:
    out = audit.render(ROWS, "table").splitlines()
    assert out[0].split() == ["time", "kind", "detail", "n"]
    assert set(out[1]) <= {"-", " "}
    assert out[2].startswith("2024-06-01T12:00:00Z  done")
    assert out[3].split()[-2:] == ["-", "-"]  # missing values shown as "-"
    assert len(out) == 4  # the newline inside a message does not break the row
    assert audit.render([], "table") == "(no rows)\n"


def test_render_json_and_csv() -> None:
    data = json.loads(audit.render(ROWS, "json"))
    assert data[0] == {"time": "2024-06-01T12:00:00Z", "kind": "done", "detail": "a, \"b\"\nc", "n": 1.5}
    assert data[1]["detail"] is None
    rows = list(csv.DictReader(io.StringIO(audit.render(ROWS, "csv"))))
    assert rows[0]["detail"] == "a, \"b\"\nc" and rows[0]["time"] == "2024-06-01T12:00:00Z"
    assert rows[1]["n"] == ""
    assert json.loads(audit.render([], "json")) == []
    with pytest.raises(ValueError, match="format"):
        audit.render(ROWS, "xml")


# ---------------------------------------------------------------- command line


def test_parse_time() -> None:
    now = datetime(2024, 6, 10, tzinfo=UTC)
    assert audit.parse_time("24h", now=now) == now - timedelta(hours=24)
    assert audit.parse_time("7d", now=now) == now - timedelta(days=7)
    assert audit.parse_time("90m", now=now) == now - timedelta(minutes=90)
    assert audit.parse_time("2024-06-01") == T0 - timedelta(hours=12)
    assert audit.parse_time("2024-06-01T12:00Z") == T0
    assert audit.parse_time("2024-06-01T14:00+02:00") == T0
    with pytest.raises(ValueError, match="ISO 8601"):
        audit.parse_time("yesterday")


def test_cli_each_command(db, capsys) -> None:
    _, _, url = db
    base = ["--database-url", url]
    assert cli_main(["audit", "history", "--accession", "ACC1", "--format", "json", *base]) == 0
    assert [r["kind"] for r in json.loads(capsys.readouterr().out)][:3] == ["received", "claimed", "done"]
    assert cli_main(["audit", "failures", "--since", "2024-06-01T12:00Z", "--format", "csv", *base]) == 0
    assert [r["kind"] for r in csv.DictReader(io.StringIO(capsys.readouterr().out))] == ["dead", "ineligible", "failed"]
    assert cli_main(["audit", "backlog", *base]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("destination") and lines[2].split()[:3] == ["PACS", "1", "0"]
    assert cli_main(["audit", "throughput", "--since", "2024-06-01", "--bucket", "day", "--format", "json", *base]) == 0
    assert [r["bucket"] for r in json.loads(capsys.readouterr().out)] == ["2024-06-01", "2024-06-02"]
    assert cli_main(["audit", "positives", "--since", "2024-06-01", "--until", "2024-06-03", "--format", "csv", *base]) == 0
    assert [r["accession_number"] for r in csv.DictReader(io.StringIO(capsys.readouterr().out))] == ["ACC1", "ACC5"]


def test_cli_reads_database_url_from_config(db, tmp_path: Path, capsys) -> None:
    _, _, url = db
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndatabase_url = "{url}"\n')
    assert cli_main(["audit", "history", "--sop", "1.2.3.4.3", "--format", "json", "--config", str(config)]) == 0
    assert [r["kind"] for r in json.loads(capsys.readouterr().out)] == ["received", "claimed", "ineligible"]


@pytest.mark.parametrize("argv, option", [
    (["failures", "--since", "yesterday"], "--since"),
    (["positives", "--since", "7d", "--until", "soon"], "--until"),
    (["throughput", "--bucket", "week"], "--bucket"),
    (["backlog", "--format", "xml"], "--format"),
])
def test_cli_bad_values_name_the_option(argv: list[str], option: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["audit", *argv])
    assert exc.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


def test_cli_usage_errors(tmp_path: Path, capsys) -> None:
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    assert cli_main(["audit", "backlog", "--database-url", missing]) == 2
    assert "no SQLite file" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
    assert cli_main(["audit", "history", "--database-url", missing]) == 2
    assert "--study, --accession or --sop" in capsys.readouterr().err


# ---------------------------------------------------------------- views


def test_views_do_not_disturb_the_schema_comparison(db) -> None:
    engine, _, _ = db
    with engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata)
        assert diff == []
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert c.scalar(text("SELECT version_num FROM alembic_version")) == head == "0006"


def test_view_instance_history(db) -> None:
    engine, _, _ = db
    with engine.connect() as c:
        rows = {r.accession_number: r for r in c.execute(text("SELECT * FROM v_instance_history"))}
    assert sorted(rows) == ["ACC1", "ACC2", "ACC3", "ACC4", "ACC5"]
    acc1 = rows["ACC1"]
    assert (acc1.job_state, acc1.model_id, acc1.who_category) == ("done", MODEL, "osteoporosis")
    assert acc1.bmd_l1_l4 == pytest.approx(0.62) and acc1.bmd_l2 == pytest.approx(0.63)
    assert acc1.tscore_l1_l4 == pytest.approx(-3.1)
    assert (acc1.deliveries_pending, acc1.deliveries_sent, acc1.deliveries_dead) == (0, 2, 1)
    assert (rows["ACC2"].who_category, rows["ACC2"].deliveries_pending) == ("normal", 1)
    # the precision the BMD network ran at; none recorded for a result from before 0006
    assert (acc1.bmd_precision, rows["ACC2"].bmd_precision, rows["ACC5"].bmd_precision) == ("fp32", "bf16", None)
    assert (rows["ACC3"].job_state, rows["ACC3"].result_code, rows["ACC3"].bmd_l1_l4) == ("ineligible", "body-part", None)
    assert (rows["ACC4"].job_state, rows["ACC4"].last_error) == ("failed", "corrupt-pixel-data: decoder crashed")


def test_view_failures_backlog_and_positives(db) -> None:
    engine, _, _ = db
    with engine.connect() as c:
        failures = c.execute(text("SELECT kind, accession_number, destination, reason_code, message "
                                  "FROM v_failures ORDER BY time")).all()
        backlog = c.execute(text("SELECT destination, pending, retrying, oldest_age_s FROM v_delivery_backlog")).all()
        positives = c.execute(text("SELECT accession_number, sop_instance_uid, bmd_l1_l4, tscore_l1_l4 "
                                   "FROM v_positive_screens ORDER BY completed_at")).all()
    assert [(f.kind, f.accession_number, f.destination) for f in failures] == [
        ("dead", "ACC1", "PACS"), ("ineligible", "ACC3", None), ("failed", "ACC4", None)]
    assert failures[1].reason_code == "body-part" and failures[1].message == "BodyPartExamined is KNEE"
    assert [(b.destination, b.pending, b.retrying) for b in backlog] == [("PACS", 1, 0)]
    assert backlog[0].oldest_age_s > 0
    assert [(p.accession_number, p.sop_instance_uid) for p in positives] == [("ACC1", "1.2.3.4.1"), ("ACC5", "1.2.3.4.5")]
    assert positives[0].bmd_l1_l4 == pytest.approx(0.62) and positives[1].tscore_l1_l4 == pytest.approx(-2.6)


def test_views_downgrade_and_upgrade_again(db) -> None:
    engine, _, _ = db
    config = alembic_config()
    with engine.begin() as c:
        config.attributes["connection"] = c
        command.downgrade(config, "0001")
    with engine.connect() as c:
        names = set(c.scalars(text("SELECT name FROM sqlite_master WHERE type = 'view'")))
        assert names == set()
        assert c.scalar(text("SELECT COUNT(*) FROM events")) > 0
    create_schema(engine)
    with engine.connect() as c:
        assert set(c.scalars(text("SELECT name FROM sqlite_master WHERE type = 'view'"))) == set(VIEWS)


def test_postgresql_view_text_uses_its_json_operators() -> None:
    import importlib.util

    path = Path(audit.__file__).parent / "store" / "migrations" / "versions" / "0002_views.py"
    spec = importlib.util.spec_from_file_location("views_0002", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    pg = module.view_sql("postgresql")
    assert set(pg) == set(module.VIEWS) and list(pg)[-1] == "v_positive_screens"  # after the view it reads
    assert "json_extract" not in "".join(pg.values())
    assert "((j.result_json) -> 'result' -> 'bmd_g_cm2' ->> 'L1-L4')" in pg["v_instance_history"]
    assert "EXTRACT(EPOCH FROM" in pg["v_delivery_backlog"]
    assert ":" not in "".join(pg.values()).replace("::", "")  # no bind-parameter look-alikes for text()


def test_queries_leave_no_transaction_open(db) -> None:
    """The session can go straight to a queue function, which refuses an open transaction."""
    from datetime import UTC, datetime

    _, factory, _ = db
    wide = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))
    with factory() as s:
        assert audit.history(s, accession="ACC1") and not s.in_transaction()
        assert audit.failures(s, wide[0]) and not s.in_transaction()
        assert audit.positives(s, *wide) and not s.in_transaction()
