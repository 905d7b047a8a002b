"""Dataset readers: user files, both MovieLens sources, and the real recbole wheel."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.ingest import ingest_sources
from shopml.datasets import (
    ML100K_GENRES,
    RECBOLE_REQUIREMENT,
    fetch_movielens_100k,
    load_amazon_scientific,
    read_grouplens_ml100k,
    read_recbole_ml100k,
    read_table_file,
)

MAY_1 = datetime(2024, 5, 1, tzinfo=UTC)
UNREACHABLE = "http://127.0.0.1:9/ml-100k.zip"


def test_csv_ids_stay_strings_and_bad_values_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "user_id,item_id,event_type,timestamp,value\n"
        "007,0042,view,2024-05-01,\n"
        "8,43,rate,not-a-time,4.5\n",
        encoding="utf-8",
    )
    table = read_table_file(path, "events")

    assert table.column("user_id").to_pylist() == ["007", "8"]
    assert table.column("item_id").to_pylist() == ["0042", "43"]
    assert table.column("timestamp").to_pylist() == [MAY_1, None]
    assert table.column("_unparsed_timestamp").to_pylist() == [None, "not-a-time"]
    assert table.column("value").to_pylist() == [None, 4.5]
    assert table.column("_source_file").to_pylist() == ["events.csv"] * 2
    assert table.column("_source_row").to_pylist() == [1, 2]


def test_broken_csv_records_are_kept_with_their_row_number(tmp_path: Path) -> None:
    path = tmp_path / "catalog.csv"
    path.write_text(
        "item_id,title\n1,Shoe\n2,Hat,surplus,fields\n3,Sock\n", encoding="utf-8"
    )
    table = read_table_file(path, "catalog")
    columns = [
        table.column(n).to_pylist() for n in ("_source_row", "item_id", "_unparsed_row")
    ]
    rows = sorted(zip(*columns, strict=True))

    assert rows == [(1, "1", None), (2, None, "2,Hat,surplus,fields"), (3, "3", None)]


def test_jsonl_mixed_types_and_broken_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(
        '{"user_id": 7, "item_id": "a", "event_type": "view", "timestamp": 1714521600}'
        "\n\n"
        '{"user_id": "x", "item_id": "b", "event_type": "view", '
        '"timestamp": "2024-05-01"}\n'
        "{not json\n",
        encoding="utf-8",
    )
    table = read_table_file(path, "events")

    assert table.column("user_id").to_pylist() == ["7", "x", None]
    assert table.column("timestamp").to_pylist() == [MAY_1, MAY_1, None]
    assert table.column("_unparsed_row").to_pylist() == [None, None, "{not json"]
    assert table.column("_source_row").to_pylist() == [1, 3, 4]


def test_parquet_with_numeric_ids_and_naive_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([1, 2], pa.int64()),
                "item_id": ["a", "b"],
                "event_type": ["cart", "purchase"],
                "timestamp": pa.array(
                    [datetime(2024, 5, 1), datetime(2024, 5, 1)], pa.timestamp("ms")
                ),
                "value": [None, 9.99],
            }
        ),
        path,
    )
    table = read_table_file(path, "events")

    assert table.column("user_id").to_pylist() == ["1", "2"]
    assert table.column("timestamp").to_pylist() == [MAY_1, MAY_1]
    assert table.schema.field("timestamp").type == pa.timestamp("us", tz="UTC")


def test_unknown_extension_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "events.xlsx"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"extension '\.xlsx'"):
        read_table_file(path, "events")


def write_grouplens(folder: Path) -> None:
    """Three ratings, three items and two users in GroupLens' own formats (latin-1)."""
    folder.mkdir()
    (folder / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    flags = {
        "242": "Comedy",
        "302": "Crime Film-Noir Mystery Thriller",
        "267": "unknown",
    }
    lines = []
    for item, title, date in [
        ("242", "Kolya (1996)", "24-Jan-1997"),
        ("302", "L.A. Confidential (1997)", "01-Jan-1997"),
        ("267", "unknown", ""),
    ]:
        bits = ["1" if g in flags[item].split() else "0" for g in ML100K_GENRES]
        lines.append("|".join([item, title, date, "", "http://x", *bits]))
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    (folder / "u.user").write_text("196|49|M|writer|55105\n186|39|F|executive|00000\n")


def write_recbole(folder: Path) -> None:
    """The same data as :func:`write_grouplens` in recbole's atomic-file format."""
    folder.mkdir()
    (folder / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "196\t242\t3\t881250949\n186\t302\t3\t891717742\n"
    )
    (folder / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "242\tKolya\t1996\tComedy\n"
        "302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller\n"
        "267\tunkonwn\tunkonwn\tunknown\n"
    )
    (folder / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "196\t49\tM\twriter\t55105\n186\t39\tF\texecutive\t00000\n"
    )


def test_grouplens_and_recbole_map_to_the_same_tables(tmp_path: Path) -> None:
    write_grouplens(tmp_path / "grouplens")
    write_recbole(tmp_path / "recbole")
    grouplens = read_grouplens_ml100k(tmp_path / "grouplens")
    recbole = read_recbole_ml100k(tmp_path / "recbole")

    for kind in ("events", "catalog", "users"):
        assert getattr(grouplens, kind).equals(getattr(recbole, kind)), kind
    assert recbole.catalog.to_pylist()[1] == {
        "item_id": "302",
        "title": "L.A. Confidential (1997)",
        "category": "Crime",
        "price": None,
        "genres": "Crime|Film-Noir|Mystery|Thriller",
    }
    assert recbole.users.column("zip_code").to_pylist() == ["55105", "00000"]
    assert recbole.events.column("event_type").to_pylist() == ["rate", "rate"]


@pytest.mark.integration
def test_movielens_from_the_real_wheel_then_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = fetch_movielens_100k(tmp_path / "ml", grouplens_url=UNREACHABLE)

    assert files.source == RECBOLE_REQUIREMENT
    events, catalog = pq.read_table(files.events), pq.read_table(files.catalog)
    users = pq.read_table(files.users)
    assert (events.num_rows, catalog.num_rows, users.num_rows) == (100_000, 1_682, 943)
    assert len(events.column("user_id").unique()) == 943
    assert catalog.to_pylist()[0]["title"] == "Toy Story (1995)"
    assert catalog.to_pylist()[0]["genres"] == "Animation|Children's|Comedy"

    # A second call must not download: point pip at nothing and it still works.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    (tmp_path / "ml" / "events.parquet").unlink()
    started = time.monotonic()
    again = fetch_movielens_100k(tmp_path / "ml", grouplens_url=UNREACHABLE)
    assert pq.read_table(again.events).equals(events)
    assert time.monotonic() - started < 10


@pytest.mark.integration
def test_ingest_movielens_records_origin_and_lineage(tmp_path: Path) -> None:
    result = ingest_sources(
        "movielens-100k", tmp_path / "raw", cache_dir=tmp_path / "cache"
    )

    assert result.rows == {"events": 100_000, "catalog": 1_682, "users": 943}
    assert result.inputs == ["movielens-100k@recbole==1.2.1"]
    raw = pq.read_table(result.files["events"])
    assert raw.column("_source_file")[0].as_py() == "recbole==1.2.1:ml-100k.inter"
    assert raw.column("_source_row").to_pylist()[:2] == [1, 2]
    assert raw.column("user_id")[0].as_py() == "196"


def test_amazon_scientific_sequences_are_rebuilt(shared_data: Path) -> None:
    events, catalog = load_amazon_scientific(
        shared_data / "amazon-scientific-2018-5core"
    )

    assert len(events) == 59_427
    assert events["user_id"].nunique() == 8_442
    assert len(catalog) == events["item_id"].nunique() == 4_385
    first_user = events[events["user_id"] == events["user_id"].iloc[0]]
    assert first_user["timestamp"].is_monotonic_increasing
    assert set(events["event_type"]) == {"purchase"}
