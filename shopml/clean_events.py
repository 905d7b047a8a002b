"""Cleaning of the events table at scale: stream, bucket by user, clean bucket by bucket.

This module cleans one bucket of users (:func:`clean_bucket`: the row checks, the
repeat checks, masking and the curated rows) and runs the three steps of
:func:`clean_events`; events are never held whole:

1. **Partition** (:mod:`shopml.clean_partition`: one streaming pass over the raw
   Parquet file in record batches, its row groups shared among
   ``CleanConfig.partition_threads`` threads): every distinct raw user id is
   trimmed once per batch, and normalized and pseudonymized once (in a cache the
   threads share), and each row goes to the bucket (Arrow IPC files) of its
   pseudonym; the pass also counts the user ids that trimming repaired. Buckets
   are *ranges* of the pseudonym (its first 32 bits times ``P``, shifted right by
   32), so all events of a user share a bucket and the buckets, in order, follow
   the pseudonym order. ``P`` keeps each bucket near ``CleanConfig.rows_per_bucket``
   rows.
2. **Clean** each bucket as one task of a Dask graph (:mod:`shopml.processing`):
   row checks vectorized with pyarrow (``event_type`` repaired and checked once per
   distinct value; ``user_id`` not trimmed again), then exact duplicates, near
   duplicates and bot users on integer codes of the columns (:mod:`shopml.clean_sort`'s
   :class:`~shopml.clean_sort.BucketSort`: the user's dense rank
   and the timestamp for every row, the other columns ranked only where two rows
   share user and timestamp; one sort gives the curated order, the duplicates and the
   bots' busiest minutes, see :mod:`shopml.quality`); free text is masked
   once per distinct value, and only where a cheap filter finds a digit or an ``@``
   (nothing without one can be a card, email, phone or address). A task hands its
   curated and quarantined rows to the merge and returns their counts: in memory
   with the in-process scheduler (:func:`clean_bucket_in_memory`, through a
   :class:`~shopml.clean_merge.PartHandoff`), as IPC part files on a Dask cluster
   (:func:`clean_bucket`).
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
partition pass, one bucket per running task in the clean step, the cleaned parts of
at most ``_HANDOFF_BUCKETS`` buckets waiting for the merge (in-process), one row
group per output in the merge (which runs beside the clean step); none grows with
the input
(one user's events do share a bucket: a single user with tens of millions of events
makes a large one).

The public names of the partition, sort and merge modules that other code imports
from here (``bucket_of``, ``partition_events``, ``read_bucket``, ``rank_codes``,
``PARQUET_OPTIONS``, ...; see ``__all__``) stay importable from this module.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shopml.clean_merge import (
    PARQUET_OPTIONS,
    ROW_GROUP_ROWS,
    PartHandoff,
    PartMerger,
    merge_parts,
)
from shopml.clean_partition import (
    BATCH_ROWS,
    PARTITION_THREADS,
    PSEUDONYM_COLUMN,
    bucket_of,
    partition_events,
    pseudonym_text,
    read_bucket,
    read_ipc,
    split_events,
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
    "clean_bucket_in_memory",
    "clean_events",
    "curated_schema",
    "group_codes",
    "mask_free_text",
    "merge_parts",
    "partition_events",
    "rank_codes",
    "read_bucket",
    "sort_bucket",
    "split_events",
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
        partition = split_events(
            raw_path, bucket_dir, n_buckets, pseudonymizer, threads=threads
        )
        rules = _write_rules(work_dir / "items.arrow", item_ids, now, config)
        outputs = (curated_path, quarantine_path)
        results, kept, rejected = _clean_buckets(
            partition.paths, work_dir / "parts", rules, outputs, dask_address
        )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    return _reconcile(results, rows_in, kept, rejected, partition.padded_user_ids)


def _reconcile(
    results: list[BucketResult],
    rows_in: int,
    kept: int,
    rejected: int,
    padded_user_ids: int,
) -> TableReport:
    """The buckets' summed report, checked against the raw and written row counts.

    ``padded_user_ids`` (counted by the partition pass) joins the buckets'
    ``whitespace`` repairs.

    Raises:
        ReconciliationError: the counts do not add up.
    """
    report = _sum_results("events", results, {"whitespace": padded_user_ids})
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

    On a cluster the tasks write part files that the merge reads; in-process they
    hand their tables over (:class:`~shopml.clean_merge.PartHandoff`).

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
    handoff = PartHandoff(limit=_HANDOFF_BUCKETS)
    arguments: list[tuple[object, ...]]
    if dask_address:
        task: Callable[..., BucketResult] = clean_bucket
        arguments = [(str(path), str(parts), rules) for path in buckets]
    else:
        task = clean_bucket_in_memory
        arguments = [(str(p), i, handoff, rules) for i, p in enumerate(buckets)]
    done = iter_task_results(
        task, arguments, address=dask_address, scheduler=rules.config.scheduler
    )
    # Each bucket's parts are merged as soon as the buckets before it are done,
    # while the later buckets are being cleaned.
    results = []
    curated_path, quarantine_path = outputs
    with (
        PartMerger(curated_path) as curated,
        PartMerger(quarantine_path) as quarantined,
    ):
        for bucket, (path, result) in enumerate(zip(buckets, done, strict=True)):
            if dask_address:
                kept_part: Path | pa.Table = parts / f"{path.stem}.curated.arrow"
                rejected_part: Path | pa.Table = parts / f"{path.stem}.quarantine.arrow"
            else:
                kept_part, rejected_part = handoff.take(bucket)
            curated.add(kept_part)
            quarantined.add(rejected_part)
            results.append(result)
    return results, curated.rows, quarantined.rows


#: Buckets cleaned in-process whose parts may wait for the merge before a task
#: waits (see :class:`~shopml.clean_merge.PartHandoff`).
_HANDOFF_BUCKETS = 4


def _sum_results(
    table: str, results: list[BucketResult], more_repairs: dict[str, int]
) -> TableReport:
    reasons: dict[str, int] = {}
    repairs: dict[str, int] = {}
    for result in results:
        for key, value in result.reasons.items():
            reasons[key] = reasons.get(key, 0) + value
        for key, value in result.repairs.items():
            repairs[key] = repairs.get(key, 0) + value
    for key, value in more_repairs.items():
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
    result, curated, quarantine = _clean_bucket_tables(bucket_path, rules)
    stem = Path(bucket_path).stem
    write_ipc(curated, Path(parts_dir) / f"{stem}.curated.arrow")
    write_ipc(quarantine, Path(parts_dir) / f"{stem}.quarantine.arrow")
    return result


def clean_bucket_in_memory(
    bucket_path: str, bucket: int, handoff: PartHandoff, rules: BucketRules
) -> BucketResult:
    """Clean one bucket of events; hand its parts to the merge in this process.

    The in-process scheduler's task: like :func:`clean_bucket`, but the curated and
    quarantined tables go to ``handoff`` (as bucket number ``bucket``) instead of
    being written to part files and read back.

    Returns:
        The bucket's counts, reasons and repairs.
    """
    result, curated, quarantine = _clean_bucket_tables(bucket_path, rules)
    handoff.put(bucket, (curated, quarantine))
    return result


def _clean_bucket_tables(
    bucket_path: str, rules: BucketRules
) -> tuple[BucketResult, pa.Table, pa.Table]:
    """Clean one bucket: its counts, curated table and quarantine table."""
    # Pseudonyms stay digests (they sort like their text) until the curated rows.
    raw = read_bucket(Path(bucket_path), digests=True)
    items = read_ipc(Path(rules.items_path)).column("item_id")
    frame, padded, types = _event_frame(raw)
    reasons = RowReasons(raw.num_rows)
    # Distinct items once: for the catalog check and the near-duplicate groups.
    item_ids = pc.dictionary_encode(frame["item_id"])
    _check_rows(raw, frame, reasons, (item_ids, items), types, rules)
    repairs = {"event_type": types.repaired}
    ordered = sort_bucket(frame)
    codes = (group_codes(item_ids), types.codes)
    _check_repeats(frame, ordered, reasons, codes, rules.config)
    masked, mask_repairs = mask_free_text(frame)
    repairs |= mask_repairs | {"whitespace": padded}

    is_bad = ~reasons.is_ok
    bad_rows = np.flatnonzero(is_bad)
    quarantine = quarantine_rows(raw, is_bad, reasons.labels(bad_rows))
    curated = _curate(frame, masked, ordered, reasons.is_ok)
    result = BucketResult(
        rows_in=raw.num_rows,
        rows_kept=curated.num_rows,
        rows_quarantined=quarantine.num_rows,
        reasons=reasons.counts(),
        repairs=repairs,
    )
    return result, curated, quarantine


@dataclass(frozen=True)
class _EventTypes:
    """A bucket's event types, checked once per distinct raw value.

    Attributes:
        codes: per row, the code of its repaired type (equal types, equal codes;
            null -> the number of distinct types), for the near-duplicate groups.
        is_known: per row, whether the repaired type is in the vocabulary.
        repaired: rows whose type trimming or lower-casing turned into a known one.
    """

    codes: np.ndarray
    is_known: np.ndarray
    repaired: int


def _event_frame(raw: pa.Table) -> tuple[dict[str, pa.Array], int, _EventTypes]:
    """Data columns as checked: text trimmed (blank -> null), user_id pseudonymized.

    ``user_id`` is not trimmed here: the pseudonym replaces it (as the digests the
    bucket holds, see :func:`shopml.clean_partition.read_bucket`), and the partition
    pass counts its padded cells. ``event_type`` is repaired (trimmed, lower-cased)
    and checked once per distinct value (a handful), rows take their value's answers.

    Returns:
        ``(columns by name, padded, event types)``: ``padded`` counts the text cells
        that trimming repaired (what :func:`shopml.quality.count_padded` counts),
        user ids aside.
    """
    frame, padded = {}, 0
    types = None
    for name in raw.column_names:
        if name.startswith("_"):
            continue
        source = PSEUDONYM_COLUMN if name == "user_id" else name
        column = raw.column(source).combine_chunks()
        if name == "event_type" and pa.types.is_string(column.type):
            column, types, padded_types = _event_types(column)
            padded += padded_types
        elif pa.types.is_string(column.type):
            column, padded_cells = _trim_text(column)
            padded += padded_cells
        frame[name] = column
    if types is None:
        found = dict(zip(raw.column_names, raw.schema.types, strict=True))
        raise TypeError(
            f"raw events need a string column event_type; found "
            f"{found.get('event_type', 'no such column')}"
        )
    return frame, padded, types


def _trim_text(column: pa.Array) -> tuple[pa.Array, int]:
    """Text trimmed, blank -> null; and the cells trimming repaired (not blank).

    Trimming changes a value exactly when it shortens it, so lengths are compared
    rather than the text.
    """
    trimmed = pc.utf8_trim_whitespace(column)
    length = pc.binary_length(trimmed)
    is_blank = pc.equal(length, 0)
    is_padded = pc.and_not(pc.not_equal(length, pc.binary_length(column)), is_blank)
    padded = int(pc.sum(is_padded).as_py() or 0)
    if pc.any(is_blank).as_py():
        trimmed = pc.if_else(is_blank, pa.scalar(None, pa.string()), trimmed)
    return trimmed, padded


def _event_types(column: pa.Array) -> tuple[pa.Array, _EventTypes, int]:
    """Repaired event types (trimmed, blank -> null, lower case), their checks and
    the padded cells, computed on the distinct raw values.

    Returns:
        ``(repaired column, checks, padded)``.
    """
    encoded = pc.dictionary_encode(column)
    values = encoded.dictionary
    n_values = len(values)
    rows = np.asarray(
        pc.fill_null(encoded.indices, n_values).to_numpy(zero_copy_only=False)
    )
    per_value = np.bincount(rows, minlength=n_values + 1)[:n_values]
    trimmed = pc.utf8_trim_whitespace(values)
    is_blank = pc.equal(trimmed, "")
    is_padded = np.asarray(pc.and_not(pc.not_equal(trimmed, values), is_blank))
    repaired = pc.utf8_lower(
        pc.if_else(is_blank, pa.scalar(None, pa.string()), trimmed)
    )
    is_known = np.asarray(
        pc.is_in(repaired, value_set=pa.array(EVENT_TYPES)), dtype=bool
    )
    is_changed = np.asarray(
        pc.fill_null(pc.not_equal(repaired, values), False), dtype=bool
    )
    # Equal repaired types (" View" and "view") share one code.
    unified = pc.dictionary_encode(repaired)
    codes = pc.fill_null(unified.indices, len(unified.dictionary))
    codes = np.append(
        np.asarray(codes.to_numpy(zero_copy_only=False)), len(unified.dictionary)
    )
    checks = _EventTypes(
        codes=codes[rows].astype(np.int64),
        is_known=np.append(is_known, False)[rows],
        repaired=int(per_value[is_changed & is_known].sum()),
    )
    return repaired.take(encoded.indices), checks, int(per_value[is_padded].sum())


def _check_rows(
    raw: pa.Table,
    frame: dict[str, pa.Array],
    reasons: RowReasons,
    items: tuple[pa.DictionaryArray, pa.ChunkedArray],
    types: _EventTypes,
    rules: BucketRules,
) -> None:
    """The checks that look at one row at a time, in the order reasons are given.

    ``items`` holds the bucket's item ids (dictionary-encoded) and the catalog's;
    ``types`` the event types' checks (see :func:`_event_types`).
    """
    reasons.flag(unparsed_mask(raw, "row"), "unreadable_row")
    for name in ("user_id", "item_id", "event_type"):
        reasons.flag(pc.is_null(frame[name]), f"null_{name}")
    reasons.flag(unparsed_mask(raw, "timestamp"), "bad_timestamp")
    reasons.flag(pc.is_null(frame["timestamp"]), "null_timestamp")
    reasons.flag(unparsed_mask(raw, "value"), "bad_value")

    reasons.flag(~types.is_known, "bad_event_type")

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


def _check_repeats(
    frame: dict[str, pa.Array],
    ordered: BucketSort,
    reasons: RowReasons,
    codes: tuple[np.ndarray, np.ndarray],
    config: CleanConfig,
) -> None:
    """Exact duplicates, near duplicates and bot users, among rows still in play.

    ``codes`` are the rows' item and event type codes (equal values, equal codes).
    """
    # Rows equal in every column share user and timestamp: only tied rows compare.
    is_duplicate = flag_duplicates(
        ordered.keys, reasons.is_ok & ordered.is_tied, ordered.order
    )
    reasons.flag(is_duplicate, "duplicate")

    micros = _micros(frame["timestamp"])
    users = ordered.keys[0]
    keys = [users, *codes]
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
    rows = pa.array(kept)
    arrays = [
        _curated_column(name, columns[name], schema.field(name).type, rows)
        for name in schema.names
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def _curated_column(
    name: str, column: pa.Array, kind: pa.DataType, rows: pa.Array
) -> pa.Array:
    """The kept ``rows`` of a column, typed; pseudonym digests become their text."""
    if name == "user_id" and pa.types.is_fixed_size_binary(column.type):
        return pseudonym_text(column.take(rows))
    return column.cast(kind).take(rows)
