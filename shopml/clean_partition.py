"""Partition of raw events into user buckets, the first step of the events clean.

One streaming pass over the raw Parquet file in record batches, its row groups shared
among ``CleanConfig.partition_threads`` threads (:func:`split_events`, or
:func:`partition_events` for the folders alone): every distinct raw user id of a
batch is trimmed once (the rows whose id trimming repaired are counted here, for the
``whitespace`` repair; the bucket cleaning does not trim user ids again), and every
distinct trimmed id is normalized and pseudonymized once
(:meth:`shopml.security.Pseudonymizer.pseudonymize_many`; later batches of every
thread find it in the bounded :class:`_PseudonymCache` the threads share), and each
row goes to the bucket of its pseudonym (:func:`bucket_of`: a range of its first 32
bits, so all events of a user share a bucket and the buckets, in order, follow the
pseudonym order). A bucket is a folder of Arrow IPC files, one per thread, read back
in raw order with :func:`read_bucket`; :func:`read_ipc` and :func:`write_ipc` are the
IPC file helpers the other clean modules share. :mod:`shopml.clean_events` runs the
whole clean.

What the bucket files carry is kept small, since every row is copied, written and
read again: the pseudonym as its 16 digest bytes (:func:`pseudonym_text` makes the
text when a bucket is read), and no column that holds one value in the whole raw
file (:func:`constant_columns`, from the Parquet statistics: the all-null
``_unparsed_*`` columns of a clean file, its one ``_source_file``), which is
neither decoded nor copied and is rebuilt by :func:`read_bucket`. On 10 M synthetic
events this took the pass from 6.1 to 4.3 CPU s (one thread).

Memory: two record batches per thread (one read ahead,
:func:`shopml.processing.prefetch`) and the ids pseudonymized so far (one cache of two
generations of at most :data:`_CACHE_LIMIT`, recently used ones kept); none grows
with the input.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from itertools import compress
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shopml.clean_rules import strip_blank
from shopml.processing import prefetch
from shopml.security import PSEUDONYM_PREFIX, Pseudonymizer

logger = logging.getLogger(__name__)

#: Rows read per record batch in the partition pass.
BATCH_ROWS = 262_144
#: Threads of the partition pass by default (``CleanConfig.partition_threads``).
PARTITION_THREADS = 2
#: Bookkeeping column of the bucket files: the row's position in the raw file.
POSITION_COLUMN = "_position"
#: Bookkeeping column of the bucket files: the user's pseudonym (null if blank).
PSEUDONYM_COLUMN = "_pseudonym"
#: How the bucket files hold the pseudonym: its digest's 16 bytes (text is twice as
#: long, and the partition pass copies every row's pseudonym twice).
DIGEST_TYPE = pa.binary(16)

# Distinct raw ids per generation of the pseudonym cache (two are held, see
# _PseudonymCache): about 50 MiB, whatever the number of users.
_CACHE_LIMIT = 262_144


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
        self._lock = threading.Lock()

    def lookup(self, raw_ids: pa.Array) -> tuple[pa.Array, np.ndarray]:
        """Pseudonyms and buckets of distinct, non-null raw ids, in their order.

        Thread-safe: the partition threads share one cache, so an id met by
        several threads is pseudonymized once (the work holds the GIL anyway).
        """
        with self._lock:
            return self._lookup(raw_ids)

    def _lookup(self, raw_ids: pa.Array) -> tuple[pa.Array, np.ndarray]:
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
        pseudonyms = pa.nulls(len(new_ids), DIGEST_TYPE)
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
            fresh_digests = pa.array(digests, DIGEST_TYPE)
            pseudonyms = pc.replace_with_mask(
                pseudonyms, pa.array(~is_held), fresh_digests
            )
        self.current.add(new_ids, pseudonyms, buckets)


@dataclass(frozen=True)
class Partition:
    """What :func:`split_events` made.

    Attributes:
        paths: the bucket folders, in bucket order.
        rows: the rows split.
        padded_user_ids: rows whose user id trimming repaired (leading or trailing
            whitespace, not blank): the user ids' share of the ``whitespace``
            repair, which the bucket cleaning does not count again.
    """

    paths: list[Path]
    rows: int
    padded_user_ids: int


def partition_events(
    raw_path: Path,
    bucket_dir: Path,
    n_buckets: int,
    pseudonymizer: Pseudonymizer,
    batch_rows: int = BATCH_ROWS,
    *,
    threads: int = PARTITION_THREADS,
) -> list[Path]:
    """Split raw events into bucket folders; the folders of :func:`split_events`."""
    return split_events(
        raw_path, bucket_dir, n_buckets, pseudonymizer, batch_rows, threads=threads
    ).paths


def split_events(
    raw_path: Path,
    bucket_dir: Path,
    n_buckets: int,
    pseudonymizer: Pseudonymizer,
    batch_rows: int = BATCH_ROWS,
    *,
    threads: int = PARTITION_THREADS,
) -> Partition:
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
        The bucket folders (in bucket order) and the counts. A bucket holds the raw
        columns plus the row's position in the raw file and its pseudonym (null for
        a blank user id).

    Raises:
        ValueError: ``threads`` is below 1.
    """
    if threads < 1:
        raise ValueError(f"partition threads={threads} must be at least 1")
    jobs = _plan_shares(raw_path, threads)
    paths = [bucket_dir / f"bucket-{b:05d}" for b in range(n_buckets)]
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)

    split = partial(
        _partition_share,
        paths=paths,
        cache=_PseudonymCache(pseudonymizer, n_buckets),
        batch_rows=batch_rows,
    )
    rows, padded = _split_shares(jobs, split)
    logger.debug("partitioned %d events into %d buckets", rows, n_buckets)
    return Partition(paths, rows, padded)


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


def _plan_shares(raw_path: Path, threads: int) -> list[_Share]:
    """Share the raw file's row groups, in file order, among up to ``threads`` ways.

    Returns:
        One share per way (at least one; a file without row groups gets one empty
        share), each knowing the raw position of its first row.
    """
    parquet = pq.ParquetFile(raw_path)
    sizes = [
        parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)
    ]
    firsts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    ways = max(1, min(threads, len(sizes)))
    shares = [share.tolist() for share in np.array_split(np.arange(len(sizes)), ways)]
    return [
        _Share(raw_path, groups, int(firsts[groups[0]]) if groups else 0, way)
        for way, groups in enumerate(shares)
    ]


def _split_shares(
    jobs: list[_Share], split: Callable[[_Share], tuple[int, int]]
) -> tuple[int, int]:
    """Split every share, one thread each (this thread for a single share).

    Returns:
        ``(rows, padded user ids)``, over every share.
    """
    if len(jobs) == 1:
        return split(jobs[0])
    with ThreadPoolExecutor(len(jobs), thread_name_prefix="shopml-partition") as pool:
        counts = list(pool.map(split, jobs))
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def _partition_share(
    share: _Share, *, paths: list[Path], cache: _PseudonymCache, batch_rows: int
) -> tuple[int, int]:
    """Split one share of row groups into the buckets.

    Returns:
        ``(rows, padded user ids)`` of the share.
    """
    parquet = pq.ParquetFile(share.raw_path)
    full = parquet.schema_arrow.append(pa.field(POSITION_COLUMN, pa.int64()))
    full = full.append(pa.field(PSEUDONYM_COLUMN, pa.string()))
    # The user id picks the bucket: it is always read.
    constants = constant_columns(parquet, keep=("user_id",))
    read = [n for n in parquet.schema_arrow.names if n not in constants]
    # Pseudonyms travel as their 16 digest bytes (read_bucket writes them as text).
    schema = pa.schema(
        [
            pa.field(n, DIGEST_TYPE) if n == PSEUDONYM_COLUMN else full.field(n)
            for n in full.names
            if n not in constants
        ]
    )
    schema = schema.with_metadata(_bucket_metadata(full, constants))
    n_buckets = len(paths)
    batches = (
        batch
        for group in share.row_groups
        for batch in parquet.iter_batches(
            batch_size=batch_rows, row_groups=[group], columns=read
        )
    )

    with ExitStack() as stack:
        writers = [
            stack.enter_context(pa.ipc.new_file(str(p / f"{share.way}.arrow"), schema))
            for p in paths
        ]
        offset, padded = share.first_row, 0
        # The next batch is read and decoded in a thread while this one is split.
        for batch in prefetch(batches, 1):
            table, buckets, padded_ids = _assign_buckets(batch, offset, cache)
            offset += batch.num_rows
            padded += padded_ids
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
    return offset - share.first_row, padded


def read_bucket(path: Path, *, digests: bool = False) -> pa.Table:
    """The rows of one bucket folder from :func:`partition_events`, in raw order.

    Columns the bucket files leave out because they hold one value in the whole raw
    file (:func:`constant_columns`) are put back, so the table has every raw column.

    Args:
        path: the bucket folder.
        digests: keep the pseudonyms as their 16 digest bytes (``binary(16)``, in
            the order of the text) rather than make their text
            (:func:`pseudonym_text`), for a caller that makes it for fewer rows.
    """
    files = sorted(path.glob("*.arrow"), key=lambda file: int(file.stem))
    if not files:
        raise FileNotFoundError(f"bucket folder {path} holds no <way>.arrow files")
    stored = pa.concat_tables([read_ipc(file) for file in files])
    metadata = stored.schema.metadata or {}
    if _FULL_SCHEMA_KEY not in metadata:
        return stored
    full = pa.ipc.read_schema(
        pa.py_buffer(base64.b64decode(metadata[_FULL_SCHEMA_KEY]))
    )
    constants = json.loads(metadata[_CONSTANTS_KEY])
    rows = stored.num_rows
    columns = []
    if digests:
        full = full.set(
            full.get_field_index(PSEUDONYM_COLUMN),
            pa.field(PSEUDONYM_COLUMN, DIGEST_TYPE),
        )
    for field in full:
        if field.name == PSEUDONYM_COLUMN:
            pseudonyms = stored.column(field.name).combine_chunks()
            columns.append(pseudonyms if digests else pseudonym_text(pseudonyms))
        elif field.name not in constants:
            columns.append(stored.column(field.name))
        elif constants[field.name] is None:
            columns.append(pa.nulls(rows, field.type))
        else:
            columns.append(
                pa.repeat(pa.scalar(constants[field.name], field.type), rows)
            )
    return pa.Table.from_arrays(columns, schema=full)


def _hex_quads() -> np.ndarray:
    """The four hex digits of every two-byte value (as read from memory) as uint32."""
    pairs = np.frombuffer(
        "".join(f"{value:02x}" for value in range(256)).encode(), dtype=np.uint16
    )
    values = np.arange(1 << 16)
    first, second = values & 255, values >> 8
    if sys.byteorder == "big":
        first, second = second, first
    quads = np.empty((1 << 16, 2), dtype=np.uint16)
    quads[:, 0], quads[:, 1] = pairs[first], pairs[second]
    return quads.view(np.uint32).reshape(-1)


# Hex text of two digest bytes at a time: one lookup per two bytes (256 KiB table).
_HEX_QUADS = _hex_quads()


def pseudonym_text(digests: pa.Array) -> pa.Array:
    """Pseudonyms as text (``u_`` + 32 hex digits) from their 16-byte digests.

    Equal to :func:`shopml.security.pseudonym_texts`, for a whole array at once.

    Args:
        digests: a ``binary(16)`` array; nulls stay null.

    Returns:
        A ``string`` array of the same length.
    """
    rows = len(digests)
    is_valid = np.asarray(digests.is_valid().to_numpy(zero_copy_only=False))
    width = digests.type.byte_width
    data = digests.buffers()[1]
    flat = (
        np.frombuffer(data, dtype=np.uint8)
        if data is not None
        else np.empty(0, dtype=np.uint8)
    )
    start = digests.offset * width
    raw = flat[start : start + rows * width].reshape(rows, width)
    if digests.null_count:
        raw = raw[is_valid]
    prefix = np.frombuffer(PSEUDONYM_PREFIX.encode(), dtype=np.uint8)
    length = len(prefix) + 2 * width
    if rows * length > np.iinfo(np.int32).max:
        raise ValueError(
            f"{rows} pseudonyms take {rows * length} bytes of text, over the 2 GiB of "
            "one string array; use smaller buckets (rows_per_bucket)"
        )
    text = np.empty((len(raw), length), dtype=np.uint8)
    text[:, : len(prefix)] = prefix
    pairs = np.ascontiguousarray(raw).view(np.uint16).astype(np.intp)
    text[:, len(prefix) :] = np.take(_HEX_QUADS, pairs).view(np.uint8)
    if digests.null_count:
        lengths = np.where(is_valid, text.shape[1], 0)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
    else:
        offsets = np.arange(rows + 1) * text.shape[1]
    return pa.Array.from_buffers(
        pa.string(),
        rows,
        [
            pa.py_buffer(np.packbits(is_valid, bitorder="little")),
            pa.py_buffer(offsets.astype(np.int32)),
            pa.py_buffer(text.reshape(-1)),
        ],
        null_count=rows - int(is_valid.sum()),
    )


#: Schema metadata of the bucket files: the raw schema, and the columns left out.
_FULL_SCHEMA_KEY = b"shopml.bucket.schema"
_CONSTANTS_KEY = b"shopml.bucket.constants"


def _bucket_metadata(
    full: pa.Schema, constants: dict[str, str | None]
) -> dict[bytes, bytes]:
    """What :func:`read_bucket` needs to put the left-out columns back."""
    return {
        _FULL_SCHEMA_KEY: base64.b64encode(full.serialize().to_pybytes()),
        _CONSTANTS_KEY: json.dumps(constants).encode(),
    }


def constant_columns(
    parquet: pq.ParquetFile, keep: tuple[str, ...] = ()
) -> dict[str, str | None]:
    """Columns with one value in every row of a Parquet file, by its statistics.

    All-null columns of any type (``query`` or the ``_unparsed_*`` columns of a clean
    file, typically) and string columns of one value (``_source_file`` of a single
    source) need not travel through the buckets: :func:`read_bucket` rebuilds them.

    Args:
        parquet: the raw events file.
        keep: columns never reported (the caller reads them whatever they hold).

    Returns:
        Column name -> its value (None for an all-null column). Empty when the file
        has no row groups or lacks statistics.
    """
    metadata = parquet.metadata
    found: dict[str, str | None] = {}
    if metadata.num_row_groups == 0:
        return found
    schema = parquet.schema_arrow
    for index, name in enumerate(schema.names):
        if name in keep:
            continue
        values = {
            _constant_value(metadata, g, index, name)
            for g in range(metadata.num_row_groups)
        }
        if len(values) != 1:
            continue
        (value,) = values
        if value is _NOT_CONSTANT:
            continue
        if value is None or pa.types.is_string(schema.field(name).type):
            found[name] = value  # type: ignore[assignment]
    return found


_NOT_CONSTANT = object()


def _constant_value(
    metadata: pq.FileMetaData, group: int, column: int, name: str
) -> object:
    """The one value of a column chunk (None: all null), or :data:`_NOT_CONSTANT`."""
    row_group = metadata.row_group(group)
    chunk = row_group.column(column)
    stats = chunk.statistics
    # A nested column has several leaves: only flat columns (leaf = field) qualify.
    if chunk.path_in_schema != name or stats is None:
        return _NOT_CONSTANT
    if not stats.has_null_count:
        return _NOT_CONSTANT
    if stats.null_count == row_group.num_rows:
        return None
    if stats.null_count or not stats.has_min_max or not isinstance(stats.min, str):
        return _NOT_CONSTANT
    # Truncated statistics bound the values and so differ; equal ones are exact.
    return stats.min if stats.min == stats.max else _NOT_CONSTANT


def _assign_buckets(
    batch: pa.RecordBatch, offset: int, cache: _PseudonymCache
) -> tuple[pa.Table, np.ndarray, int]:
    """The batch with its positions and pseudonyms, each row's bucket, and the rows
    whose user id trimming repaired (what :func:`shopml.quality.count_padded` counts).

    User ids are trimmed once per distinct raw value, not per row.
    """
    raw = pc.dictionary_encode(batch.column("user_id"))
    values = raw.dictionary
    raw_codes = np.asarray(
        pc.fill_null(raw.indices, len(values)).to_numpy(zero_copy_only=False)
    )
    ids = strip_blank(values)
    is_padded = np.asarray(pc.fill_null(pc.not_equal(ids, values), False), dtype=bool)
    per_value = np.bincount(raw_codes, minlength=len(values) + 1)[: len(values)]
    # Raw values equal once trimmed (" a" and "a") share one id; blank ones have none.
    unique = pc.dictionary_encode(ids)
    n_ids = len(unique.dictionary)
    to_id = pc.fill_null(unique.indices, n_ids).to_numpy(zero_copy_only=False)
    id_codes = np.append(np.asarray(to_id, dtype=np.int64), n_ids)[raw_codes]
    pseudonyms, buckets = cache.lookup(unique.dictionary)
    # Rows with a blank user id go to bucket 0 (they are quarantined there).
    row_buckets = np.append(buckets, 0)[id_codes]
    is_blank = id_codes == n_ids
    row_pseudonyms = pseudonyms.take(
        pa.array(id_codes, mask=is_blank if is_blank.any() else None)
    )

    table = pa.Table.from_batches([batch])
    positions = np.arange(offset, offset + batch.num_rows, dtype=np.int64)
    table = table.append_column(POSITION_COLUMN, pa.array(positions))
    table = table.append_column(PSEUDONYM_COLUMN, row_pseudonyms)
    return table, row_buckets, int(per_value[is_padded].sum())


def read_ipc(path: Path) -> pa.Table:
    """The table of an Arrow IPC file (bucket, part or catalog ids), memory-mapped."""
    # Memory-mapped: the pages are the file's, read when a column is touched.
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def write_ipc(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` as one Arrow IPC file."""
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
