"""The quality suite: one test per new fault kind, the gates and the report."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from components.clean import CleanConfig, CleanResult, clean_tables, render_report
from components.ingest import ingest_sources
from shopml.quality import (
    CHECKS,
    QualityConfig,
    QualityGateError,
    enforce_gates,
    evaluate_checks,
    quality_config_from_env,
    repair_text,
    write_quality_json,
)
from shopml.security import Pseudonymizer

NOW = datetime(2025, 1, 1, tzinfo=UTC)
PSEUDO = Pseudonymizer(b"test-key")
EVENTS_HEADER = "user_id,item_id,event_type,timestamp\n"
GOOD_EVENT = "alice,i1,view,2024-01-01T00:00:00Z\n"
CATALOG = "item_id,title,category,price\ni1,Shoe,shoes,10\n"


def run_clean(
    tmp_path: Path, events: str, catalog: str = CATALOG, **config: object
) -> tuple[CleanResult, Path, Path]:
    (tmp_path / "events.csv").write_text(events, encoding="utf-8")
    (tmp_path / "catalog.csv").write_text(catalog, encoding="utf-8")
    ingest_sources(
        "files",
        tmp_path / "raw",
        events_path=str(tmp_path / "events.csv"),
        catalog_path=str(tmp_path / "catalog.csv"),
    )
    clean_config = CleanConfig(now=NOW, **config)  # type: ignore[arg-type]
    curated, quarantine = tmp_path / "curated", tmp_path / "quarantine"
    result = clean_tables(tmp_path / "raw", curated, quarantine, PSEUDO, clean_config)
    return result, curated, quarantine


def reasons_of(quarantine: Path, table: str = "events") -> list[str]:
    return list(
        pq.read_table(quarantine / f"{table}.parquet").column("reason").to_pylist()
    )


def test_near_duplicate_is_quarantined_and_the_first_kept(tmp_path: Path) -> None:
    events = EVENTS_HEADER + GOOD_EVENT + "alice,i1,view,2024-01-01T00:00:01Z\n"
    result, curated, quarantine = run_clean(tmp_path, events)

    assert reasons_of(quarantine) == ["near_duplicate"]
    quarantined = pq.read_table(quarantine / "events.parquet").to_pylist()[0]
    assert quarantined["source_row"] == 2
    kept = pq.read_table(curated / "events.parquet").to_pylist()
    assert [k["timestamp"].second for k in kept] == [0]
    report = result.tables["events"]
    assert report.rows_in == report.rows_kept + report.rows_quarantined == 2


def test_events_further_apart_than_the_window_are_kept(tmp_path: Path) -> None:
    events = EVENTS_HEADER + GOOD_EVENT + "alice,i1,view,2024-01-01T00:00:05Z\n"
    result, _, _ = run_clean(tmp_path, events)
    assert result.tables["events"].rows_quarantined == 0


def test_bot_user_events_are_all_quarantined(tmp_path: Path) -> None:
    burst = "".join(f"bot,i1,click,2024-01-01T00:00:{s:02d}Z\n" for s in range(60))
    burst += "".join(f"bot,i1,view,2024-01-01T00:00:{s:02d}.5Z\n" for s in range(10))
    result, curated, quarantine = run_clean(
        tmp_path, EVENTS_HEADER + GOOD_EVENT + burst, near_duplicate_window_s=0.0
    )

    assert reasons_of(quarantine) == ["bot_user"] * 70
    kept = pq.read_table(curated / "events.parquet").num_rows
    assert kept == 1
    assert result.tables["events"].reasons == {"bot_user": 70}


def test_a_busy_human_is_not_a_bot(tmp_path: Path) -> None:
    busy = "".join(f"carol,i1,view,2024-01-01T00:{m:02d}:00Z\n" for m in range(59))
    result, _, _ = run_clean(tmp_path, EVENTS_HEADER + busy)
    assert result.tables["events"].rows_quarantined == 0


@pytest.mark.parametrize(
    ("title", "expected", "repair"),
    [
        ("Tom &amp; Jerry", "Tom & Jerry", "title_html_entities"),
        ("Caf&eacute; &#39;Noir&#39;", "Café 'Noir'", "title_html_entities"),
        ("Shoe\x07 Pro", "Shoe Pro", "title_control_chars"),
    ],
    ids=["named-entity", "numeric-entities", "control-char"],
)
def test_catalog_text_is_repaired_and_counted(
    tmp_path: Path, title: str, expected: str, repair: str
) -> None:
    catalog = f'item_id,title,category,price\ni1,"{title}",shoes,10\n'
    result, curated, _ = run_clean(tmp_path, EVENTS_HEADER + GOOD_EVENT, catalog)

    assert pq.read_table(curated / "catalog.parquet").column("title").to_pylist() == [
        expected
    ]
    assert result.tables["catalog"].repairs == {repair: 1}
    assert result.tables["catalog"].rows_quarantined == 0


def test_a_title_of_only_control_characters_is_a_null_title(tmp_path: Path) -> None:
    catalog = CATALOG + 'i2,"\x01\x02",hats,3\n'
    _, _, quarantine = run_clean(tmp_path, EVENTS_HEADER + GOOD_EVENT, catalog)
    assert reasons_of(quarantine, "catalog") == ["null_title"]


def test_whitespace_is_trimmed_and_counted(tmp_path: Path) -> None:
    events = EVENTS_HEADER + " alice ,i1 ,view,2024-01-01T00:00:00Z\n"
    result, curated, _ = run_clean(tmp_path, events)
    assert result.tables["events"].repairs["whitespace"] == 2
    assert pq.read_table(curated / "events.parquet").column("item_id").to_pylist() == [
        "i1"
    ]


def test_repair_text_leaves_clean_text_alone() -> None:
    fixed, counts = repair_text(["plain", None, "a & b"])
    assert list(fixed) == ["plain", None, "a & b"]
    assert counts == {"html_entities": 0, "control_chars": 0}


def test_breached_threshold_names_check_figure_and_threshold(tmp_path: Path) -> None:
    events = EVENTS_HEADER + GOOD_EVENT + "bob,i9,view,2024-01-01T00:00:00Z\n"
    result, _, _ = run_clean(tmp_path, events)
    checks = evaluate_checks(
        result.tables, QualityConfig(max_referential_integrity=0.1)
    )

    with pytest.raises(QualityGateError) as caught:
        enforce_gates(checks)
    message = str(caught.value)
    assert "'referential_integrity' on table events" in message
    assert "50.00% of rows (1 of 2)" in message
    assert "threshold 10.00%" in message


def test_clean_data_passes_every_gate(tmp_path: Path) -> None:
    result, _, _ = run_clean(tmp_path, EVENTS_HEADER + GOOD_EVENT)
    assert {c.check for c in result.checks} == set(CHECKS)
    assert all(c.passed for c in result.checks)
    enforce_gates(result.checks)


def test_quality_json_holds_figures_and_thresholds(tmp_path: Path) -> None:
    events = EVENTS_HEADER + GOOD_EVENT + GOOD_EVENT
    result, _, _ = run_clean(tmp_path, events)
    summary = json.loads(write_quality_json(result.checks, QualityConfig()))

    duplicates = summary["tables"]["events"]["duplicates"]
    assert duplicates == {"rows": 1, "share": 0.5, "threshold": 0.1, "passed": False}
    assert summary["passed"] is False
    assert summary["config"]["max_duplicates"] == 0.1


def test_report_embeds_plots_and_the_verdict(tmp_path: Path) -> None:
    result, _, _ = run_clean(tmp_path, EVENTS_HEADER + GOOD_EVENT + GOOD_EVENT)
    page = render_report(result, result.checks)
    assert page.count("data:image/png;base64,iVBOR") == 2
    assert "Quality gates: FAILED" in page
    assert "BREACHED" in page


@pytest.mark.parametrize(
    "values",
    [{"max_nulls": 1.5}, {"max_everything": 0.1}],
    ids=["not-a-share", "unknown-check"],
)
def test_bad_thresholds_are_rejected(values: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="max_"):
        QualityConfig.from_mapping(values)


def test_thresholds_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPML_QUALITY_THRESHOLDS", '{"max_nulls": 0.2}')
    assert quality_config_from_env().max_nulls == 0.2
    monkeypatch.setenv("SHOPML_QUALITY_THRESHOLDS", "max_nulls=0.2")
    with pytest.raises(ValueError, match="not JSON"):
        quality_config_from_env()
