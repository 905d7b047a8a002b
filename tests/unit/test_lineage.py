"""OpenLineage events: START and COMPLETE per stage with schema and quality facets."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.clean import CleanConfig, clean_tables
from components.ingest import ingest_sources
from shopml import lineage
from shopml.lineage import lineage_path, parquet_dataset, read_events, start_run
from shopml.security import Pseudonymizer


@pytest.fixture(autouse=True)
def _fresh_client() -> None:
    lineage._state.update(client=None, key=None, warned=False)


def write_table(path: Path) -> Path:
    pq.write_table(pa.table({"a": ["x", None, "z"], "b": [1, 2, 3]}), path)
    return path


def test_a_run_writes_start_and_complete_with_facets(tmp_path: Path) -> None:
    source = write_table(tmp_path / "events.parquet")
    run = start_run("clean", [parquet_dataset(source)])
    quality = {
        "tables": {
            "events": {
                "nulls": {"rows": 1, "share": 0.33, "threshold": 0.5, "passed": True}
            }
        }
    }
    run.complete([parquet_dataset(source)], quality=quality)

    start, complete = read_events()
    assert (start["eventType"], complete["eventType"]) == ("START", "COMPLETE")
    assert start["run"]["runId"] == complete["run"]["runId"]
    assert complete["job"] == {"namespace": "shopml", "name": "clean", "facets": {}}
    dataset = complete["inputs"][0]
    assert [f["name"] for f in dataset["facets"]["schema"]["fields"]] == ["a", "b"]
    metrics = dataset["inputFacets"]["dataQualityMetrics"]
    assert metrics["rowCount"] == 3
    assert metrics["columnMetrics"]["a"]["nullCount"] == 1
    assertion = dataset["inputFacets"]["dataQualityAssertions"]["assertions"][0]
    assert (assertion["assertion"], assertion["success"]) == ("nulls", True)
    assert complete["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"] == 3


def test_fail_records_the_error(tmp_path: Path) -> None:
    run = start_run("train", [])
    run.fail(ValueError("too few events"))
    assert read_events()[-1]["eventType"] == "FAIL"
    assert (
        read_events()[-1]["run"]["facets"]["errorMessage"]["message"]
        == "too few events"
    )


def test_a_failing_emit_warns_once_and_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where SHOPML_HOME should be")
    monkeypatch.setenv("SHOPML_HOME", str(blocker))
    with caplog.at_level(logging.DEBUG, logger="shopml.lineage"):
        run = start_run("ingest", [])
        run.complete([])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "lineage emit failed" in warnings[0].getMessage()


def test_lineage_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPML_LINEAGE", "0")
    start_run("ingest", []).complete([])
    assert not lineage_path().exists()


def test_ingest_and_clean_emit_runs_with_quality_assertions(tmp_path: Path) -> None:
    (tmp_path / "events.csv").write_text(
        "user_id,item_id,event_type,timestamp\nu1,i1,view,2024-01-01\nu1,i9,view,2024-01-02\n"
    )
    (tmp_path / "catalog.csv").write_text("item_id,title\ni1,Shoe\n")
    ingest_sources(
        "files",
        tmp_path / "raw",
        events_path=str(tmp_path / "events.csv"),
        catalog_path=str(tmp_path / "catalog.csv"),
    )
    config = CleanConfig(now=datetime(2025, 1, 1, tzinfo=UTC))
    clean_tables(
        tmp_path / "raw", tmp_path / "c", tmp_path / "q", Pseudonymizer(b"k"), config
    )

    events = read_events()
    assert [(e["job"]["name"], e["eventType"]) for e in events] == [
        ("ingest", "START"),
        ("ingest", "COMPLETE"),
        ("clean", "START"),
        ("clean", "COMPLETE"),
    ]
    assert events[1]["inputs"][0]["name"].startswith("events.csv@")
    raw_events = next(
        i for i in events[3]["inputs"] if i["name"].endswith("events.parquet")
    )
    assertions = {
        a["assertion"]: a
        for a in raw_events["inputFacets"]["dataQualityAssertions"]["assertions"]
    }
    assert assertions["referential_integrity"]["actual"] == "0.5"
    assert assertions["referential_integrity"]["success"] is False
