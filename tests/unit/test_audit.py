"""The hash-chained audit log: append, query, verify, tamper detection, asset wiring."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
import typer
from typer.testing import CliRunner

from shopml.assets import AssetStore
from shopml.audit import GENESIS, AuditLog, event_key
from shopml.cli_security import audit_app
from shopml.storage import LocalStore


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def log(store: LocalStore) -> AuditLog:
    audit = AuditLog(store, actor="user:tester")
    audit.record(None, "asset.write", "events@aaaa", "success", rows=3)
    audit.record(None, "asset.read", "events@aaaa", "success")
    audit.record(
        "serviceaccount:shopml:serving", "deploy.decision", "model@bb", "denied"
    )
    return audit


def test_events_are_numbered_chained_and_queryable(log: AuditLog) -> None:
    events = log.events()
    assert [e.seq for e in events] == [0, 1, 2]
    assert events[0].prev == GENESIS
    assert events[1].prev == events[0].hash
    assert events[2].actor == "serviceaccount:shopml:serving"
    assert [e.action for e in log.query(asset="events")] == [
        "asset.write",
        "asset.read",
    ]
    assert len(log.query(asset="events@aaaa")) == 2
    assert log.query(since=datetime.now(UTC) + timedelta(hours=1)) == []
    assert len(log.query(since=datetime.now(UTC) - timedelta(hours=1))) == 3


def test_intact_log_verifies(log: AuditLog) -> None:
    report = log.verify()
    assert report.is_intact, report.problems
    assert report.events == 3
    assert report.head == log.events()[-1].hash


def test_modified_line_is_detected(log: AuditLog, store: LocalStore) -> None:
    path = store.path(event_key(1))
    event = json.loads(path.read_text())
    event["outcome"] = "failure"
    path.write_text(json.dumps(event))

    problems = log.verify().problems
    assert any("seq 1: content does not match its hash" in p for p in problems)


def test_deleted_line_is_detected(log: AuditLog, store: LocalStore) -> None:
    store.path(event_key(1)).unlink()

    problems = log.verify().problems
    assert any("position 1 holds seq 2" in p for p in problems)
    assert any("seq 2: prev" in p for p in problems)


def test_deleted_newest_line_is_detected_against_a_recorded_head(
    log: AuditLog, store: LocalStore
) -> None:
    head = log.verify().head
    store.path(event_key(2)).unlink()

    assert log.verify().is_intact  # a shorter chain is valid on its own
    problems = log.verify(expected_head=head).problems
    assert problems and "newer events were deleted" in problems[0]


def test_rehashed_modification_breaks_the_next_link(
    log: AuditLog, store: LocalStore
) -> None:
    from shopml.audit import AuditEvent

    path = store.path(event_key(0))
    event = AuditEvent(**json.loads(path.read_text()))
    forged = AuditEvent(**{**event.__dict__, "actor": "user:someone-else", "hash": ""})
    forged = AuditEvent(**{**forged.__dict__, "hash": forged.compute_hash()})
    path.write_text(forged.to_json())

    problems = log.verify().problems
    assert len(problems) == 1
    assert problems[0].startswith("seq 1: prev")


def test_two_writers_keep_one_chain(store: LocalStore) -> None:
    first, second = AuditLog(store, actor="a"), AuditLog(store, actor="b")
    first.record(None, "x", "asset", "success")
    second.record(None, "x", "asset", "success")
    first.record(None, "x", "asset", "success")  # its cached head is stale: retries

    assert [e.actor for e in first.events()] == ["a", "b", "a"]
    assert first.verify().is_intact


@pytest.mark.parametrize(
    ("details", "message"),
    [
        ({"user": "Jane.Doe@example.com"}, "contains \\['email'\\]"),
        ({"note": ["call +1 415 555 2671"]}, "contains \\['phone'\\]"),
        ({"api_token": "abc"}, "looks like a secret"),
    ],
    ids=["email", "phone", "secret"],
)
def test_personal_data_and_secrets_are_refused(
    log: AuditLog, details: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        log.record(None, "asset.read", "events", "success", **details)
    assert len(log.events()) == 3


def test_unknown_outcome_is_refused(log: AuditLog) -> None:
    with pytest.raises(ValueError, match="outcome 'ok' is unknown"):
        log.record(None, "asset.read", "events", "ok")


def test_asset_store_records_writes_and_reads(store: LocalStore) -> None:
    audit = AuditLog(store, actor="user:tester")
    assets = AssetStore(store, audit=audit)
    table = pa.table({"item_id": ["i1", "i2"]})
    version = assets.put_table(
        "catalog",
        "curated",
        table,
        owner="o",
        classification={"item_id": "public"},
        producer="test",
        inputs=[],
    )
    assets.put_table(
        "catalog",
        "curated",
        table,
        owner="o",
        classification={"item_id": "public"},
        producer="test",
        inputs=[],
    )
    assets.read_table("catalog")

    events = audit.query(asset="catalog")
    assert [(e.action, e.outcome) for e in events] == [
        ("asset.write", "success"),
        ("asset.write", "unchanged"),
        ("asset.read", "success"),
    ]
    assert {e.asset for e in events} == {version.ref}
    assert events[0].details["rows"] == 2


def test_failed_read_is_audited(store: LocalStore) -> None:
    audit = AuditLog(store, actor="user:tester")
    assets = AssetStore(store, audit=audit)
    version = assets.put_table(
        "catalog",
        "curated",
        pa.table({"item_id": ["i1"]}),
        owner="o",
        classification={"item_id": "public"},
        producer="test",
        inputs=[],
    )
    store.path(version.prefix + "data.parquet").write_bytes(b"tampered")

    with pytest.raises(ValueError, match="the store was modified"):
        assets.read_table("catalog")
    assert audit.events()[-1].outcome == "failure"


def test_cli_verify_fails_on_a_tampered_log(
    log: AuditLog, store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # load_settings() finds the local store at $SHOPML_HOME/store.
    home = store.root.parent
    monkeypatch.setenv("SHOPML_HOME", str(home))
    app = typer.Typer()
    app.add_typer(audit_app, name="audit")
    runner = CliRunner()

    listed = runner.invoke(app, ["audit", "--asset", "events"])
    assert listed.exit_code == 0, listed.output
    assert [json.loads(line)["seq"] for line in listed.output.splitlines()] == [0, 1]
    assert runner.invoke(app, ["audit", "verify"]).exit_code == 0

    store.path(event_key(0)).write_text("{}")
    broken = runner.invoke(app, ["audit", "verify"])
    assert broken.exit_code == 1
    assert "BROKEN" in broken.output
