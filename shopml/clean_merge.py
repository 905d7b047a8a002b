"""Merge of the cleaned buckets' part files, the last step of the events clean.

:class:`PartMerger` appends Arrow IPC part files, in bucket order, to one Parquet
file in row groups of a fixed size (:data:`ROW_GROUP_ROWS`), so the file depends on
the rows only, not on the number of buckets or on the scheduler; the stage merges
each bucket's parts as soon as the buckets before it are done. :func:`merge_parts`
merges a list of parts in one call. :data:`PARQUET_OPTIONS` are the Parquet options
of every file the data stages write. :mod:`shopml.clean_events` runs the whole
clean.

Memory: one row group per output file.
"""

from __future__ import annotations

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

    def add(self, part: Path) -> None:
        """Append the rows of one part file (Arrow IPC)."""
        table = read_ipc(part)
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
