"""Point-in-time training data from Feast: examples, entity-frame rules, train source.

Uses the hand-written events of ``test_features`` (SQLite online store, local Parquet
offline store): USER_A saw i1 (T1), i2 (T2), i3 and i4 (both at T3) and i5 (AS_OF);
USER_B saw i2 (T2), searched and saw i5 (T3).
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from components.features import build_features
from shopml.config import Settings
from shopml.features import (
    feast_training_split,
    feature_store_from_settings,
    prepare_entity_frame,
    read_online_features,
    split_for_training,
    training_cutoffs,
    training_examples,
)
from shopml.sequences import split_events
from tests.unit.test_features import (
    AS_OF,
    T1,
    T2,
    T3,
    USER_A,
    USER_B,
    tiny_catalog,
    tiny_events,
    write_tiny_curated,
)

MICROSECOND = timedelta(microseconds=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One features run on the tiny events, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("training")
    settings = Settings(home=root / "home", progress=False)
    build_features(write_tiny_curated(root / "curated"), settings)
    return feature_store_from_settings(settings)


def item_times() -> dict[tuple[str, str], pd.Timestamp]:
    """When each user saw each item (every pair occurs once in the tiny events)."""
    events = tiny_events()
    events = events[events["item_id"] != ""]
    return {(row.user_id, row.item_id): row.timestamp for row in events.itertuples()}


def test_no_example_sees_an_event_after_its_own_time(store: Any) -> None:
    # Every event time, a microsecond either side, and times between events.
    moments = sorted(
        {
            moment + shift
            for moment in (T1, T2, T3, AS_OF, T2 + timedelta(days=3))
            for shift in (-MICROSECOND, timedelta(0), MICROSECOND)
        }
    )
    entity_df = pd.DataFrame(
        [(user, moment) for user in (USER_A, USER_B) for moment in moments],
        columns=["user_id", "event_timestamp"],
    )

    examples = training_examples(store, entity_df)
    seen_at = item_times()

    assert len(examples) == len(entity_df)
    for example in examples.itertuples():
        for item in example.item_seq:
            assert seen_at[(example.user_id, item)] <= example.event_timestamp
    # Not vacuous: just after AS_OF, USER_A's whole history is there; just before T1,
    # nothing. A naive join (latest row per user) would give every row i1..i5.
    by_key = {(e.user_id, e.event_timestamp): e.item_seq for e in examples.itertuples()}
    assert by_key[(USER_A, AS_OF + MICROSECOND)] == ["i1", "i2", "i3", "i4", "i5"]
    assert by_key[(USER_A, T3 - MICROSECOND)] == ["i1", "i2"]
    assert by_key[(USER_A, T1 - MICROSECOND)] == []


def test_examples_keep_the_entity_frame_order_and_labels(store: Any) -> None:
    entity_df = pd.DataFrame(
        {
            "user_id": [USER_B, "u_unknown", USER_A],
            "event_timestamp": pd.to_datetime([T3, T2, T2], utc=True),
            "label": ["i5", "i9", "i3"],
        }
    )

    examples = training_examples(store, entity_df)

    assert examples["label"].tolist() == ["i5", "i9", "i3"]
    assert examples["item_seq"].tolist() == [["i2", "i5"], [], ["i1", "i2"]]
    assert examples["item_seq_len"].tolist() == [2, 0, 2]


def test_wrong_join_key_names_the_key_and_the_expected_keys(store: Any) -> None:
    entity_df = pd.DataFrame({"customer_id": [USER_A], "event_timestamp": [T2]})

    with pytest.raises(ValueError, match=r"\['customer_id'\]") as raised:
        training_examples(store, entity_df)

    assert "lacks join key(s) ['user_id']" in str(raised.value)
    assert "expected join keys ['user_id']" in str(raised.value)


def test_online_entity_row_with_wrong_join_key_is_named(store: Any) -> None:
    with pytest.raises(ValueError, match=r"has key\(s\) \['sku'\]") as raised:
        read_online_features(store, "search_serving", [{"sku": "i2"}])

    assert "expected join keys ['item_id']" in str(raised.value)
    rows = read_online_features(store, "search_serving", [{"item_id": "i2"}])
    assert rows["title"] == ["Two"]


def test_naive_timestamps_are_taken_as_utc_never_local_time(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A local zone two hours east of UTC: reading naive times as local would move
    # T2 (when USER_A saw i2) two hours earlier, before i2.
    monkeypatch.setenv("TZ", "Europe/Helsinki")
    time.tzset()
    try:
        naive = pd.DataFrame(
            {"user_id": [USER_A, USER_A], "event_timestamp": [T2, T3]}
        ).assign(event_timestamp=lambda f: f["event_timestamp"].dt.tz_localize(None))
        text = pd.DataFrame(
            {
                "user_id": [USER_A, USER_A],
                "event_timestamp": ["1997-09-01 12:00:00", "1997-09-15T14:00:00+02:00"],
            }
        )
        naive_examples = training_examples(store, naive)
        text_examples = training_examples(store, text)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()

    expected = [["i1", "i2"], ["i1", "i2", "i3", "i4"]]
    assert naive_examples["item_seq"].tolist() == expected
    assert text_examples["item_seq"].tolist() == expected  # +02:00 converted to UTC
    assert str(naive_examples["event_timestamp"].dt.tz) == "UTC"


def test_aware_timestamps_in_other_zones_are_converted_to_utc() -> None:
    frame = pd.DataFrame(
        {
            "user_id": [USER_A],
            "event_timestamp": pd.to_datetime(["1997-09-01 14:00"]).tz_localize(
                "Europe/Berlin"
            ),
        }
    )

    prepared = prepare_entity_frame(frame, ["user_id"])

    assert prepared["event_timestamp"].tolist() == [pd.Timestamp(T2)]
    assert frame["event_timestamp"].dt.tz is not None  # the caller's frame untouched


@pytest.mark.parametrize(
    ("stamps", "message"),
    [
        ([T2, None], "null at row 1"),
        (["yesterday-ish"], "unreadable"),
    ],
    ids=["null", "unreadable"],
)
def test_bad_entity_timestamps_are_rejected(stamps: list[Any], message: str) -> None:
    frame = pd.DataFrame({"user_id": [USER_A] * len(stamps), "event_timestamp": stamps})

    with pytest.raises(ValueError, match=message):
        prepare_entity_frame(frame, ["user_id"])


def test_missing_event_timestamp_is_named() -> None:
    with pytest.raises(ValueError, match="lacks 'event_timestamp'"):
        prepare_entity_frame(pd.DataFrame({"user_id": [USER_A]}), ["user_id"])


def test_cutoffs_end_before_the_validation_event_or_at_the_last_event() -> None:
    cutoffs = training_cutoffs(tiny_events())

    assert cutoffs["user_id"].tolist() == [USER_A, USER_B]
    # USER_A: i1 i2 i3 i4 i5 -> validation target i4 at T3; USER_B: 2 items, train only.
    assert cutoffs["event_timestamp"].tolist() == [
        pd.Timestamp(T3) - MICROSECOND,
        pd.Timestamp(T3),
    ]


def test_feast_split_keeps_targets_and_takes_point_in_time_histories(
    store: Any,
) -> None:
    events, catalog = tiny_events(), tiny_catalog()
    split = split_events(events, catalog)

    from_feast = feast_training_split(store, split, events)
    ids = from_feast.vocab.item_ids

    assert from_feast.user_ids == split.user_ids
    np.testing.assert_array_equal(from_feast.valid_items, split.valid_items)
    np.testing.assert_array_equal(from_feast.test_items, split.test_items)
    # i3 shares T3 with the validation target i4: the events split puts it in the
    # history (ties broken by item id), the point-in-time join does not see it.
    assert [ids[i] for i in split.train_seqs[0]] == ["i1", "i2", "i3"]
    assert [ids[i] for i in from_feast.train_seqs[0]] == ["i1", "i2"]
    assert [ids[i] for i in from_feast.train_seqs[1]] == ["i2", "i5"]


def test_feast_split_rejects_items_the_vocabulary_lacks(store: Any) -> None:
    events = tiny_events()
    split = split_events(events[events["item_id"] != "i1"], tiny_catalog().iloc[1:])

    with pytest.raises(ValueError, match="'i1' is not in the training vocabulary"):
        feast_training_split(store, split, events)


def test_split_for_training_rejects_unknown_sources() -> None:
    with pytest.raises(ValueError, match=r"source='kafka'.*\['events', 'feast'\]"):
        split_for_training(tiny_events(), tiny_catalog(), source="kafka")


def test_train_stage_trains_on_feast_histories(tmp_path: Path) -> None:
    from components.train import TrainParams, train_model
    from shopml.config import load_settings

    curated = write_tiny_curated(tmp_path / "curated")
    build_features(curated, load_settings())  # SHOPML_HOME from the autouse fixture
    params = TrainParams(
        epochs=1,
        max_seq_len=5,
        hidden_size=32,
        n_layers=1,
        n_heads=2,
        device="cpu",
        show_progress=False,
        source="feast",
    )

    summary = train_model(curated, tmp_path / "model", params)

    # USER_A [i1, i2] + USER_B [i2, i5]; the events source would train on 5.
    assert summary.n_train_interactions == 4
    assert (tmp_path / "model" / "model.pt").is_file()
