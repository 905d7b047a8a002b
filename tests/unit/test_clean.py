"""The clean stage on tiny hand-written inputs: one test per fault kind, then all."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from components.clean import (
    REASONS,
    CleanConfig,
    CleanResult,
    clean,
    clean_tables,
    render_report,
)
from components.ingest import ingest, ingest_sources
from components.store import store
from shopml.security import Pseudonymizer

NOW = datetime(2025, 1, 1, tzinfo=UTC)
CONFIG = CleanConfig(now=NOW)
PSEUDO = Pseudonymizer(b"test-key")

EVENTS_HEADER = "user_id,item_id,event_type,timestamp,value\n"
GOOD_EVENT = "alice@example.com,i1,view,2024-01-01T00:00:00Z,\n"
CATALOG_HEADER = "item_id,title,category,price\n"
GOOD_ITEM = "i1,Running shoe,shoes,10.5\n"
USERS_HEADER = "user_id,age,gender,occupation,zip_code\n"
GOOD_USER = "alice@example.com,31,F,engineer,12345\n"


def run_clean(
    tmp_path: Path, events: str, catalog: str, users: str | None = None
) -> tuple[CleanResult, Path, Path]:
    """Write the CSV texts, ingest them as files, clean; return result and folders."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = {"events": events, "catalog": catalog, "users": users}
    for kind, text in paths.items():
        if text is not None:
            (tmp_path / f"{kind}.csv").write_text(text, encoding="utf-8")
    ingest_sources(
        "files",
        tmp_path / "raw",
        events_path=str(tmp_path / "events.csv"),
        catalog_path=str(tmp_path / "catalog.csv"),
        users_path=str(tmp_path / "users.csv") if users is not None else "",
    )
    curated, quarantine = tmp_path / "curated", tmp_path / "quarantine"
    result = clean_tables(tmp_path / "raw", curated, quarantine, PSEUDO, CONFIG)
    return result, curated, quarantine


EVENT_FAULTS = {
    "null_user_id": ",i1,view,2024-01-01T00:00:00Z,\n",
    "null_item_id": "bob,  ,view,2024-01-01T00:00:00Z,\n",
    "null_event_type": "bob,i1,,2024-01-01T00:00:00Z,\n",
    "null_timestamp": "bob,i1,view,,\n",
    "bad_timestamp": "bob,i1,view,yesterday,\n",
    "bad_value": "bob,i1,rate,2024-01-01T00:00:00Z,five\n",
    "bad_event_type": "bob,i1,like,2024-01-01T00:00:00Z,\n",
    "future_timestamp": "bob,i1,view,2025-01-03T00:00:00Z,\n",
    "early_timestamp": "bob,i1,view,1989-12-31T23:59:59Z,\n",
    "unknown_item": "bob,i9,view,2024-01-01T00:00:00Z,\n",
    "duplicate": GOOD_EVENT,
    "unreadable_row": 'bob,i1,view,"2024-01-01",1,extra,fields\n',
}


@pytest.mark.parametrize("reason", sorted(EVENT_FAULTS), ids=sorted(EVENT_FAULTS))
def test_event_fault_goes_to_quarantine_with_its_reason(
    tmp_path: Path, reason: str
) -> None:
    events = EVENTS_HEADER + GOOD_EVENT + EVENT_FAULTS[reason]
    result, curated, quarantine = run_clean(
        tmp_path, events, CATALOG_HEADER + GOOD_ITEM
    )

    report = result.tables["events"]
    assert (report.rows_in, report.rows_kept, report.rows_quarantined) == (2, 1, 1)
    assert report.reasons == {reason: 1}
    rejected = pq.read_table(quarantine / "events.parquet").to_pylist()
    assert [(r["reason"], r["source_file"], r["source_row"]) for r in rejected] == [
        (reason, "events.csv", 2)
    ]
    kept = pq.read_table(curated / "events.parquet").to_pylist()
    assert [(k["item_id"], k["event_type"]) for k in kept] == [("i1", "view")]


def test_quarantine_keeps_the_original_text_of_unreadable_values(
    tmp_path: Path,
) -> None:
    events = EVENTS_HEADER + GOOD_EVENT + "bob,i1,rate,yesterday,4\n"
    _, _, quarantine = run_clean(tmp_path, events, CATALOG_HEADER + GOOD_ITEM)

    row = pq.read_table(quarantine / "events.parquet").to_pylist()[0]
    assert row["timestamp"] == "yesterday"
    assert row["user_id"] == "bob"
    assert row["value"] == "4"


@pytest.mark.parametrize(
    "cell", ["n/a", '"n/a"', "NULL", '"NULL"', "NaN", "nan"], ids=lambda c: c
)
def test_a_rate_value_that_is_not_a_number_is_quarantined_quoted_or_not(
    tmp_path: Path, cell: str
) -> None:
    events = EVENTS_HEADER + GOOD_EVENT + f"bob,i1,rate,2024-01-01T00:00:00Z,{cell}\n"
    result, curated, quarantine = run_clean(
        tmp_path, events, CATALOG_HEADER + GOOD_ITEM
    )

    report = result.tables["events"]
    assert (report.rows_in, report.rows_kept, report.rows_quarantined) == (2, 1, 1)
    assert report.reasons == {"bad_value": 1}
    row = pq.read_table(quarantine / "events.parquet").to_pylist()[0]
    assert (row["value"], row["reason"], row["source_row"]) == (
        cell.strip('"'),
        "bad_value",
        2,
    )
    kept = pq.read_table(curated / "events.parquet").to_pylist()
    assert [k["event_type"] for k in kept] == ["view"]


def test_an_empty_rate_value_is_missing_not_bad(tmp_path: Path) -> None:
    events = EVENTS_HEADER + GOOD_EVENT + 'bob,i1,rate,2024-01-01T00:00:00Z,""\n'
    result, curated, _ = run_clean(tmp_path, events, CATALOG_HEADER + GOOD_ITEM)

    assert result.tables["events"].rows_quarantined == 0
    kept = pq.read_table(curated / "events.parquet").to_pylist()
    assert sorted((k["event_type"], k["value"]) for k in kept) == [
        ("rate", None),
        ("view", None),
    ]


def test_an_unquoted_null_word_in_a_catalog_price_is_bad_price(
    tmp_path: Path,
) -> None:
    catalog = CATALOG_HEADER + GOOD_ITEM + "i2,Hat,hats,NULL\n"
    result, _, quarantine = run_clean(tmp_path, EVENTS_HEADER + GOOD_EVENT, catalog)

    assert result.tables["catalog"].reasons == {"bad_price": 1}
    row = pq.read_table(quarantine / "catalog.parquet").to_pylist()[0]
    assert (row["item_id"], row["price"]) == ("i2", "NULL")


def test_event_type_case_and_whitespace_are_repaired_and_counted(
    tmp_path: Path,
) -> None:
    events = (
        EVENTS_HEADER + " alice@example.com ,i1, Click ,1704067200000,\n" + GOOD_EVENT
    )
    result, curated, _ = run_clean(tmp_path, events, CATALOG_HEADER + GOOD_ITEM)

    assert result.tables["events"].repairs == {"event_type": 1, "whitespace": 2}
    assert result.tables["events"].rows_quarantined == 0
    kept = pq.read_table(curated / "events.parquet").to_pylist()
    assert sorted(k["event_type"] for k in kept) == ["click", "view"]
    # Same raw id after stripping: one pseudonym for both rows.
    assert len({k["user_id"] for k in kept}) == 1


CATALOG_FAULTS = {
    "null_item_id": ",Hat,hats,3\n",
    "null_title": "i2,   ,hats,3\n",
    "bad_price": "i2,Hat,hats,cheap\n",
    "negative_price": "i2,Hat,hats,-1\n",
    "duplicate": GOOD_ITEM,
    "duplicate_id": "i1,Another shoe,shoes,12\n",
}


@pytest.mark.parametrize("reason", sorted(CATALOG_FAULTS), ids=sorted(CATALOG_FAULTS))
def test_catalog_fault_goes_to_quarantine_with_its_reason(
    tmp_path: Path, reason: str
) -> None:
    catalog = CATALOG_HEADER + GOOD_ITEM + CATALOG_FAULTS[reason]
    result, curated, quarantine = run_clean(
        tmp_path, EVENTS_HEADER + GOOD_EVENT, catalog
    )

    assert result.tables["catalog"].reasons == {reason: 1}
    rejected = pq.read_table(quarantine / "catalog.parquet").to_pylist()
    assert [(r["reason"], r["source_row"]) for r in rejected] == [(reason, 2)]
    kept = pq.read_table(curated / "catalog.parquet").to_pylist()
    assert [(k["item_id"], k["title"], k["price"]) for k in kept] == [
        ("i1", "Running shoe", 10.5)
    ]


def test_events_of_a_quarantined_item_are_unknown_items(tmp_path: Path) -> None:
    catalog = CATALOG_HEADER + GOOD_ITEM + "i2,,hats,3\n"
    events = EVENTS_HEADER + GOOD_EVENT + "bob,i2,view,2024-01-01T00:00:00Z,\n"
    result, _, _ = run_clean(tmp_path, events, catalog)

    assert result.tables["catalog"].reasons == {"null_title": 1}
    assert result.tables["events"].reasons == {"unknown_item": 1}


@pytest.mark.parametrize(
    ("reason", "row"),
    [
        ("null_user_id", ",40,M,artist,99999\n"),
        ("duplicate", GOOD_USER),
        ("duplicate_id", "alice@example.com,32,F,engineer,12345\n"),
    ],
    ids=["null_user_id", "duplicate", "duplicate_id"],
)
def test_user_fault_goes_to_quarantine_with_its_reason(
    tmp_path: Path, reason: str, row: str
) -> None:
    users = USERS_HEADER + GOOD_USER + row
    result, _, quarantine = run_clean(
        tmp_path, EVENTS_HEADER + GOOD_EVENT, CATALOG_HEADER + GOOD_ITEM, users
    )

    assert result.tables["users"].reasons == {reason: 1}
    assert result.tables["users"].rows_kept == 1
    assert pq.read_table(quarantine / "users.parquet").column("reason").to_pylist() == [
        reason
    ]


def all_faults(tmp_path: Path) -> tuple[CleanResult, Path, Path]:
    events = EVENTS_HEADER + GOOD_EVENT + "".join(EVENT_FAULTS.values())
    events += "bob-raw-7731,i1,purchase,2024-06-01T12:00:00+02:00,19.99\n"
    catalog = CATALOG_HEADER + GOOD_ITEM + "".join(CATALOG_FAULTS.values())
    users = USERS_HEADER + GOOD_USER + "bob-raw-7731,52,M,doctor,55555\n"
    return run_clean(tmp_path, events, catalog, users)


def test_counts_reconcile_for_every_table(tmp_path: Path) -> None:
    result, curated, quarantine = all_faults(tmp_path)

    for kind, report in result.tables.items():
        kept = pq.read_table(curated / f"{kind}.parquet").num_rows
        rejected = pq.read_table(quarantine / f"{kind}.parquet").num_rows
        assert (
            report.rows_in
            == kept + rejected
            == report.rows_kept + report.rows_quarantined
        )
        assert sum(report.reasons.values()) == report.rows_quarantined
    assert result.tables["events"].rows_kept == 2
    assert result.tables["events"].reasons == dict.fromkeys(EVENT_FAULTS, 1)
    assert set(result.tables["events"].reasons) <= set(REASONS)
    metrics = result.metrics()
    assert metrics["events_rows_in"] == 14.0
    assert metrics["events_reason_unknown_item"] == 1.0


def test_curated_tables_hold_pseudonyms_and_no_raw_ids_or_pii(tmp_path: Path) -> None:
    _, curated, _ = all_faults(tmp_path)

    events = pq.read_table(curated / "events.parquet")
    users = pq.read_table(curated / "users.parquet")
    assert users.column_names == ["user_id"]
    expected = {
        PSEUDO.pseudonymize("alice@example.com"),
        PSEUDO.pseudonymize("bob-raw-7731"),
    }
    assert set(events.column("user_id").to_pylist()) == expected
    assert set(users.column("user_id").to_pylist()) == expected

    for path in curated.glob("*.parquet"):
        values = {
            str(v)
            for column in pq.read_table(path).to_pydict().values()
            for v in column
        }
        for raw in ("alice@example.com", "bob-raw-7731", "12345", "engineer", "doctor"):
            assert raw not in values, f"{raw} leaked into {path.name}"


def test_curated_events_are_sorted_and_typed(tmp_path: Path) -> None:
    _, curated, _ = all_faults(tmp_path)

    events = pq.read_table(curated / "events.parquet")
    assert str(events.schema.field("timestamp").type) == "timestamp[us, tz=UTC]"
    rows = events.to_pylist()
    keys = [(r["user_id"], r["timestamp"], r["item_id"]) for r in rows]
    assert keys == sorted(keys)
    purchase = next(r for r in rows if r["event_type"] == "purchase")
    assert purchase["timestamp"] == datetime(2024, 6, 1, 10, tzinfo=UTC)
    assert purchase["value"] == 19.99


def test_cleaning_twice_gives_identical_curated_tables(tmp_path: Path) -> None:
    _, first, _ = all_faults(tmp_path / "a")
    _, second, _ = all_faults(tmp_path / "b")

    for kind in ("events", "catalog", "users"):
        assert pq.read_table(first / f"{kind}.parquet").equals(
            pq.read_table(second / f"{kind}.parquet")
        )


def test_report_names_every_reason_and_count(tmp_path: Path) -> None:
    result, _, _ = all_faults(tmp_path)

    page = render_report(result)
    assert page.startswith("<!DOCTYPE html>")
    for reason in EVENT_FAULTS:
        assert f"<td>{reason}</td>" in page
    assert "<td>events</td><td>14</td><td>2</td><td>12</td><td>85.71</td>" in page


def test_missing_catalog_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    with pytest.raises(FileNotFoundError, match="catalog"):
        clean_tables(tmp_path / "raw", tmp_path / "c", tmp_path / "q", PSEUDO)


def test_components_declare_the_artifacts_the_pipeline_wires() -> None:
    assert set(ingest.component_spec.inputs) == {
        "source",
        "events_uri",
        "catalog_uri",
        "users_uri",
    }
    assert set(ingest.component_spec.outputs) == {"raw"}
    assert set(clean.component_spec.inputs) == {"raw"}
    assert set(clean.component_spec.outputs) == {
        "curated",
        "quarantine",
        "metrics",
        "report",
    }
    assert set(store.component_spec.inputs) == {"curated", "quarantine"}
    assert set(store.component_spec.outputs) == {"stored"}
