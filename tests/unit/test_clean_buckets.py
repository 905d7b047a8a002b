"""Events cleaned in user buckets: the same result as one bucket, counts at scale."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest

from components.clean import CleanConfig, CleanResult, clean_tables
from components.ingest import ingest_sources
from shopml import clean_partition
from shopml.clean_events import (
    bucket_of,
    partition_events,
    rank_codes,
    read_bucket,
    split_events,
)
from shopml.clean_merge import PartHandoff
from shopml.quality import (
    count_padded,
    flag_bot_users,
    flag_duplicates,
    flag_near_duplicates,
    pack_keys,
    sort_rows,
)
from shopml.security import Pseudonymizer
from shopml.synth import CATALOG_FAULTS, EVENT_FAULTS, SynthConfig, write_synthetic

NOW = datetime(2025, 1, 1, tzinfo=UTC)
PSEUDO = Pseudonymizer(b"bucket-key")


def ingest_synthetic(tmp_path: Path, config: SynthConfig) -> Path:
    files = write_synthetic(tmp_path / "synth", config)
    raw = tmp_path / "raw"
    ingest_sources(
        "files",
        raw,
        events_path=str(files.events),
        catalog_path=str(files.catalog),
        users_path=str(files.users),
    )
    return raw


def clean_into(raw: Path, out: Path, **options: object) -> CleanResult:
    config = CleanConfig(now=NOW, **options)  # type: ignore[arg-type]
    return clean_tables(raw, out / "curated", out / "quarantine", PSEUDO, config)


def sorted_quarantine(path: Path) -> pa.Table:
    return pq.read_table(path).sort_by([("source_row", "ascending")])


@pytest.fixture(scope="module")
def faulty_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Events with duplicates, near duplicates and a bot whose rows span batches."""
    config = SynthConfig(
        n_events=20_000,
        n_users=200,
        chunk_events=7_000,
        faults={"duplicate": 0.03, "near_duplicate": 0.03, "bot_user": 0.01}
        | {"whitespace": 0.01, "event_type_case": 0.01, "unknown_item": 0.01},
    )
    return ingest_synthetic(tmp_path_factory.mktemp("faulty"), config)


def test_bucketed_clean_equals_one_bucket(faulty_raw: Path, tmp_path: Path) -> None:
    one = clean_into(faulty_raw, tmp_path / "one", scheduler="sync")
    many = clean_into(faulty_raw, tmp_path / "many", rows_per_bucket=4_000)

    assert one.tables["events"] == many.tables["events"]
    reasons = one.tables["events"].reasons
    assert {"duplicate", "near_duplicate", "bot_user"} <= set(reasons)
    for kind in ("events", "catalog", "users"):
        first = (tmp_path / "one" / "curated" / f"{kind}.parquet").read_bytes()
        second = (tmp_path / "many" / "curated" / f"{kind}.parquet").read_bytes()
        assert first == second, f"curated {kind} differs"
    assert sorted_quarantine(tmp_path / "one" / "quarantine" / "events.parquet").equals(
        sorted_quarantine(tmp_path / "many" / "quarantine" / "events.parquet")
    )


def test_partition_keeps_a_user_in_one_bucket_and_buckets_in_order(
    faulty_raw: Path, tmp_path: Path
) -> None:
    paths = partition_events(
        faulty_raw / "events.parquet", tmp_path, 5, PSEUDO, batch_rows=3_000
    )

    seen: dict[str, int] = {}
    rows = 0
    for bucket, path in enumerate(paths):
        table = read_bucket(path)
        rows += table.num_rows
        positions = table.column("_position").to_numpy()
        assert np.all(np.diff(positions) > 0)  # raw order within a bucket
        for pseudonym in set(table.column("_pseudonym").drop_null().to_pylist()):
            assert seen.setdefault(pseudonym, bucket) == bucket
            assert bucket_of(pseudonym, 5) == bucket
    assert rows == pq.read_metadata(faulty_raw / "events.parquet").num_rows
    # Ranges of the pseudonym: later buckets hold larger pseudonyms.
    by_bucket = sorted(seen.items(), key=lambda item: (item[1], item[0]))
    assert [p for p, _ in by_bucket] == sorted(seen)


def test_partition_threads_share_row_groups_and_keep_raw_order(
    faulty_raw: Path, tmp_path: Path
) -> None:
    grouped = tmp_path / "grouped.parquet"
    pq.write_table(
        pq.read_table(faulty_raw / "events.parquet"), grouped, row_group_size=3_000
    )
    assert pq.ParquetFile(grouped).num_row_groups == 8  # 20k events plus copies

    one = partition_events(grouped, tmp_path / "one", 4, PSEUDO, 1_000, threads=1)
    three = partition_events(grouped, tmp_path / "three", 4, PSEUDO, 1_000, threads=3)

    assert sorted(p.name for p in three[0].iterdir()) == [
        "0.arrow",
        "1.arrow",
        "2.arrow",
    ]
    for first, second in zip(one, three, strict=True):
        assert read_bucket(second).equals(read_bucket(first))


def test_partition_with_a_small_pseudonym_cache_gives_the_same_buckets(
    faulty_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generations of the cache roll over many times; pseudonyms stay right."""
    source = faulty_raw / "events.parquet"
    roomy = partition_events(source, tmp_path / "roomy", 3, PSEUDO, batch_rows=500)
    monkeypatch.setattr(clean_partition, "_CACHE_LIMIT", 50)
    small = partition_events(source, tmp_path / "small", 3, PSEUDO, batch_rows=500)

    for first, second in zip(roomy, small, strict=True):
        assert read_bucket(second).equals(read_bucket(first))
    table = read_bucket(small[0])
    raw_ids, pseudonyms = table["user_id"].to_pylist(), table["_pseudonym"].to_pylist()
    pairs = set(zip(raw_ids, pseudonyms, strict=True))
    some = [(raw, p) for raw, p in pairs if raw is not None and raw.strip()][:20]
    assert some and all(PSEUDO.pseudonymize(raw) == p for raw, p in some)


def test_every_fault_kind_at_scale_reconciles(tmp_path: Path) -> None:
    faults = dict.fromkeys(EVENT_FAULTS, 0.004) | dict.fromkeys(CATALOG_FAULTS, 0.01)
    config = SynthConfig(
        n_events=300_000, chunk_events=100_000, faults=faults, file_format="csv"
    )
    raw = ingest_synthetic(tmp_path, config)
    result = clean_into(raw, tmp_path / "out", rows_per_bucket=100_000)

    report = result.tables["events"]
    curated = pq.read_metadata(tmp_path / "out" / "curated" / "events.parquet")
    rejected = pq.read_table(tmp_path / "out" / "quarantine" / "events.parquet")
    assert report.rows_in == pq.read_metadata(raw / "events.parquet").num_rows
    assert report.rows_in == report.rows_kept + report.rows_quarantined
    assert (curated.num_rows, rejected.num_rows) == (
        report.rows_kept,
        report.rows_quarantined,
    )
    assert sum(report.reasons.values()) == report.rows_quarantined
    counted = rejected.column("reason").value_counts().to_pylist()
    assert {c["values"]: c["counts"] for c in counted} == report.reasons
    expected = {
        "null_user_id", "null_item_id", "null_timestamp", "bad_timestamp", "bad_value",
        "bad_event_type", "future_timestamp", "early_timestamp", "unknown_item",
        "duplicate", "near_duplicate", "bot_user",
    }  # fmt: skip
    assert expected <= set(report.reasons)
    assert {"event_type", "whitespace"} <= set(report.repairs)
    # Every source row is accounted for exactly once.
    assert len(set(rejected.column("source_row").to_pylist())) == rejected.num_rows


def test_curated_events_are_globally_sorted_across_buckets(
    faulty_raw: Path, tmp_path: Path
) -> None:
    clean_into(faulty_raw, tmp_path, rows_per_bucket=3_000)
    events = pq.read_table(tmp_path / "curated" / "events.parquet")
    keys = ["user_id", "timestamp", "item_id", "event_type", "value", "session_id"]
    assert events.equals(events.sort_by([(k, "ascending") for k in keys]))


def test_free_text_is_masked_once_per_value(tmp_path: Path) -> None:
    (tmp_path / "events.csv").write_text(
        "user_id,item_id,event_type,timestamp,query,note\n"
        "u1,i1,search,2024-01-01,call 415-555-2671,plain words\n"
        "u2,i1,search,2024-01-01,call 415-555-2671,mail a@b.com\n"
        "u3,i1,search,2024-01-01,red shoes,size 42\n",
        encoding="utf-8",
    )
    (tmp_path / "catalog.csv").write_text("item_id,title\ni1,Shoe\n")
    ingest_sources(
        "files",
        tmp_path / "raw",
        events_path=str(tmp_path / "events.csv"),
        catalog_path=str(tmp_path / "catalog.csv"),
    )
    result = clean_into(tmp_path / "raw", tmp_path)

    events = pq.read_table(tmp_path / "curated" / "events.parquet")
    assert sorted(events.column("query").to_pylist()) == [
        "call [PHONE]",
        "call [PHONE]",
        "red shoes",
    ]
    assert sorted(events.column("note").to_pylist()) == [
        "mail [EMAIL]",
        "plain words",
        "size 42",
    ]
    repairs = result.tables["events"].repairs
    assert (repairs["masked_query"], repairs["masked_note"]) == (2, 1)


def test_rank_codes_sort_like_the_values_with_nulls_last() -> None:
    column = pa.array(["b", None, "a", "b", "é", "B"])
    codes = rank_codes(column)
    order = np.argsort(codes, kind="stable")
    assert [column[i].as_py() for i in order] == ["B", "a", "b", "b", "é", None]
    assert codes[0] == codes[3]

    numbers = rank_codes(pa.array([2.5, None, -1.0, 2.5]))
    assert list(numbers) == [1, 2, 0, 1]


def test_packed_keys_sort_like_the_keys() -> None:
    rng = np.random.default_rng(3)
    keys = [rng.integers(0, 5, 2_000), rng.integers(-(2**40), 2**40, 2_000)]
    keys.append(rng.integers(0, 2**30, 2_000))
    assert len(pack_keys(keys)) == 2  # the first two fit one int64, the third not
    order = sort_rows(keys)
    assert np.array_equal(order, np.lexsort(keys[::-1]))


def test_duplicates_keep_the_first_row_still_in_play() -> None:
    keys = [np.array([1, 1, 2, 1, 2]), np.array([7, 7, 7, 7, 8])]
    is_ok = np.array([False, True, True, True, True])
    assert flag_duplicates(keys, is_ok).tolist() == [False, False, False, True, False]


def test_sorted_rows_break_ties_on_later_keys_in_row_order() -> None:
    lead = np.array([3, 1, 3, 1, 3, 2])
    later = np.array([9, 5, 1, 5, 1, 0])
    keys = [lead, later * 2**59, later]
    assert len(pack_keys(keys)) == 3  # no two fit one int64: ties are broken apart
    assert sort_rows(keys).tolist() == [1, 3, 5, 2, 4, 0]


def test_bot_users_from_the_curated_order_equal_a_fresh_count() -> None:
    rng = np.random.default_rng(5)
    users = rng.integers(0, 300, 50_000)
    micros = rng.integers(0, 3_600 * 10**6, 50_000)
    micros[users == 7] //= 100_000  # user 7 packs an hour into 36 ms
    is_ok = rng.random(50_000) < 0.95
    fresh = flag_bot_users(users, micros, is_ok, 60)
    ordered = flag_bot_users(users, micros, is_ok, 60, order=sort_rows([users, micros]))
    assert np.array_equal(fresh, ordered)
    assert set(users[fresh]) == {7} and not fresh[~is_ok].any()


def test_read_bucket_rebuilds_the_columns_the_bucket_files_leave_out(
    faulty_raw: Path, tmp_path: Path
) -> None:
    raw_path = faulty_raw / "events.parquet"
    raw = pq.read_table(raw_path)
    constants = clean_partition.constant_columns(pq.ParquetFile(raw_path))
    # The synthetic file has no query and no unparsed values, and one source file.
    assert constants["query"] is None and constants["_unparsed_row"] is None
    assert constants["_source_file"] == raw.column("_source_file")[0].as_py()
    assert "user_id" not in constants and "item_id" not in constants

    paths = partition_events(raw_path, tmp_path, 3, PSEUDO, batch_rows=4_000)
    stored = pa.ipc.open_file(str(paths[0] / "0.arrow")).schema
    assert "_source_file" not in stored.names and "query" not in stored.names
    assert stored.field("_pseudonym").type == pa.binary(16)

    buckets = pa.concat_tables([read_bucket(path) for path in paths])
    assert buckets.schema.names == [*raw.schema.names, "_position", "_pseudonym"]
    back = buckets.sort_by("_position").select(raw.schema.names)
    assert back.equals(raw)
    ids = back.column("user_id").to_pylist()
    pseudonyms = buckets.sort_by("_position").column("_pseudonym").to_pylist()
    assert pseudonyms[:50] == [PSEUDO.pseudonymize(u) for u in ids[:50]]


def test_constant_columns_need_one_value_in_every_row_group(tmp_path: Path) -> None:
    path = tmp_path / "groups.parquet"
    table = pa.table(
        {
            "same": ["a"] * 6,
            "varies": ["a"] * 3 + ["b"] * 3,
            "nulls": pa.nulls(6, pa.float64()),
            "partly": [None, "a", "a", "a", "a", "a"],
            "number": [1] * 6,
        }
    )
    pq.write_table(table, path, row_group_size=3)
    found = clean_partition.constant_columns(pq.ParquetFile(path), keep=("same",))
    assert found == {"nulls": None}
    assert clean_partition.constant_columns(pq.ParquetFile(path))["same"] == "a"


def test_pseudonym_text_equals_the_pseudonymizer() -> None:
    ids = [f"user-{i}" for i in range(300)]
    digests = PSEUDO.pseudonymize_many(ids)
    column = pa.array(
        [None if i % 11 == 0 else d for i, d in enumerate(digests)], pa.binary(16)
    )
    for part in (column, column.slice(7, 200), column.slice(0, 0)):
        text = clean_partition.pseudonym_text(part)
        text.validate(full=True)
        expected = [
            None if d is None else PSEUDO.pseudonymize(ids[digests.index(d)])
            for d in part.to_pylist()
        ]
        assert text.to_pylist() == expected


def test_near_duplicates_in_the_curated_order_equal_the_sorted_groups() -> None:
    rng = np.random.default_rng(11)
    flagged = 0
    for trial in range(200):
        n = int(rng.integers(2, 400))
        users = rng.integers(0, int(rng.integers(1, 30)), n)
        # Spans from a burst (many close pairs: the sort takes over) to a year.
        micros = rng.integers(0, int(rng.choice([5e6, 1e8, 1e10])), n)
        keys = [users, rng.integers(0, 4, n), rng.integers(0, 3, n)]
        is_ok = rng.random(n) < 0.85
        window = float(rng.choice([0.5, 2.0, 30.0]))
        order = sort_rows([users, micros])
        in_order = flag_near_duplicates(keys, micros, is_ok, window, time_order=order)
        sorted_groups = flag_near_duplicates(keys, micros, is_ok, window)
        assert np.array_equal(in_order, sorted_groups), trial
        assert not in_order[~is_ok].any()
        flagged += int(in_order.sum())
    assert flagged > 100


def _padded_events_csv(path: Path, rows: int) -> Path:
    """Events whose user ids and event types are padded, blank or of mixed case."""
    users = ["u1", " u1", "u2 ", "   ", "u3", "\tu4", "u4"]
    types = ["view", " View", "CLICK", "  ", "view ", "bogus", "purchase"]
    lines = ["user_id,item_id,event_type,timestamp,value"]
    for row in range(rows):
        user = users[row % len(users)]
        kind = types[(row // 3) % len(types)]
        lines.append(f"{user},i{row % 5},{kind},{1704067200 + row * 7},1")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_whitespace_and_event_type_repairs_count_every_cell_once(
    tmp_path: Path,
) -> None:
    events = _padded_events_csv(tmp_path / "events.csv", 3_000)
    catalog = tmp_path / "catalog.csv"
    catalog.write_text(
        "item_id,title,category,price\n"
        + "".join(f"i{i},Item {i},c,1\n" for i in range(5)),
        encoding="utf-8",
    )
    raw = tmp_path / "raw"
    ingest_sources(
        "files", raw, events_path=str(events), catalog_path=str(catalog)
    )  # fmt: skip
    table = pq.read_table(raw / "events.parquet")
    one = clean_into(raw, tmp_path / "one", scheduler="sync", partition_threads=1)
    many = clean_into(raw, tmp_path / "many", rows_per_bucket=500)

    assert one.tables["events"] == many.tables["events"]
    repairs = one.tables["events"].repairs
    # The partition pass counts padded user ids, the buckets the other columns.
    assert repairs["whitespace"] == count_padded(table)
    types = table.column("event_type").to_pylist()
    fixed = sum(t in (" View", "CLICK", "view ") for t in types)
    assert repairs["event_type"] == fixed
    reasons = one.tables["events"].reasons
    assert reasons["null_user_id"] == sum(u.strip() == "" for u in users_of(table))
    for kind in ("events",):
        first = (tmp_path / "one" / "curated" / f"{kind}.parquet").read_bytes()
        second = (tmp_path / "many" / "curated" / f"{kind}.parquet").read_bytes()
        assert first == second


def users_of(table: pa.Table) -> list[str]:
    return [u or "" for u in table.column("user_id").to_pylist()]


def test_split_events_counts_padded_user_ids(tmp_path: Path) -> None:
    events = _padded_events_csv(tmp_path / "events.csv", 700)
    raw = tmp_path / "raw.parquet"
    pq.write_table(
        pa.csv.read_csv(events)
        .select(["user_id"])
        .append_column("event_type", pa.array(["view"] * 700)),
        raw,
        row_group_size=100,
    )
    split = split_events(raw, tmp_path / "b", 3, PSEUDO, batch_rows=64, threads=2)

    ids = pq.read_table(raw).column("user_id").to_pylist()
    assert split.rows == 700
    assert split.padded_user_ids == sum(u != u.strip() and u.strip() != "" for u in ids)
    buckets = pa.concat_tables([read_bucket(path) for path in split.paths])
    pseudonyms = dict(
        zip(
            buckets.column("user_id").to_pylist(),
            buckets.column("_pseudonym").to_pylist(),
            strict=True,
        )
    )
    # " u1" and "u1" share a pseudonym; a blank id has none.
    assert pseudonyms[" u1"] == pseudonyms["u1"] == PSEUDO.pseudonymize("u1")
    assert pseudonyms["   "] is None


def test_part_handoff_holds_a_bounded_number_of_buckets() -> None:
    handoff = PartHandoff(limit=1, wait_s=5.0)
    part = (pa.table({"x": [1]}),)
    handoff.put(1, part)  # room for one bucket ahead of the merge
    waited = threading.Event()

    def put_late() -> None:
        handoff.put(2, part)  # must wait: bucket 1 is held and 2 is not next
        waited.set()

    late = threading.Thread(target=put_late)
    late.start()
    assert not waited.wait(0.3)
    handoff.put(0, part)  # the bucket the merge needs next never waits
    assert handoff.take(0) == part
    assert handoff.take(1) == part
    assert waited.wait(5.0)
    late.join()
    assert handoff.take(2) == part
    with pytest.raises(KeyError, match="bucket 3"):
        handoff.take(3)
