"""Cleaning of the events table at scale: stream, bucket by user, clean bucket by bucket.

Events are never held whole. :func:`clean_events` works in three steps:

1. **Partition** (one streaming pass over the raw Parquet file in record batches,
   its row groups shared among ``CleanConfig.partition_threads`` threads): every
   distinct raw user id is normalized and pseudonymized once per thread
   (:meth:`shopml.security.Pseudonymizer.pseudonymize_many`; later batches find it
   in a bounded cache), and each row goes to the bucket (Arrow IPC files)
   of its pseudonym. Buckets are *ranges* of the pseudonym
   (its first 32 bits times ``P``, shifted right by 32), so all events of a user
   share a bucket and the buckets, in order, follow the pseudonym order. ``P`` keeps
   each bucket near ``CleanConfig.rows_per_bucket`` rows.
2. **Clean** each bucket as one task of a Dask graph (:mod:`shopml.processing`):
   row checks vectorized with pyarrow, then exact duplicates, near duplicates and bot
   users on integer codes of the columns (:class:`BucketSort`: the user's dense rank
   and the timestamp for every row, the other columns ranked only where two rows
   share user and timestamp; one sort gives the curated order, the duplicates and the
   bots' busiest minutes, see :mod:`shopml.quality`); free text is masked
   once per distinct value, and only where a cheap filter finds a digit or an ``@``
   (nothing without one can be a card, email, phone or address). A task writes its
   curated and quarantined rows as IPC parts and returns their counts.
3. **Merge** the parts in bucket order into ``events.parquet`` (curated) and the
   quarantine file, in row groups of a fixed size, so the files do not depend on
   ``P`` or on the scheduler. The merge follows the tasks as they finish
   (:func:`shopml.processing.iter_task_results`), so writing Parquet overlaps with
   cleaning the later buckets; the partition pass reads its next batch in a thread
   (:func:`shopml.processing.prefetch`) while it splits the current one.

Row order: curated events are sorted by ``user_id`` (the pseudonym), ``timestamp``,
``item_id``, ``event_type``, then every other column; equal to the order the stage
had when it sorted one whole table. Quarantined events are in bucket order, and in
raw order (``source_row``) within a bucket. The same input gives byte-identical
files.

Memory: two record batches (one read ahead) and the ids pseudonymized so far (two
generations of at most ``_CACHE_LIMIT``, recently used ones kept) in the partition
pass, one bucket per running task in the clean step, one row group per output in
the merge (which runs beside the clean step); none grows with the input (one
user's events do share a bucket: a single user with tens of millions of events
makes a large one).
"""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
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
from shopml.pii import mask_values
from shopml.processing import count_buckets, iter_task_results, prefetch
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
#: Threads of the partition pass by default (``CleanConfig.partition_threads``).
PARTITION_THREADS = 2
#: Rows per row group of the merged Parquet files.
ROW_GROUP_ROWS = 1_000_000
#: Parquet options of the files the stage writes (fixed: the store versions content).
PARQUET_OPTIONS: dict[str, object] = {"compression": "zstd", "compression_level": 1}

# Bookkeeping columns of the bucket files.
_POSITION = "_position"
_PSEUDONYM = "_pseudonym"
# Text that may hold personal data has a digit (cards, phones, house numbers) or an @.
_MAY_HOLD_PII = r"[\p{Nd}@]"
# Distinct raw ids per generation of the pseudonym cache (two are held, see
# _PseudonymCache): about 50 MiB, whatever the number of users.
_CACHE_LIMIT = 262_144


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
            raw_path,
            work_dir / "buckets",
            n_buckets,
            pseudonymizer,
            threads=config.partition_threads,
        )
        items_path = work_dir / "items.arrow"
        _write_ipc(pa.table({"item_id": item_ids.cast(pa.string())}), items_path)
        rules = BucketRules(str(items_path), now, config)

        parts = work_dir / "parts"
        parts.mkdir(exist_ok=True)
        arguments = [(str(path), str(parts), rules) for path in buckets]
        done = iter_task_results(
            clean_bucket, arguments, address=dask_address, scheduler=config.scheduler
        )
        # Each bucket's parts are merged as soon as the buckets before it are done,
        # while the later buckets are being cleaned.
        results = []
        with (
            _PartMerger(curated_path) as curated,
            _PartMerger(quarantine_path) as quarantined,
        ):
            for path, result in zip(buckets, done, strict=True):
                curated.add(parts / f"{path.stem}.curated.arrow")
                quarantined.add(parts / f"{path.stem}.quarantine.arrow")
                results.append(result)
        kept, rejected = curated.rows, quarantined.rows
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


class _Generation:
    """Raw ids (trimmed) -> positions in Arrow/numpy arrays of pseudonyms and buckets."""

    def __init__(self) -> None:
        self.positions: dict[str, int] = {}
        self.pseudonyms: list[pa.Array] = []
        self.buckets = np.empty(0, dtype=np.int64)

    def find(self, ids: list[str]) -> np.ndarray:
        """Positions of ``ids``, -1 for ids not held."""
        get = self.positions.get
        return np.fromiter((get(i, -1) for i in ids), dtype=np.int64, count=len(ids))

    def add(self, ids: list[str], pseudonyms: pa.Array, buckets: np.ndarray) -> None:
        first = len(self.positions)
        self.positions.update(zip(ids, range(first, first + len(ids)), strict=True))
        self.pseudonyms.append(pseudonyms)
        self.buckets = np.concatenate([self.buckets, buckets])

    def take(self, positions: np.ndarray) -> tuple[pa.Array, np.ndarray]:
        # One array of every pseudonym held; the chunks are joined once per batch.
        if len(self.pseudonyms) > 1:
            self.pseudonyms = [pa.concat_arrays(self.pseudonyms)]
        return self.pseudonyms[0].take(pa.array(positions)), self.buckets[positions]


class _PseudonymCache:
    """Raw user id (trimmed) -> (pseudonym, bucket), each computed once while held.

    A dict maps every id held to its position in Arrow/numpy arrays of pseudonyms
    and buckets, so a batch costs one probe per distinct id of the batch, whatever
    the number of users held (a hash join against all of them would grow with the
    users). Only ids not held are pseudonymized, in bulk
    (:meth:`~shopml.security.Pseudonymizer.pseudonymize_many`).

    Memory is bounded by two generations of at most :data:`_CACHE_LIMIT` ids: when
    the current one is full it becomes the previous one, and an id found only in
    the previous generation moves to the current one, so ids in recent use are kept
    (an approximate LRU) and the cache does not grow with the number of users.
    """

    def __init__(self, pseudonymizer: Pseudonymizer, n_buckets: int) -> None:
        self.pseudonymizer = pseudonymizer
        self.n_buckets = n_buckets
        self.current, self.previous = _Generation(), _Generation()

    def lookup(self, raw_ids: pa.Array) -> tuple[pa.Array, np.ndarray]:
        """Pseudonyms and buckets of distinct, non-null raw ids, in their order."""
        if len(self.current.positions) > _CACHE_LIMIT:
            self.current, self.previous = _Generation(), self.current
        ids = raw_ids.to_pylist()
        found = self.current.find(ids)
        is_new = found < 0
        if is_new.any():
            new_ids = list(compress(ids, is_new))
            first = len(self.current.positions)
            self._learn(new_ids)
            found[is_new] = np.arange(first, first + len(new_ids), dtype=np.int64)
        return self.current.take(found)

    def _learn(self, new_ids: list[str]) -> None:
        """Add ids the current generation lacks: from the previous one, or computed."""
        held = self.previous.find(new_ids)
        is_held = held >= 0
        pseudonyms = pa.nulls(len(new_ids), pa.string())
        buckets = np.zeros(len(new_ids), dtype=np.int64)
        if is_held.any():
            moved, moved_buckets = self.previous.take(held[is_held])
            pseudonyms = pc.replace_with_mask(pseudonyms, pa.array(is_held), moved)
            buckets[is_held] = moved_buckets
        if not is_held.all():
            fresh = list(compress(new_ids, ~is_held))
            digests = self.pseudonymizer.pseudonymize_many(fresh)
            # The bucket is a range of the first 32 bits (see bucket_of).
            heads = np.frombuffer(b"".join(d[:4] for d in digests), dtype=">u4")
            n = np.uint64(self.n_buckets)
            buckets[~is_held] = (heads.astype(np.uint64) * n) >> np.uint64(32)
            texts = pa.array(pseudonym_texts(digests), pa.string())
            pseudonyms = pc.replace_with_mask(pseudonyms, pa.array(~is_held), texts)
        self.current.add(new_ids, pseudonyms, buckets)


def partition_events(
    raw_path: Path,
    bucket_dir: Path,
    n_buckets: int,
    pseudonymizer: Pseudonymizer,
    batch_rows: int = BATCH_ROWS,
    *,
    threads: int = PARTITION_THREADS,
) -> list[Path]:
    """Split raw events into bucket folders by the pseudonym of their user.

    The raw file's row groups are shared out, in file order, among up to
    ``threads`` threads; each writes ``<way>.arrow`` into every bucket folder, so a
    bucket read way after way (:func:`read_bucket`) is in raw order. The heavy steps
    (Parquet decoding, take, IPC writes) release the GIL.

    Args:
        raw_path: the raw events Parquet file.
        bucket_dir: folder for the ``bucket-<n>`` folders (created).
        n_buckets: number of buckets.
        pseudonymizer: maps raw user ids to pseudonyms.
        batch_rows: rows read at a time.
        threads: most threads to split the file with (one per share of row groups).

    Returns:
        The bucket folders, in bucket order. A bucket holds the raw columns plus the
        row's position in the raw file and its pseudonym (null for a blank user id).

    Raises:
        ValueError: ``threads`` is below 1.
    """
    if threads < 1:
        raise ValueError(f"partition threads={threads} must be at least 1")
    parquet = pq.ParquetFile(raw_path)
    sizes = [
        parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)
    ]
    firsts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    ways = max(1, min(threads, len(sizes)))
    shares = [share.tolist() for share in np.array_split(np.arange(len(sizes)), ways)]

    paths = [bucket_dir / f"bucket-{b:05d}" for b in range(n_buckets)]
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
    jobs = [
        _Share(raw_path, groups, int(firsts[groups[0]]) if groups else 0, way)
        for way, groups in enumerate(shares)
    ]
    split = partial(
        _partition_share,
        paths=paths,
        pseudonymizer=pseudonymizer,
        batch_rows=batch_rows,
    )
    if ways == 1:
        rows = [split(jobs[0])]
    else:
        with ThreadPoolExecutor(ways, thread_name_prefix="shopml-partition") as pool:
            rows = list(pool.map(split, jobs))
    logger.debug("partitioned %d events into %d buckets", sum(rows), n_buckets)
    return paths


@dataclass(frozen=True)
class _Share:
    """Row groups of the raw file one partition thread splits.

    Attributes:
        raw_path: the raw events file.
        row_groups: the row groups, consecutive, in file order.
        first_row: position in the raw file of the share's first row.
        way: the share's number: its file in every bucket folder is ``<way>.arrow``.
    """

    raw_path: Path
    row_groups: list[int]
    first_row: int
    way: int


def _partition_share(
    share: _Share, *, paths: list[Path], pseudonymizer: Pseudonymizer, batch_rows: int
) -> int:
    """Split one share of row groups into the buckets; returns its row count."""
    parquet = pq.ParquetFile(share.raw_path)
    schema = parquet.schema_arrow.append(pa.field(_POSITION, pa.int64()))
    schema = schema.append(pa.field(_PSEUDONYM, pa.string()))
    n_buckets = len(paths)
    cache = _PseudonymCache(pseudonymizer, n_buckets)
    batches = (
        batch
        for group in share.row_groups
        for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group])
    )

    with ExitStack() as stack:
        writers = [
            stack.enter_context(pa.ipc.new_file(str(p / f"{share.way}.arrow"), schema))
            for p in paths
        ]
        offset = share.first_row
        # The next batch is read and decoded in a thread while this one is split.
        for batch in prefetch(batches, 1):
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
    return offset - share.first_row


def read_bucket(path: Path) -> pa.Table:
    """The rows of one bucket folder from :func:`partition_events`, in raw order."""
    files = sorted(path.glob("*.arrow"), key=lambda file: int(file.stem))
    if not files:
        raise FileNotFoundError(f"bucket folder {path} holds no <way>.arrow files")
    return pa.concat_tables([_read_ipc(file) for file in files])


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
        bucket_path: a bucket folder from :func:`partition_events`.
        parts_dir: folder of the part files.
        rules: the checks' parameters.

    Returns:
        The bucket's counts, reasons and repairs.
    """
    raw = read_bucket(Path(bucket_path))
    items = _read_ipc(Path(rules.items_path)).column("item_id")
    frame, padded = _event_frame(raw)
    reasons = RowReasons(raw.num_rows)
    # Distinct items once: for the catalog check and the near-duplicate groups.
    item_ids = pc.dictionary_encode(frame["item_id"])
    repairs = _check_rows(raw, frame, reasons, (item_ids, items), rules)
    ordered = sort_bucket(frame)
    _check_repeats(frame, ordered, reasons, group_codes(item_ids), rules.config)
    masked, mask_repairs = mask_free_text(frame)
    repairs |= mask_repairs | {"whitespace": padded}

    is_bad = ~reasons.is_ok
    bad_rows = np.flatnonzero(is_bad)
    quarantine = quarantine_rows(raw, is_bad, reasons.labels(bad_rows))
    curated = _curate(frame, masked, ordered, reasons.is_ok)

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
    items: tuple[pa.DictionaryArray, pa.ChunkedArray],
    rules: BucketRules,
) -> dict[str, int]:
    """The checks that look at one row at a time, in the order reasons are given.

    ``items`` holds the bucket's item ids (dictionary-encoded) and the catalog's.
    """
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
    # Each distinct item is looked up once; rows take their item's answer.
    item_ids, catalog = items
    is_listed = pc.is_in(item_ids.dictionary, value_set=catalog.combine_chunks())
    is_listed = np.append(np.asarray(is_listed, dtype=bool), False)
    reasons.flag(~is_listed[group_codes(item_ids)], "unknown_item")
    return {"event_type": int(repaired)}


@dataclass(frozen=True)
class BucketSort:
    """A bucket's rows in the curated sort, and the integer codes it sorts by.

    Rows rarely share a user and a timestamp, so only the two lead keys are coded
    for every row (the user's dense rank, and the timestamp in microseconds); the
    other sort columns are ranked only among the rows that share their lead keys
    with another row (``is_tied``), which is all the sort and the duplicate check
    ever compare them on.

    Attributes:
        names: the sort columns, :data:`SORT_KEYS` first (see :func:`_sort_order`).
        keys: one int64 code array per name, over every row; equal values, equal
            codes, in value order. Past the lead keys, codes are 0 outside
            ``is_tied``.
        is_tied: rows whose user and timestamp another row of the bucket shares.
        order: every row in the curated sort, ties in raw order.
    """

    names: list[str]
    keys: list[np.ndarray]
    is_tied: np.ndarray
    order: np.ndarray


#: Sort columns coded for every row (see :class:`BucketSort`).
_LEAD_KEYS = 2


def sort_bucket(frame: dict[str, pa.Array]) -> BucketSort:
    """Sort a bucket's rows into the curated order (see :class:`BucketSort`)."""
    names = _sort_order(frame)
    users = rank_codes(frame["user_id"])
    lead = [users, _time_keys(frame["timestamp"], users)]
    order = sort_rows(lead)
    is_tied = _shares_previous(lead, order)
    rest = [tied_codes(frame[name], is_tied) for name in names[_LEAD_KEYS:]]
    keys = lead + rest
    if is_tied.any():
        # Runs of equal lead keys are contiguous; sort each by every key (stable).
        spots = np.flatnonzero(is_tied[order])
        runs = order[spots]
        order[spots] = runs[np.lexsort([key[runs] for key in keys[::-1]])]
    return BucketSort(names, keys, is_tied, order)


def _time_keys(timestamps: pa.Array, users: np.ndarray) -> np.ndarray:
    """Codes of timestamps that sort like them: microseconds, or dense ranks when
    the microseconds' span would not pack with the users' into one sort key."""
    values = timestamps.cast(pa.int64())
    top = pc.max(values).as_py()
    if top is None:
        return np.zeros(len(values), dtype=np.int64)
    # Missing timestamps sort last (such rows are quarantined before any sort).
    micros = np.asarray(pc.fill_null(values, top + 1).to_numpy(zero_copy_only=False))
    span = top + 2 - int(micros.min())
    if span * (int(users.max()) + 1) >= 2**62:
        return rank_codes(timestamps)
    return micros


def _shares_previous(keys: list[np.ndarray], order: np.ndarray) -> np.ndarray:
    """Rows equal in every key to a neighbour in ``order`` (a boolean mask)."""
    is_tied = np.zeros(len(order), dtype=bool)
    if len(order) < 2:
        return is_tied
    same = np.ones(len(order) - 1, dtype=bool)
    for key in keys:
        column = key[order]
        same &= column[1:] == column[:-1]
    is_tied[order[1:][same]] = True
    is_tied[order[:-1][same]] = True
    return is_tied


def tied_codes(column: pa.Array, is_tied: np.ndarray) -> np.ndarray:
    """:func:`rank_codes` of ``column`` among the rows in ``is_tied``, 0 elsewhere.

    Ranks among a subset of rows keep the values' order and equality within it.
    """
    codes = np.zeros(len(is_tied), dtype=np.int64)
    rows = np.flatnonzero(is_tied)
    if len(rows):
        codes[rows] = rank_codes(column.take(pa.array(rows)))
    return codes


def group_codes(column: pa.Array) -> np.ndarray:
    """Integer codes of a column's values: equal values, equal codes (any order).

    Args:
        column: any array; a dictionary array's indices are used as they are.

    Returns:
        int64 codes; nulls get ``len(dictionary)``.
    """
    is_encoded = isinstance(column, pa.DictionaryArray)
    encoded = column if is_encoded else pc.dictionary_encode(column)
    indices = pc.fill_null(encoded.indices, len(encoded.dictionary))
    return np.asarray(indices.to_numpy(zero_copy_only=False), dtype=np.int64)


def _check_repeats(
    frame: dict[str, pa.Array],
    ordered: BucketSort,
    reasons: RowReasons,
    item_codes: np.ndarray,
    config: CleanConfig,
) -> None:
    """Exact duplicates, near duplicates and bot users, among rows still in play."""
    # Rows equal in every column share user and timestamp: only tied rows compare.
    is_duplicate = flag_duplicates(
        ordered.keys, reasons.is_ok & ordered.is_tied, ordered.order
    )
    reasons.flag(is_duplicate, "duplicate")

    micros = _micros(frame["timestamp"])
    users = ordered.keys[0]
    keys = [users, item_codes, group_codes(frame["event_type"])]
    window = config.near_duplicate_window_s
    # The curated order lists each user's rows by time, so each (user, item, type)
    # group's rows too.
    is_near = flag_near_duplicates(
        keys, micros, reasons.is_ok, window, time_order=ordered.order
    )
    reasons.flag(is_near, "near_duplicate")
    per_minute = config.bot_events_per_minute
    is_bot = flag_bot_users(
        users, micros, reasons.is_ok, per_minute, order=ordered.order
    )
    reasons.flag(is_bot, "bot_user")


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
        repairs[f"masked_{name}"] = 0
        if column.null_count == len(column):
            continue  # nothing to mask (and no regex to compile)
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
    ordered: BucketSort,
    is_kept: np.ndarray,
) -> pa.Table:
    """The kept rows, typed, masked and in the curated sort.

    ``ordered`` sorts every row by the unmasked columns; it is the curated order
    unless masking changed a value, in which case the kept rows are sorted again
    (masked columns are never lead keys, so only tied rows need new codes).
    """
    schema = curated_schema(list(frame))
    columns = {name: masked.get(name, frame[name]) for name in schema.names}
    for name in schema.names:
        if name not in frame:
            columns[name] = pa.nulls(len(is_kept), schema.field(name).type)
    kept = ordered.order[is_kept[ordered.order]]
    if masked:
        sort_codes = [
            tied_codes(masked[name], ordered.is_tied) if name in masked else key
            for name, key in zip(ordered.names, ordered.keys, strict=True)
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
    with _PartMerger(target) as merger:
        for part in parts:
            merger.add(part)
    return merger.rows


class _PartMerger:
    """Appends part files, one after another, to a Parquet file in fixed row groups.

    Row groups hold :data:`ROW_GROUP_ROWS` rows whatever the parts' sizes (the last
    fewer), so the file depends on the rows only; at most one row group is held.

    Args:
        target: the Parquet file to write.
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._held = 0

    def __enter__(self) -> _PartMerger:
        return self

    def add(self, part: Path) -> None:
        """Append the rows of one part file (Arrow IPC)."""
        table = _read_ipc(part)
        if self._writer is None:
            self._writer = pq.ParquetWriter(
                self.target, table.schema, **PARQUET_OPTIONS
            )
        self._pending.append(table)
        self._held += table.num_rows
        while self._held >= ROW_GROUP_ROWS:
            joined = pa.concat_tables(self._pending)
            self._write(joined.slice(0, ROW_GROUP_ROWS))
            self._pending = [joined.slice(ROW_GROUP_ROWS)]
            self._held -= ROW_GROUP_ROWS

    def _write(self, group: pa.Table) -> None:
        assert self._writer is not None
        # One chunk per column: the writer's pages then depend on the rows only,
        # not on how the parts cut them (the file's hash is the version).
        self._writer.write_table(group.combine_chunks(), row_group_size=ROW_GROUP_ROWS)
        self.rows += group.num_rows

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        if self._writer is None:
            return
        try:
            if error is None and self._held:
                self._write(pa.concat_tables(self._pending))
        finally:
            self._pending, self._held = [], 0
            self._writer.close()


def _read_ipc(path: Path) -> pa.Table:
    # Memory-mapped: the pages are the file's, read when a column is touched.
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def _write_ipc(table: pa.Table, path: Path) -> None:
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
