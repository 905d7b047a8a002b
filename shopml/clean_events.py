"""Cleaning of the events table at scale: stream, bucket by user, clean bucket by bucket.

Events are never held whole. :func:`clean_events` works in three steps:

1. **Partition** (one streaming pass over the raw Parquet file in record batches):
   every distinct raw user id is normalized and pseudonymized once per run
   (:meth:`shopml.security.Pseudonymizer.pseudonymize_many`; later batches find it
   by a hash join on the ids seen), and each row goes to the bucket file (Arrow IPC)
   of its pseudonym. Buckets are *ranges* of the pseudonym
   (its first 32 bits times ``P``, shifted right by 32), so all events of a user
   share a bucket and the buckets, in order, follow the pseudonym order. ``P`` keeps
   each bucket near ``CleanConfig.rows_per_bucket`` rows.
2. **Clean** each bucket as one task of a Dask graph (:mod:`shopml.processing`):
   row checks vectorized with pyarrow, then exact duplicates, near duplicates and bot
   users on integer codes of the columns (dense ranks, packed into as few int64
   sort keys as possible; one sort gives the curated order, the duplicates and the
   bots' busiest minutes, see :mod:`shopml.quality`); free text is masked
   once per distinct value, and only where a cheap filter finds a digit or an ``@``
   (nothing without one can be a card, email, phone or address). A task writes its
   curated and quarantined rows as IPC parts and returns their counts.
3. **Merge** the parts in bucket order into ``events.parquet`` (curated) and the
   quarantine file, in row groups of a fixed size, so the files do not depend on
   ``P`` or on the scheduler.

Row order: curated events are sorted by ``user_id`` (the pseudonym), ``timestamp``,
``item_id``, ``event_type``, then every other column; equal to the order the stage
had when it sorted one whole table. Quarantined events are in bucket order, and in
raw order (``source_row``) within a bucket. The same input gives byte-identical
files.

Memory: one record batch and the ids pseudonymized so far (at most
``_CACHE_LIMIT``, then the cache starts afresh) in the partition pass, one bucket per
running task in the clean step, one row group in the merge; none grows with the
input beyond that cap (one user's events do share a bucket: a single user with tens
of millions of events makes a large one).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from itertools import compress
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shopml.clean_rules import (
    CleanConfig,
    ReconciliationError,
    RowReasons,
    TableReport,
    quarantine_rows,
    strip_blank,
    unparsed_mask,
)
from shopml.datasets import iter_parquet_batches
from shopml.pii import mask_values
from shopml.processing import count_buckets, run_tasks
from shopml.quality import (
    flag_bot_users,
    flag_duplicates,
    flag_near_duplicates,
    sort_rows,
)
from shopml.schemas import EVENT_TYPES, TIMESTAMP_TYPE, schema_for
from shopml.security import Pseudonymizer, pseudonym_texts

logger = logging.getLogger(__name__)

#: Columns of the curated sort, before every other column.
SORT_KEYS: tuple[str, ...] = ("user_id", "timestamp", "item_id", "event_type")
#: Rows read per record batch in the partition pass.
BATCH_ROWS = 262_144
#: Rows per row group of the merged Parquet files.
ROW_GROUP_ROWS = 1_000_000
#: Parquet options of the files the stage writes (fixed: the store versions content).
PARQUET_OPTIONS: dict[str, object] = {"compression": "zstd", "compression_level": 1}

# Bookkeeping columns of the bucket files.
_POSITION = "_position"
_PSEUDONYM = "_pseudonym"
# Text that may hold personal data has a digit (cards, phones, house numbers) or an @.
_MAY_HOLD_PII = r"[\p{Nd}@]"
# Distinct raw ids remembered between batches before the cache starts afresh.
_CACHE_LIMIT = 2_000_000


@dataclass(frozen=True)
class BucketRules:
    """What a bucket task needs besides its bucket: the checks' parameters.

    Attributes:
        items_path: Arrow IPC file with the curated catalog's ``item_id`` column.
        now: the reference time of the timestamp checks.
        config: thresholds of the clean stage.
    """

    items_path: str
    now: datetime
    config: CleanConfig


@dataclass(frozen=True)
class BucketResult:
    """Counts of one cleaned bucket (its rows are in the part files).

    Attributes:
        rows_in: rows of the bucket.
        rows_kept: rows in the curated part.
        rows_quarantined: rows in the quarantine part.
        reasons: quarantine reason -> rows.
        repairs: repair -> rows.
    """

    rows_in: int
    rows_kept: int
    rows_quarantined: int
    reasons: dict[str, int] = field(default_factory=dict)
    repairs: dict[str, int] = field(default_factory=dict)


def clean_events(
    raw_path: Path,
    item_ids: pa.Array,
    curated_path: Path,
    quarantine_path: Path,
    pseudonymizer: Pseudonymizer,
    *,
    config: CleanConfig,
    now: datetime,
    work_dir: Path,
    dask_address: str | None = None,
) -> TableReport:
    """Clean the raw events file into curated and quarantined Parquet files.

    Args:
        raw_path: ``events.parquet`` of the raw folder.
        item_ids: ids of the curated catalog (events of other items are
            ``unknown_item``).
        curated_path: the curated events file to write.
        quarantine_path: the quarantined events file to write.
        pseudonymizer: maps raw user ids to pseudonyms.
        config: thresholds and the bucket size.
        now: the reference time of the timestamp checks.
        work_dir: folder for bucket and part files (emptied and removed at the end);
            with a Dask cluster, a volume the workers mount at the same path.
        dask_address: a Dask scheduler; None runs the graph in-process.

    Returns:
        The events' counts, reasons and repairs.

    Raises:
        ReconciliationError: the counts do not add up.
    """
    rows_in = pq.ParquetFile(raw_path).metadata.num_rows
    n_buckets = count_buckets(rows_in, config.rows_per_bucket)
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        buckets = partition_events(
            raw_path, work_dir / "buckets", n_buckets, pseudonymizer
        )
        items_path = work_dir / "items.arrow"
        _write_ipc(pa.table({"item_id": item_ids.cast(pa.string())}), items_path)
        rules = BucketRules(str(items_path), now, config)

        parts = work_dir / "parts"
        parts.mkdir(exist_ok=True)
        arguments = [(str(path), str(parts), rules) for path in buckets]
        results = run_tasks(
            clean_bucket, arguments, address=dask_address, scheduler=config.scheduler
        )
        kept = merge_parts(
            [parts / f"{p.stem}.curated.arrow" for p in buckets], curated_path
        )
        rejected = merge_parts(
            [parts / f"{p.stem}.quarantine.arrow" for p in buckets], quarantine_path
        )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    report = _sum_results("events", results)
    report.check_reconciled()
    if (report.rows_in, report.rows_kept, report.rows_quarantined) != (
        rows_in,
        kept,
        rejected,
    ):
        raise _mismatch(report, rows_in, kept, rejected)
    return report


def _sum_results(table: str, results: list[BucketResult]) -> TableReport:
    reasons: dict[str, int] = {}
    repairs: dict[str, int] = {}
    for result in results:
        for key, value in result.reasons.items():
            reasons[key] = reasons.get(key, 0) + value
        for key, value in result.repairs.items():
            repairs[key] = repairs.get(key, 0) + value
    return TableReport(
        table=table,
        rows_in=sum(r.rows_in for r in results),
        rows_kept=sum(r.rows_kept for r in results),
        rows_quarantined=sum(r.rows_quarantined for r in results),
        reasons=dict(sorted(reasons.items())),
        repairs={k: v for k, v in repairs.items() if v},
    )


def _mismatch(
    report: TableReport, rows_in: int, kept: int, rejected: int
) -> ReconciliationError:
    return ReconciliationError(
        f"table {report.table}: the raw file has {rows_in} rows and the files hold "
        f"kept={kept} + quarantined={rejected}, but the buckets counted "
        f"rows_in={report.rows_in}, kept={report.rows_kept}, quarantined="
        f"{report.rows_quarantined}; refusing to publish"
    )


def bucket_of(pseudonym: str, n_buckets: int) -> int:
    """The bucket of a pseudonym: a range of its first 32 bits (order-preserving).

    Args:
        pseudonym: ``u_`` + hex, as :class:`~shopml.security.Pseudonymizer` makes.
        n_buckets: how many buckets there are.

    Returns:
        A bucket index in ``[0, n_buckets)``; a larger pseudonym never gets a
        smaller bucket.
    """
    return (int(pseudonym[2:10], 16) * n_buckets) >> 32


class _PseudonymCache:
    """Raw user id (trimmed) -> (pseudonym, bucket), each computed once.

    A dict maps every id seen to its position in Arrow/numpy arrays of pseudonyms
    and buckets, so a batch costs one probe per distinct id of the batch, whatever
    the number of users seen before (a hash join against all of them would grow
    with the users). Only ids not seen before are pseudonymized, in bulk
    (:meth:`~shopml.security.Pseudonymizer.pseudonymize_many`).
    """

    def __init__(self, pseudonymizer: Pseudonymizer, n_buckets: int) -> None:
        self.pseudonymizer = pseudonymizer
        self.n_buckets = n_buckets
        self._forget()

    def _forget(self) -> None:
        self.positions: dict[str, int] = {}
        self.pseudonyms: list[pa.Array] = []
        self.buckets = np.empty(0, dtype=np.int64)

    def lookup(self, raw_ids: pa.Array) -> tuple[pa.Array, np.ndarray]:
        """Pseudonyms and buckets of distinct, non-null raw ids, in their order."""
        if len(self.positions) > _CACHE_LIMIT:
            self._forget()
        ids = raw_ids.to_pylist()
        get = self.positions.get
        found = np.fromiter((get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
        is_new = found < 0
        if is_new.any():
            found[is_new] = self._learn(list(compress(ids, is_new)))
        # One array of every pseudonym so far; the chunks are joined once per batch.
        if len(self.pseudonyms) > 1:
            self.pseudonyms = [pa.concat_arrays(self.pseudonyms)]
        return self.pseudonyms[0].take(pa.array(found)), self.buckets[found]

    def _learn(self, new_ids: list[str]) -> np.ndarray:
        """Pseudonymize ids not seen before; returns their positions."""
        digests = self.pseudonymizer.pseudonymize_many(new_ids)
        # The bucket is a range of the first 32 bits (see bucket_of).
        heads = np.frombuffer(b"".join(d[:4] for d in digests), dtype=">u4")
        buckets = (heads.astype(np.uint64) * np.uint64(self.n_buckets)) >> np.uint64(32)
        first = len(self.positions)
        self.positions.update(
            zip(new_ids, range(first, first + len(new_ids)), strict=True)
        )
        self.pseudonyms.append(pa.array(pseudonym_texts(digests), pa.string()))
        self.buckets = np.concatenate([self.buckets, buckets.astype(np.int64)])
        return np.arange(first, first + len(new_ids), dtype=np.int64)


def partition_events(
    raw_path: Path,
    bucket_dir: Path,
    n_buckets: int,
    pseudonymizer: Pseudonymizer,
    batch_rows: int = BATCH_ROWS,
) -> list[Path]:
    """Split raw events into bucket files by the pseudonym of their user.

    Args:
        raw_path: the raw events Parquet file.
        bucket_dir: folder for ``bucket-<n>.arrow`` (created).
        n_buckets: number of buckets.
        pseudonymizer: maps raw user ids to pseudonyms.
        batch_rows: rows read at a time.

    Returns:
        The bucket files, in bucket order. Each holds the raw columns plus the row's
        position in the raw file and its pseudonym (null for a blank user id), rows in
        raw order.
    """
    bucket_dir.mkdir(parents=True, exist_ok=True)
    parquet = pq.ParquetFile(raw_path)
    schema = parquet.schema_arrow.append(pa.field(_POSITION, pa.int64()))
    schema = schema.append(pa.field(_PSEUDONYM, pa.string()))
    paths = [bucket_dir / f"bucket-{b:05d}.arrow" for b in range(n_buckets)]
    cache = _PseudonymCache(pseudonymizer, n_buckets)

    with ExitStack() as stack:
        writers = [stack.enter_context(pa.ipc.new_file(str(p), schema)) for p in paths]
        offset = 0
        for batch in iter_parquet_batches(parquet, batch_rows):
            table, buckets = _assign_buckets(batch, offset, cache)
            offset += batch.num_rows
            if n_buckets == 1:
                writers[0].write_table(table)
                continue

            # Group the batch by bucket (stable: raw order within a bucket).
            # Bucket numbers as int16 when they fit: numpy radix-sorts them.
            small = np.int16 if n_buckets <= np.iinfo(np.int16).max else np.int64
            order = np.argsort(buckets.astype(small), kind="stable")
            table = table.take(order)
            ends = np.cumsum(np.bincount(buckets, minlength=n_buckets))
            starts = ends - np.bincount(buckets, minlength=n_buckets)
            for bucket, (start, end) in enumerate(zip(starts, ends, strict=True)):
                if end > start:
                    writers[bucket].write_table(table.slice(start, end - start))
    logger.debug("partitioned %d events into %d buckets", offset, n_buckets)
    return paths


def _assign_buckets(
    batch: pa.RecordBatch, offset: int, cache: _PseudonymCache
) -> tuple[pa.Table, np.ndarray]:
    """The batch with its positions and pseudonyms, and each row's bucket."""
    encoded = pc.dictionary_encode(strip_blank(batch.column("user_id")))
    pseudonyms, buckets = cache.lookup(encoded.dictionary)
    # Rows with a blank user id go to bucket 0 (they are quarantined there).
    buckets = np.append(buckets, 0)
    indices = pc.fill_null(encoded.indices, len(encoded.dictionary))
    row_buckets = buckets[indices.to_numpy(zero_copy_only=False)]

    table = pa.Table.from_batches([batch])
    positions = np.arange(offset, offset + batch.num_rows, dtype=np.int64)
    table = table.append_column(_POSITION, pa.array(positions))
    table = table.append_column(_PSEUDONYM, pseudonyms.take(encoded.indices))
    return table, row_buckets


def clean_bucket(bucket_path: str, parts_dir: str, rules: BucketRules) -> BucketResult:
    """Clean one bucket of events; write its curated and quarantined parts.

    A Dask task: it reads only its bucket and the catalog's ids, and writes
    ``<bucket>.curated.arrow`` and ``<bucket>.quarantine.arrow`` into ``parts_dir``.

    Args:
        bucket_path: a bucket file from :func:`partition_events`.
        parts_dir: folder of the part files.
        rules: the checks' parameters.

    Returns:
        The bucket's counts, reasons and repairs.
    """
    raw = _read_ipc(Path(bucket_path))
    items = _read_ipc(Path(rules.items_path)).column("item_id")
    frame, padded = _event_frame(raw)
    reasons = RowReasons(raw.num_rows)
    repairs = _check_rows(raw, frame, reasons, items, rules)
    codes = {name: rank_codes(frame[name]) for name in _sort_order(frame)}
    order = _check_repeats(frame, codes, reasons, rules.config)
    masked, mask_repairs = mask_free_text(frame)
    repairs |= mask_repairs | {"whitespace": padded}

    is_bad = ~reasons.is_ok
    bad_rows = np.flatnonzero(is_bad)
    quarantine = quarantine_rows(raw, is_bad, reasons.labels(bad_rows))
    curated = _curate(frame, masked, codes, order, reasons.is_ok)

    stem = Path(bucket_path).stem
    _write_ipc(curated, Path(parts_dir) / f"{stem}.curated.arrow")
    _write_ipc(quarantine, Path(parts_dir) / f"{stem}.quarantine.arrow")
    return BucketResult(
        rows_in=raw.num_rows,
        rows_kept=curated.num_rows,
        rows_quarantined=quarantine.num_rows,
        reasons=reasons.counts(),
        repairs=repairs,
    )


def _event_frame(raw: pa.Table) -> tuple[dict[str, pa.Array], int]:
    """Data columns as checked: text trimmed (blank -> null), user_id pseudonymized.

    Returns:
        ``(columns by name, padded)``: ``padded`` counts the text cells that trimming
        repaired (what :func:`shopml.quality.count_padded` counts), from the same trim.
    """
    frame, padded = {}, 0
    for name in raw.column_names:
        if name.startswith("_"):
            continue
        column = raw.column(name).combine_chunks()
        if pa.types.is_string(column.type):
            trimmed = pc.utf8_trim_whitespace(column)
            is_blank = pc.equal(trimmed, "")
            is_padded = pc.and_not(pc.not_equal(trimmed, column), is_blank)
            padded += int(pc.sum(is_padded).as_py() or 0)
            column = pc.if_else(is_blank, pa.scalar(None, pa.string()), trimmed)
        frame[name] = column
    frame["user_id"] = raw.column(_PSEUDONYM).combine_chunks()
    # Case and whitespace of event types are repaired before the vocabulary check.
    frame["event_type"] = pc.utf8_lower(frame["event_type"])
    return frame, padded


def _check_rows(
    raw: pa.Table,
    frame: dict[str, pa.Array],
    reasons: RowReasons,
    items: pa.ChunkedArray,
    rules: BucketRules,
) -> dict[str, int]:
    """The checks that look at one row at a time, in the order reasons are given."""
    reasons.flag(unparsed_mask(raw, "row"), "unreadable_row")
    for name in ("user_id", "item_id", "event_type"):
        reasons.flag(pc.is_null(frame[name]), f"null_{name}")
    reasons.flag(unparsed_mask(raw, "timestamp"), "bad_timestamp")
    reasons.flag(pc.is_null(frame["timestamp"]), "null_timestamp")
    reasons.flag(unparsed_mask(raw, "value"), "bad_value")

    original = raw.column("event_type")
    is_known = pc.is_in(frame["event_type"], value_set=pa.array(EVENT_TYPES))
    reasons.flag(pc.invert(is_known), "bad_event_type")
    is_changed = pc.fill_null(pc.not_equal(frame["event_type"], original), False)
    repaired = pc.sum(pc.and_(is_changed, is_known)).as_py() or 0

    config, timestamps = rules.config, frame["timestamp"]
    latest = pa.scalar(rules.now + config.future_tolerance, TIMESTAMP_TYPE)
    reasons.flag(pc.greater(timestamps, latest), "future_timestamp")
    floor = pa.scalar(config.timestamp_floor, TIMESTAMP_TYPE)
    reasons.flag(pc.less(timestamps, floor), "early_timestamp")
    is_listed = pc.is_in(frame["item_id"], value_set=items.combine_chunks())
    reasons.flag(pc.invert(is_listed), "unknown_item")
    return {"event_type": int(repaired)}


def _check_repeats(
    frame: dict[str, pa.Array],
    codes: dict[str, np.ndarray],
    reasons: RowReasons,
    config: CleanConfig,
) -> np.ndarray:
    """Exact duplicates, near duplicates and bot users, among rows still in play.

    Returns:
        Every row in the curated sort (ties in raw order), for :func:`_curate`.
    """
    order = sort_rows(list(codes.values()))
    is_duplicate = flag_duplicates(list(codes.values()), reasons.is_ok, order)
    reasons.flag(is_duplicate, "duplicate")
    micros = _micros(frame["timestamp"])
    keys = [codes["user_id"], codes["item_id"], codes["event_type"]]
    window = config.near_duplicate_window_s
    is_near = flag_near_duplicates(
        keys, micros, reasons.is_ok, window, time_codes=codes["timestamp"]
    )
    reasons.flag(is_near, "near_duplicate")
    per_minute = config.bot_events_per_minute
    is_bot = flag_bot_users(
        codes["user_id"], micros, reasons.is_ok, per_minute, order=order
    )
    reasons.flag(is_bot, "bot_user")
    return order


def _micros(timestamps: pa.Array) -> np.ndarray:
    """Microseconds since 1970 as int64 (0 where missing; such rows are flagged)."""
    values = pc.fill_null(timestamps.cast(pa.int64()), 0)
    return np.asarray(values.to_numpy(zero_copy_only=False))


def rank_codes(column: pa.Array) -> np.ndarray:
    """Integer codes that sort like the values: equal values, equal codes.

    Codes are dense ranks (0 for the smallest value), so they stay below the row
    count whatever the values' range, and several columns pack into one sort key
    (:func:`shopml.quality.pack_keys`).

    Args:
        column: any sortable array; text compares by its UTF-8 bytes, NaN sorts after
            every number (as in pyarrow).

    Returns:
        int64 codes in ``[0, distinct values]``; nulls get the top code (they sort
        last, as in pyarrow).
    """
    # Each distinct value is ranked once; rows take their value's rank.
    encoded = pc.dictionary_encode(column)
    ranks = pc.rank(encoded.dictionary, sort_keys="ascending", tiebreaker="dense")
    ranks = np.asarray(ranks, dtype=np.int64) - 1
    ranks = np.append(ranks, len(encoded.dictionary))
    indices = pc.fill_null(encoded.indices, len(encoded.dictionary))
    return np.asarray(ranks[indices.to_numpy(zero_copy_only=False)])


def _sort_order(frame: dict[str, pa.Array]) -> list[str]:
    """The curated sort: :data:`SORT_KEYS`, then every other column in table order."""
    names = list(curated_schema(list(frame)).names)
    return [*SORT_KEYS, *(n for n in names if n not in SORT_KEYS)]


def curated_schema(names: list[str]) -> pa.Schema:
    """Canonical events schema, then the raw table's extra columns as text."""
    canonical = schema_for("events")
    extras = [n for n in names if n not in canonical.names and not n.startswith("_")]
    return pa.schema(list(canonical) + [pa.field(n, pa.string()) for n in extras])


def mask_free_text(
    frame: dict[str, pa.Array],
) -> tuple[dict[str, pa.Array], dict[str, int]]:
    """Mask personal data in ``query`` and the extra event columns.

    Returns:
        ``(masked columns, repairs)``: the columns that changed, by name, and
        ``masked_<column>`` -> values changed, for every free-text column.
    """
    structured = set(schema_for("events").names) - {"query"}
    masked: dict[str, pa.Array] = {}
    repairs: dict[str, int] = {}
    for name in [n for n in frame if n not in structured]:
        column = frame[name]
        candidates = pc.fill_null(
            pc.match_substring_regex(column, _MAY_HOLD_PII), False
        )
        rows = np.flatnonzero(candidates.to_numpy(zero_copy_only=False))
        repairs[f"masked_{name}"] = 0
        if not len(rows):
            continue
        encoded = pc.dictionary_encode(column.take(pa.array(rows)))
        texts = encoded.dictionary.to_pylist()
        after = pa.array(mask_values(texts), pa.string())
        changed = np.array(
            [a != b for a, b in zip(after.to_pylist(), texts, strict=True)]
        )
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        repairs[f"masked_{name}"] = int(changed[codes].sum())
        if changed.any():
            masked[name] = pc.replace_with_mask(
                column, candidates, after.take(encoded.indices)
            )
    return masked, repairs


def _curate(
    frame: dict[str, pa.Array],
    masked: dict[str, pa.Array],
    codes: dict[str, np.ndarray],
    order: np.ndarray,
    is_kept: np.ndarray,
) -> pa.Table:
    """The kept rows, typed, masked and in the curated sort.

    ``order`` sorts every row by the unmasked columns; it is the curated order
    unless masking changed a value, in which case the kept rows are sorted again.
    """
    schema = curated_schema(list(frame))
    columns = {name: masked.get(name, frame[name]) for name in schema.names}
    for name in schema.names:
        if name not in frame:
            columns[name] = pa.nulls(len(is_kept), schema.field(name).type)
    kept = order[is_kept[order]]
    if masked:
        sort_codes = [
            rank_codes(masked[name]) if name in masked else codes[name]
            for name in _sort_order(frame)
        ]
        kept = sort_rows(sort_codes, np.sort(kept))
    arrays = [columns[name].cast(schema.field(name).type) for name in schema.names]
    return pa.Table.from_arrays(arrays, schema=schema).take(pa.array(kept))


def merge_parts(parts: list[Path], target: Path) -> int:
    """Concatenate part files in order into one Parquet file; returns its row count.

    Row groups hold :data:`ROW_GROUP_ROWS` rows whatever the parts' sizes, so the
    file depends on the rows only. An empty merge still writes the schema.
    """
    if not parts:
        raise ValueError(f"no part files to merge into {target}")
    schema = pa.ipc.open_file(pa.memory_map(str(parts[0]))).schema
    total = 0
    with pq.ParquetWriter(target, schema, **PARQUET_OPTIONS) as writer:
        for group in _row_groups(parts, ROW_GROUP_ROWS):
            writer.write_table(group, row_group_size=ROW_GROUP_ROWS)
            total += group.num_rows
    return total


def _row_groups(parts: list[Path], size: int) -> Iterator[pa.Table]:
    """The parts' rows, re-cut into tables of exactly ``size`` rows (the last fewer)."""
    pending: list[pa.Table] = []
    held = 0
    for part in parts:
        table = _read_ipc(part)
        pending.append(table)
        held += table.num_rows
        while held >= size:
            joined = pa.concat_tables(pending)
            yield joined.slice(0, size)
            pending, held = [joined.slice(size)], held - size
    if held:
        yield pa.concat_tables(pending)


def _read_ipc(path: Path) -> pa.Table:
    # Memory-mapped: the pages are the file's, read when a column is touched.
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def _write_ipc(table: pa.Table, path: Path) -> None:
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
