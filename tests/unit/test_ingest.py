"""Ingest of user files: CSV dialects and encodings, streaming chunks, mixed types."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.ingest import file_digest, ingest_sources, register_raw_tables
from shopml.assets import AssetStore
from shopml.datasets import iter_table_file, read_table_file, sniff_csv
from shopml.storage import LocalStore

ROWS = [
    ("u1", "i1", "view", "2024-01-01T00:00:00Z"),
    ("u2", "i2", "cart", "1704067200"),
]


def write_csv(path: Path, delimiter: str, encoding: str = "utf-8") -> Path:
    lines = [delimiter.join(("user_id", "item_id", "event_type", "timestamp"))]
    lines += [delimiter.join(row) for row in ROWS]
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


@pytest.mark.parametrize(
    "delimiter", [",", ";", "\t", "|"], ids=["comma", "semicolon", "tab", "pipe"]
)
def test_csv_delimiter_is_sniffed(tmp_path: Path, delimiter: str) -> None:
    path = write_csv(tmp_path / "events.csv", delimiter)
    assert sniff_csv(path)[0] == delimiter
    table = read_table_file(path, "events")
    assert table.column("user_id").to_pylist() == ["u1", "u2"]
    assert table.column("event_type").to_pylist() == ["view", "cart"]


def test_utf8_bom_is_skipped(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "events.csv", ",", encoding="utf-8-sig")
    assert sniff_csv(path) == (",", "utf-8-sig")
    table = read_table_file(path, "events")
    assert table.column("user_id").to_pylist() == ["u1", "u2"]


def test_non_utf8_file_is_read_in_the_fallback_encoding(tmp_path: Path) -> None:
    path = tmp_path / "catalog.csv"
    path.write_bytes("item_id,title\ni1,Café crème\ni2,Déjà vu\n".encode("cp1252"))
    assert sniff_csv(path)[1] == "cp1252"
    table = read_table_file(path, "catalog")
    assert table.column("title").to_pylist() == ["Café crème", "Déjà vu"]


def test_declared_fallback_encoding_is_used(tmp_path: Path) -> None:
    path = tmp_path / "catalog.csv"
    path.write_bytes("item_id,title\ni1,Łódź\n".encode("iso-8859-2"))
    chunks = list(iter_table_file(path, "catalog", fallback_encoding="iso-8859-2"))
    assert chunks[0].column("title").to_pylist() == ["Łódź"]


def test_quoted_fields_keep_delimiters_quotes_and_newlines(tmp_path: Path) -> None:
    path = tmp_path / "catalog.csv"
    path.write_text(
        'item_id,title\ni1,"Shoe, size 42"\ni2,"The ""Best"" Hat"\ni3,"two\nlines"\n',
        encoding="utf-8",
    )
    table = read_table_file(path, "catalog")
    assert table.column("title").to_pylist() == [
        "Shoe, size 42",
        'The "Best" Hat',
        "two\nlines",
    ]


def test_csv_streams_in_chunks_with_continuous_row_numbers(tmp_path: Path) -> None:
    lines = ["user_id,item_id,event_type,timestamp"]
    lines += [f"u{n},i{n % 7},view,{1704067200 + n}" for n in range(5000)]
    path = tmp_path / "events.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    chunks = list(iter_table_file(path, "events", chunk_rows=500))
    assert len(chunks) > 1
    assert len({c.schema for c in chunks}) == 1
    rows = pa.concat_tables(chunks).column("_source_row").to_pylist()
    assert rows == list(range(1, 5001))


def test_parquet_streams_by_batches(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    table = pa.table(
        {
            "user_id": [f"u{n}" for n in range(1000)],
            "item_id": ["i1"] * 1000,
            "event_type": ["view"] * 1000,
            "timestamp": list(range(1704067200, 1704068200)),
        }
    )
    pq.write_table(table, path, row_group_size=100)
    chunks = list(iter_table_file(path, "events", chunk_rows=250))
    assert [c.num_rows for c in chunks] == [250] * 4
    assert chunks[-1].column("_source_row").to_pylist()[-1] == 1000


def test_mixed_type_jsonl_column_is_read_not_crashed(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    records = [
        {
            "user_id": 1,
            "item_id": "i1",
            "event_type": "rate",
            "timestamp": 1,
            "value": 4,
        },
        {
            "user_id": "u2",
            "item_id": 2,
            "event_type": "rate",
            "timestamp": 2,
            "value": "x",
        },
        {
            "user_id": "u3",
            "item_id": "i3",
            "event_type": "view",
            "timestamp": 3,
            "extra": [1],
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    table = pa.concat_tables(iter_table_file(path, "events", chunk_rows=2))

    assert table.column("user_id").to_pylist() == ["1", "u2", "u3"]
    assert table.column("value").to_pylist() == [4.0, None, None]
    assert table.column("_unparsed_value").to_pylist() == [None, "x", None]
    assert table.column("extra").to_pylist() == [None, None, "[1]"]


def test_ingest_streams_files_and_registers_raw_assets(tmp_path: Path) -> None:
    events = write_csv(tmp_path / "events.csv", ";")
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("item_id,title\ni1,Shoe\ni2,Hat\n", encoding="utf-8")
    result = ingest_sources(
        "files", tmp_path / "raw", events_path=str(events), catalog_path=str(catalog)
    )
    assert result.rows == {"events": 2, "catalog": 2}
    assert result.inputs[0] == f"events.csv@{file_digest(events)[:16]}"

    assets = AssetStore(LocalStore(tmp_path / "store"))
    refs = register_raw_tables(tmp_path / "raw", assets, result.inputs, producer="test")
    assert [r.split("@")[0] for r in refs] == ["raw_events", "raw_catalog"]
    raw_events = assets.get("raw_events")
    assert raw_events.zone == "raw"
    assert raw_events.inputs == result.inputs
    assert {c["name"]: c["class"] for c in raw_events.schema}["user_id"] == "pii"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("user_id,item_id,event_type,timestamp\n", "holds no rows"),
        ("", "cannot be read"),
    ],
    ids=["header-only", "empty"],
)
def test_an_events_file_without_rows_is_named_in_the_error(
    tmp_path: Path, content: str, message: str
) -> None:
    events = tmp_path / "events.csv"
    events.write_text(content)
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("item_id,title\ni1,One\n")

    with pytest.raises(ValueError, match=f"events file '{events}' {message}"):
        ingest_sources(
            "files",
            tmp_path / "raw",
            events_path=str(events),
            catalog_path=str(catalog),
        )
