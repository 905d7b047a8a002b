"""Merge of the cleaned buckets' part files, the last step of the events clean.

:class:`PartMerger` appends Arrow IPC part files, in bucket order, to one Parquet
file in row groups of a fixed size (:data:`ROW_GROUP_ROWS`), so the file depends on
the rows only, not on the number of buckets or on the scheduler; the stage merges
each bucket's parts as soon as the buckets before it are done. :func:`merge_parts`
merges a list of parts in one call. A part is an IPC file (the bucket tasks of a Dask
cluster write them on shared storage) or, with the in-process scheduler, a table
the task handed over through a :class:`PartHandoff` (no file written and read
back). :data:`PARQUET_OPTIONS` are the Parquet options of every file the data stages
write. :mod:`shopml.clean_events` runs the whole clean.

Memory: one row group per output file, and the parts a :class:`PartHandoff` holds
(at most its ``limit`` buckets ahead of the merge, but for the one it waits on).
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shopml.clean_partition import read_ipc

#: Rows per row group of the merged Parquet files.
ROW_GROUP_ROWS = 1_000_000
#: Parquet options of the files the stage writes (fixed: the store versions content).
PARQUET_OPTIONS: dict[str, object] = {"compression": "zstd", "compression_level": 1}


def merge_parts(parts: list[Path], target: Path) -> int:
    """Concatenate part files in order into one Parquet file.

    Row groups hold :data:`ROW_GROUP_ROWS` rows whatever the parts' sizes, so the
    file depends on the rows only. An empty merge still writes the schema.

    Args:
        parts: Arrow IPC part files of one schema, in the order of the file's rows.
        target: the Parquet file to write.

    Returns:
        The rows written.

    Raises:
        ValueError: ``parts`` is empty.
    """
    if not parts:
        raise ValueError(f"no part files to merge into {target}")
    with PartMerger(target) as merger:
        for part in parts:
            merger.add(part)
    return merger.rows


class PartMerger:
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

    def __enter__(self) -> PartMerger:
        return self

    def add(self, part: Path | pa.Table) -> None:
        """Append the rows of one part: an Arrow IPC file, or the table itself."""
        table = part if isinstance(part, pa.Table) else read_ipc(part)
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


class PartHandoff:
    r"""Part tables handed from in-process bucket tasks to the merge, by bucket.

    A task :meth:`put`\ s its bucket's parts; the merge :meth:`take`\ s them in
    bucket order. A task more than ``limit`` buckets ahead of the merge waits (at
    most ``wait_s`` seconds, so a scheduler that starts tasks out of order cannot
    deadlock it), which keeps the tables held bounded; the bucket the merge needs
    next never waits.

    Args:
        limit: buckets held before a later one waits.
        wait_s: longest wait of one :meth:`put`.
    """

    def __init__(self, limit: int, wait_s: float = 30.0) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self._held: dict[int, tuple[pa.Table, ...]] = {}
        self._next = 0
        self._changed = threading.Condition()
        self._token = uuid.uuid4().hex

    def __dask_tokenize__(self) -> str:
        # One token per handoff: Dask names its tasks by their arguments.
        return self._token

    def put(self, bucket: int, parts: tuple[pa.Table, ...]) -> None:
        """Hand over the parts of bucket number ``bucket``."""
        with self._changed:
            self._changed.wait_for(
                lambda: bucket == self._next or len(self._held) < self.limit,
                timeout=self.wait_s,
            )
            self._held[bucket] = parts
            self._changed.notify_all()

    def take(self, bucket: int) -> tuple[pa.Table, ...]:
        """The parts of bucket ``bucket`` (its task is done); the next is awaited.

        Raises:
            KeyError: no task handed bucket ``bucket`` over.
        """
        with self._changed:
            if bucket not in self._held:
                raise KeyError(f"bucket {bucket} has no parts in the handoff")
            parts = self._held.pop(bucket)
            self._next = bucket + 1
            self._changed.notify_all()
        return parts
