"""Cleaning of the events table at scale: stream, bucket by user, clean bucket by bucket.

This module cleans one bucket of users (:func:`clean_bucket`: the row checks, the
repeat checks, masking and the curated rows) and runs the three steps of
:func:`clean_events`; events are never held whole:

1. **Partition** (:mod:`shopml.clean_partition`: one streaming pass over the raw
   Parquet file in record batches, its row groups shared among
   ``CleanConfig.partition_threads`` threads): every distinct raw user id is
   normalized and pseudonymized once per thread, and each row goes to the bucket
   (Arrow IPC files) of its pseudonym. Buckets are *ranges* of the pseudonym (its
   first 32 bits times ``P``, shifted right by 32), so all events of a user share a
   bucket and the buckets, in order, follow the pseudonym order. ``P`` keeps each
   bucket near ``CleanConfig.rows_per_bucket`` rows.
2. **Clean** each bucket as one task of a Dask graph (:mod:`shopml.processing`):
   row checks vectorized with pyarrow, then exact duplicates, near duplicates and bot
   users on integer codes of the columns (:mod:`shopml.clean_sort`'s
   :class:`~shopml.clean_sort.BucketSort`: the user's dense rank
   and the timestamp for every row, the other columns ranked only where two rows
   share user and timestamp; one sort gives the curated order, the duplicates and the
   bots' busiest minutes, see :mod:`shopml.quality`); free text is masked
   once per distinct value, and only where a cheap filter finds a digit or an ``@``
   (nothing without one can be a card, email, phone or address). A task writes its
   curated and quarantined rows as IPC parts and returns their counts.
3. **Merge** the parts in bucket order into ``events.parquet`` (curated) and the
   quarantine file (:mod:`shopml.clean_merge`), in row groups of a fixed size, so
   the files do not depend on ``P`` or on the scheduler. The merge follows the tasks
   as they finish (:func:`shopml.processing.iter_task_results`), so writing Parquet
   overlaps with cleaning the later buckets; the partition pass reads its next batch
   in a thread (:func:`shopml.processing.prefetch`) while it splits the current one.

Row order: curated events are sorted by ``user_id`` (the pseudonym), ``timestamp``,
``item_id``, ``event_type``, then every other column; equal to the order the stage
had when it sorted one whole table. Quarantined events are in bucket order, and in
raw order (``source_row``) within a bucket. The same input gives byte-identical
files.

Memory: two record batches (one read ahead) and a bounded cache of pseudonyms in the
partition pass, one bucket per running task in the clean step, one row group per
output in the merge (which runs beside the clean step); none grows with the input
(one user's events do share a bucket: a single user with tens of millions of events
makes a large one).

The public names of the partition, sort and merge modules that other code imports
from here (``bucket_of``, ``partition_events``, ``read_bucket``, ``rank_codes``,
``PARQUET_OPTIONS``, ...; see ``__all__``) stay importable from this module.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shopml.clean_merge import PARQUET_OPTIONS, ROW_GROUP_ROWS, PartMerger, merge_parts
from shopml.clean_partition import (
    BATCH_ROWS,
    PARTITION_THREADS,
    PSEUDONYM_COLUMN,
    bucket_of,
    partition_events,
    read_bucket,
    read_ipc,
    write_ipc,
)
from shopml.clean_rules import (
    CleanConfig,
    ReconciliationError,
    RowReasons,
    TableReport,
    quarantine_rows,
    unparsed_mask,
)
from shopml.clean_sort import (
    SORT_KEYS,
    BucketSort,
    curated_schema,
    group_codes,
    rank_codes,
    sort_bucket,
    tied_codes,
)
from shopml.pii import mask_values
from shopml.processing import count_buckets, iter_task_results
from shopml.quality import (
    flag_bot_users,
    flag_duplicates,
    flag_near_duplicates,
    sort_rows,
)
from shopml.schemas import EVENT_TYPES, TIMESTAMP_TYPE, schema_for
from shopml.security import Pseudonymizer

__all__ = [
    "BATCH_ROWS",
    "PARQUET_OPTIONS",
    "PARTITION_THREADS",
    "ROW_GROUP_ROWS",
    "SORT_KEYS",
    "BucketResult",
    "BucketRules",
    "BucketSort",
    "bucket_of",
    "clean_bucket",
    "clean_events",
    "curated_schema",
    "group_codes",
    "mask_free_text",
    "merge_parts",
    "partition_events",
    "rank_codes",
    "read_bucket",
    "sort_bucket",
    "tied_codes",
]

logger = logging.getLogger(__name__)

# Text that may hold personal data has a digit (cards, phones, house numbers) or an @.
_MAY_HOLD_PII = r"[\p{Nd}@]"


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
        bucket_dir, threads = work_dir / "buckets", config.partition_threads
        buckets = partition_events(
            raw_path, bucket_dir, n_buckets, pseudonymizer, threads=threads
        )
        rules = _write_rules(work_dir / "items.arrow", item_ids, now, config)
        outputs = (curated_path, quarantine_path)
        results, kept, rejected = _clean_buckets(
            buckets, work_dir / "parts", rules, outputs, dask_address
        )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    return _reconcile(results, rows_in, kept, rejected)


def _reconcile(
    results: list[BucketResult], rows_in: int, kept: int, rejected: int
) -> TableReport:
    """The buckets' summed report, checked against the raw and written row counts.

    Raises:
        ReconciliationError: the counts do not add up.
    """
    report = _sum_results("events", results)
    report.check_reconciled()
    if (report.rows_in, report.rows_kept, report.rows_quarantined) != (
        rows_in,
        kept,
        rejected,
    ):
        raise _mismatch(report, rows_in, kept, rejected)
    return report


def _write_rules(
    items_path: Path, item_ids: pa.Array, now: datetime, config: CleanConfig
) -> BucketRules:
    """Write the catalog's ids where the bucket tasks read them; their rules."""
    write_ipc(pa.table({"item_id": item_ids.cast(pa.string())}), items_path)
    return BucketRules(str(items_path), now, config)


def _clean_buckets(
    buckets: list[Path],
    parts: Path,
    rules: BucketRules,
    outputs: tuple[Path, Path],
    dask_address: str | None,
) -> tuple[list[BucketResult], int, int]:
    """Clean every bucket as a Dask task and merge its parts into ``outputs``.

    Args:
        buckets: the bucket folders, in bucket order.
        parts: folder for the part files (created).
        rules: the checks' parameters.
        outputs: the curated and the quarantined Parquet files to write.
        dask_address: a Dask scheduler; None runs the graph in-process.

    Returns:
        ``(results, kept, quarantined)``: every bucket's result in bucket order,
        and the rows written to each output.
    """
    parts.mkdir(exist_ok=True)
    arguments = [(str(path), str(parts), rules) for path in buckets]
    done = iter_task_results(
        clean_bucket, arguments, address=dask_address, scheduler=rules.config.scheduler
    )
    # Each bucket's parts are merged as soon as the buckets before it are done,
    # while the later buckets are being cleaned.
    results = []
    curated_path, quarantine_path = outputs
    with (
        PartMerger(curated_path) as curated,
        PartMerger(quarantine_path) as quarantined,
    ):
        for path, result in zip(buckets, done, strict=True):
            curated.add(parts / f"{path.stem}.curated.arrow")
            quarantined.add(parts / f"{path.stem}.quarantine.arrow")
            results.append(result)
    return results, curated.rows, quarantined.rows


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
    items = read_ipc(Path(rules.items_path)).column("item_id")
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
    write_ipc(curated, Path(parts_dir) / f"{stem}.curated.arrow")
    write_ipc(quarantine, Path(parts_dir) / f"{stem}.quarantine.arrow")
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
    frame["user_id"] = raw.column(PSEUDONYM_COLUMN).combine_chunks()
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
