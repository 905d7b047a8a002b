"""``shopml events push FILE`` on a SQLite online store: raw ids in, pseudonyms out."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from components.features import build_features
from shopml.cli_features import events_app
from shopml.config import load_settings
from shopml.features import OnlineFeatureClient
from shopml.security import load_pseudonymizer
from tests.unit.test_features import USER_A, tiny_events, write_tiny_curated

RAW_ALICE = "Alice@Example.com"


@pytest.fixture
def client(tmp_path: Path) -> OnlineFeatureClient:
    """Features built from the tiny events, USER_A renamed to Alice's pseudonym."""
    settings = load_settings()  # SHOPML_HOME from the autouse fixture
    alice = load_pseudonymizer(settings).pseudonymize(RAW_ALICE)
    events = tiny_events().replace({"user_id": {USER_A: alice}})
    build_features(write_tiny_curated(tmp_path / "curated", events), settings)
    return OnlineFeatureClient.from_settings(settings)


def test_push_appends_to_the_pseudonymized_users_sequence(
    client: OnlineFeatureClient, tmp_path: Path
) -> None:
    pseudonymize = load_pseudonymizer(load_settings()).pseudonymize
    alice, bob = pseudonymize(RAW_ALICE), pseudonymize("bob-7")
    before = client.user_sequence(alice)
    csv = tmp_path / "new.csv"
    csv.write_text(
        "user_id,item_id,event_type,timestamp\n"
        # Another notation of Alice's email: the same person, the same pseudonym.
        " alice@example.COM,i6,view,1997-09-21T10:00:00Z\n"
        "bob-7,i2,view,1997-09-21T10:00:00Z\n"
        "bob-7,,search,1997-09-21T10:01:00Z\n"
    )

    result = CliRunner().invoke(events_app, ["push", str(csv)])

    assert result.exit_code == 0, result.output
    assert "pushed 3 event(s): 2 user sequence(s) updated" in result.output
    assert before == ["i1", "i2", "i3", "i4", "i5"]
    assert client.user_sequence(alice) == [*before, "i6"]
    assert client.user_sequence(bob) == ["i2"]


def test_push_keeps_max_seq_len_newest_items(
    client: OnlineFeatureClient, tmp_path: Path
) -> None:
    path = tmp_path / "new.parquet"
    pd.DataFrame(
        {
            "user_id": [RAW_ALICE],
            "item_id": ["i6"],
            "event_type": ["view"],
            "timestamp": pd.to_datetime(["1997-09-21T10:00:00Z"]),
        }
    ).to_parquet(path)

    result = CliRunner().invoke(events_app, ["push", str(path), "--max-seq-len", "2"])

    alice = load_pseudonymizer(load_settings()).pseudonymize(RAW_ALICE)
    assert result.exit_code == 0, result.output
    assert client.user_sequence(alice) == ["i5", "i6"]


def test_bad_row_is_named_without_the_raw_id_and_nothing_is_pushed(
    client: OnlineFeatureClient, tmp_path: Path
) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text(
        "user_id,item_id,event_type,timestamp\n"
        "carol-secret-id,i6,view,1997-09-21T10:00:00Z\n"
        "carol-secret-id,i1,view,next tuesday\n"
    )

    result = CliRunner().invoke(events_app, ["push", str(csv)])

    carol = load_pseudonymizer(load_settings()).pseudonymize("carol-secret-id")
    assert result.exit_code == 2
    assert "bad.csv row 2: timestamp is missing or unreadable" in result.output
    assert "'next tuesday'" in result.output
    assert "carol-secret-id" not in result.output
    assert client.user_sequence(carol) == []


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(events_app, ["push", str(tmp_path / "nope.csv")])

    assert result.exit_code == 2
    assert "nope.csv" in result.output


def test_push_before_any_features_run_fails_with_a_hint(tmp_path: Path) -> None:
    csv = tmp_path / "new.csv"
    csv.write_text("user_id,item_id,event_type,timestamp\nbob,i2,view,1997-09-21\n")

    result = CliRunner().invoke(events_app, ["push", str(csv)])

    assert result.exit_code == 1
    assert "run the features stage first" in result.output
