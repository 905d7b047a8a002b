"""Canonical schemas and the coercion rules: ids, epoch s/ms, ISO-8601, time zones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest

from shopml.schemas import (
    COLUMN_CLASSES,
    EVENTS_SCHEMA,
    SCHEMAS,
    classify_columns,
    coerce_table,
    parse_floats,
    parse_timestamps,
    to_id_strings,
)

MAY_1_10H = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
MAY_1_10H_EPOCH_S = int(MAY_1_10H.timestamp())


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (MAY_1_10H_EPOCH_S, MAY_1_10H),
        (MAY_1_10H_EPOCH_S * 1000, MAY_1_10H),
        (881250949, datetime(1997, 12, 4, 15, 55, 49, tzinfo=UTC)),
        (881250949.5, datetime(1997, 12, 4, 15, 55, 49, 500000, tzinfo=UTC)),
        # 1e11 is still seconds (year 5138 is out of range: unreadable); above is ms.
        (100_000_000_001, datetime(1973, 3, 3, 9, 46, 40, 1000, tzinfo=UTC)),
    ],
    ids=["epoch-s", "epoch-ms", "movielens-s", "fractional-s", "just-above-1e11-is-ms"],
)
def test_epoch_numbers_are_seconds_or_milliseconds(
    raw: float, expected: datetime
) -> None:
    instants, unparsed = parse_timestamps(pa.array([raw]))

    assert instants.type == pa.timestamp("us", tz="UTC")
    assert instants.to_pylist() == [expected]
    assert unparsed.to_pylist() == [None]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (str(MAY_1_10H_EPOCH_S), MAY_1_10H),
        (str(MAY_1_10H_EPOCH_S * 1000), MAY_1_10H),
        ("2024-05-01T10:00:00Z", MAY_1_10H),
        ("2024-05-01T12:00:00+02:00", MAY_1_10H),
        ("2024-05-01T05:30:00-04:30", MAY_1_10H),
        ("2024-05-01 10:00:00", MAY_1_10H),
        ("2024-05-01T10:00", MAY_1_10H),
        ("2024-05-01", MAY_1_10H - timedelta(hours=10)),
        (" 2024-05-01T10:00:00.250000Z ", MAY_1_10H + timedelta(milliseconds=250)),
    ],
    ids=[
        "numeric-s",
        "numeric-ms",
        "iso-z",
        "iso-offset-plus",
        "iso-offset-minus",
        "naive-space",
        "naive-minutes",
        "date-only",
        "fraction-padded",
    ],
)
def test_text_timestamps_follow_the_rules(text: str, expected: datetime) -> None:
    instants, unparsed = parse_timestamps(pa.array([text]))

    assert instants.to_pylist() == [expected]
    assert unparsed.to_pylist() == [None]


def test_naive_and_zoned_texts_in_one_column_are_each_read_correctly() -> None:
    # pandas' mixed-offset parsing would shift the naive one; ours must not.
    texts = ["2024-05-01T12:00:00+02:00", "2024-05-01 10:00", "2024-05-01T10:00:00Z"]
    instants, _ = parse_timestamps(pa.array(texts))

    assert instants.to_pylist() == [MAY_1_10H] * 3


@pytest.mark.parametrize(
    "text", ["yesterday", "01/05/2024", "2024-13-01", "3000-01-01", "inf"]
)
def test_unreadable_timestamp_text_is_kept_not_dropped(text: str) -> None:
    instants, unparsed = parse_timestamps(
        pa.array(["2024-05-01T10:00:00Z", text, None, "  "])
    )

    assert instants.to_pylist() == [MAY_1_10H, None, None, None]
    assert unparsed.to_pylist() == [None, text, None, None]


def test_timestamp_columns_naive_are_utc_and_zoned_are_converted() -> None:
    naive = pa.array([datetime(2024, 5, 1, 10)], pa.timestamp("ns"))
    plus_two = timezone(timedelta(hours=2))
    zoned = pa.array(
        [datetime(2024, 5, 1, 12, tzinfo=plus_two)], pa.timestamp("ms", tz="+02:00")
    )

    assert parse_timestamps(naive)[0].to_pylist() == [MAY_1_10H]
    assert parse_timestamps(zoned)[0].to_pylist() == [MAY_1_10H]
    assert parse_timestamps(zoned)[0].type == pa.timestamp("us", tz="UTC")


def test_numbers_read_from_text_keep_the_unreadable_ones() -> None:
    numbers, unparsed = parse_floats(pa.array(["4", " 3.5 ", "five", "", None, "nan"]))

    assert numbers.to_pylist() == [4.0, 3.5, None, None, None, None]
    assert unparsed.to_pylist() == [None, None, "five", None, None, "nan"]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (pa.array([7, 42]), ["7", "42"]),
        (pa.array([7.0, None, 42.0]), ["7", None, "42"]),
        (pa.array([1.5]), ["1.5"]),
        (pa.array(["007", " a b "]), ["007", " a b "]),
    ],
    ids=["ints", "whole-floats-with-null", "fraction", "strings-untouched"],
)
def test_ids_become_strings_without_number_parsing(
    values: pa.Array, expected: list[str | None]
) -> None:
    assert to_id_strings(values).to_pylist() == expected


def test_coerce_orders_columns_and_adds_unparsed_companions() -> None:
    table = pa.table(
        {
            "extra": [1, 2],
            "timestamp": ["2024-05-01T10:00:00Z", "soon"],
            "event_type": ["view", "click"],
            "item_id": [10, 20],
            "user_id": ["007", "8"],
        }
    )
    coerced = coerce_table(table, "events")

    assert coerced.column_names == [
        *EVENTS_SCHEMA.names,
        "extra",
        "_unparsed_timestamp",
        "_unparsed_value",
    ]
    assert coerced.column("user_id").to_pylist() == ["007", "8"]
    assert coerced.column("item_id").to_pylist() == ["10", "20"]
    assert coerced.column("extra").to_pylist() == ["1", "2"]
    assert coerced.column("timestamp").to_pylist() == [MAY_1_10H, None]
    assert coerced.column("_unparsed_timestamp").to_pylist() == [None, "soon"]
    assert coerced.column("value").null_count == 2


def test_coerce_names_missing_required_columns() -> None:
    table = pa.table({"item_id": ["1"], "category": ["x"]})
    with pytest.raises(
        ValueError, match=r"catalog table lacks required column\(s\) \['title'\]"
    ):
        coerce_table(table, "catalog")


def test_unknown_table_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="'orders' is unknown"):
        coerce_table(pa.table({"a": [1]}), "orders")


def test_every_canonical_column_has_a_class() -> None:
    for kind, schema in SCHEMAS.items():
        assert set(schema.names) == set(COLUMN_CLASSES[kind])


def test_classes_mark_raw_ids_pii_and_pseudonyms_internal() -> None:
    raw = classify_columns("users", ["user_id", "age", "shoe_size", "_source_row"])
    curated = classify_columns("events", ["user_id", "query", "campaign"], curated=True)

    assert raw == {
        "user_id": "pii",
        "age": "pii",
        "shoe_size": "pii",
        "_source_row": "internal",
    }
    assert curated == {
        "user_id": "internal",
        "query": "internal",  # masked by cleaning
        "campaign": "internal",
    }


@pytest.mark.parametrize("zone", [None, "UTC"], ids=["naive", "utc"])
def test_timestamps_become_the_text_isoformat_writes(zone: str | None) -> None:
    rng = np.random.default_rng(11)
    micros = np.concatenate(
        [
            rng.integers(-30_000_000_000_000_000, 250_000_000_000_000_000, 2_000),
            rng.integers(-(10**10), 10**10, 2_000) * 1_000_000,  # whole seconds
            [0, -1, 1, 999_999, -1_000_000, 1_704_067_200_000_000],
        ]
    )
    values = pa.array(micros, pa.int64()).cast(pa.timestamp("us", tz=zone))
    values = pa.concat_arrays([values, pa.nulls(2, values.type)])
    expected = [None if v is None else v.isoformat() for v in values.to_pylist()]

    assert to_id_strings(values).to_pylist() == expected


def test_timestamps_outside_four_digit_years_are_still_written() -> None:
    values = pa.array([-62_135_596_800_000_000 + 5], pa.timestamp("us", tz="UTC"))
    assert to_id_strings(values).to_pylist() == ["0001-01-01T00:00:00.000005+00:00"]
