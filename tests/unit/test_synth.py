"""Synthetic logs: shape, determinism, and every fault kind caught by the clean stage."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from components.clean import CleanConfig, clean_tables
from components.ingest import ingest_sources
from shopml.security import Pseudonymizer
from shopml.synth import CATALOG_FAULTS, EVENT_FAULTS, SynthConfig, write_synthetic

NOW = datetime(2025, 1, 1, tzinfo=UTC)

#: Fault kind -> where the clean stage reports it: ("reasons" | "repairs", code).
EXPECTED = {
    "null_user_id": ("events", "reasons", "null_user_id"),
    "null_item_id": ("events", "reasons", "null_item_id"),
    "null_timestamp": ("events", "reasons", "null_timestamp"),
    "bad_timestamp": ("events", "reasons", "bad_timestamp"),
    "bad_value": ("events", "reasons", "bad_value"),
    "bad_event_type": ("events", "reasons", "bad_event_type"),
    "future_timestamp": ("events", "reasons", "future_timestamp"),
    "early_timestamp": ("events", "reasons", "early_timestamp"),
    "unknown_item": ("events", "reasons", "unknown_item"),
    "duplicate": ("events", "reasons", "duplicate"),
    "near_duplicate": ("events", "reasons", "near_duplicate"),
    "bot_user": ("events", "reasons", "bot_user"),
    "event_type_case": ("events", "repairs", "event_type"),
    "whitespace": ("events", "repairs", "whitespace"),
    "null_title": ("catalog", "reasons", "null_title"),
    "negative_price": ("catalog", "reasons", "negative_price"),
    "bad_price": ("catalog", "reasons", "bad_price"),
    "duplicate_id": ("catalog", "reasons", "duplicate_id"),
    "html_entities": ("catalog", "repairs", "title_html_entities"),
    "control_chars": ("catalog", "repairs", "title_control_chars"),
}


def test_every_fault_kind_has_an_expectation() -> None:
    assert set(EXPECTED) == set(EVENT_FAULTS) | set(CATALOG_FAULTS)


def test_shape_zipf_and_sessions(tmp_path: Path) -> None:
    files = write_synthetic(tmp_path, SynthConfig(n_events=20_000, chunk_events=7_000))
    events = pq.read_table(files.events).to_pandas()

    assert files.rows == {"events": 20_000, "catalog": 200, "users": 400}
    counts = events["item_id"].value_counts().to_numpy()
    assert counts[0] > 20 * np.median(counts)  # a few items take most events
    per_session = events.groupby("session_id")["user_id"].nunique()
    assert per_session.max() == 1  # a session belongs to one user
    assert 4 < len(events) / events["session_id"].nunique() < 12
    users = pq.read_table(files.users)
    assert {"email", "phone", "zip_code"} <= set(users.column_names)


def test_same_seed_same_files(tmp_path: Path) -> None:
    config = SynthConfig(n_events=3_000, faults={"duplicate": 0.05})
    first = write_synthetic(tmp_path / "a", config)
    second = write_synthetic(tmp_path / "b", config)
    assert pq.read_table(first.events).equals(pq.read_table(second.events))


def test_unknown_fault_is_rejected() -> None:
    with pytest.raises(ValueError, match="fault kinds"):
        SynthConfig(faults={"gremlins": 0.1})


@pytest.mark.parametrize("fault", sorted(EXPECTED), ids=sorted(EXPECTED))
def test_each_injected_fault_is_caught(tmp_path: Path, fault: str) -> None:
    config = SynthConfig(
        n_events=2_000, n_items=200, faults={fault: 0.05}, file_format="csv"
    )
    files = write_synthetic(tmp_path / "synth", config)
    ingest_sources(
        "files",
        tmp_path / "raw",
        events_path=str(files.events),
        catalog_path=str(files.catalog),
    )
    result = clean_tables(
        tmp_path / "raw", tmp_path / "c", tmp_path / "q", Pseudonymizer(b"k"),
        CleanConfig(now=NOW),
    )  # fmt: skip

    table, where, code = EXPECTED[fault]
    report = result.tables[table]
    assert getattr(report, where).get(code, 0) > 0
    assert report.rows_in == report.rows_kept + report.rows_quarantined
