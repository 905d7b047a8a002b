"""What the clean stage checks and how it records it, shared by every table's cleaner.

:data:`REASONS` are the quarantine reason codes, :class:`CleanConfig` the thresholds,
:class:`TableReport` what cleaning one table did, :class:`RowReasons` the first failing
check of every row and :func:`quarantine_rows` the quarantine's row shape. The
cleaners live in :mod:`components.clean` (catalog, users) and
:mod:`shopml.clean_events` (events, streamed in user buckets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shopml.schemas import (
    EVENT_TYPES,
    SOURCE_FILE,
    SOURCE_ROW,
    UNPARSED_PREFIX,
    UNPARSED_ROW,
    to_id_strings,
)

#: Quarantine reasons: a stable code and what it means.
REASONS: dict[str, str] = {
    "unreadable_row": "the record could not be parsed at all (see raw_record)",
    "null_user_id": "user_id is missing or blank",
    "null_item_id": "item_id is missing or blank",
    "null_event_type": "event_type is missing or blank",
    "null_timestamp": "timestamp is missing",
    "null_title": "title is missing or blank",
    "bad_timestamp": "timestamp is neither epoch seconds/milliseconds nor ISO-8601",
    "bad_value": "value is not a number",
    "bad_price": "price is not a number",
    "negative_price": "price is below zero",
    "bad_event_type": f"event_type is not one of {', '.join(EVENT_TYPES)}",
    "future_timestamp": "timestamp lies beyond now plus the tolerance",
    "early_timestamp": "timestamp lies before the configured floor",
    "unknown_item": "item_id is not in the curated catalog",
    "duplicate": "an identical row came earlier (the first one is kept)",
    "duplicate_id": "an earlier row has the same id with other values (it is kept)",
    "near_duplicate": "same user, item and event type again within the near-duplicate "
    "window (the first is kept)",
    "bot_user": "the user's busiest minute has more events than a person makes",
}

_CODES: tuple[str, ...] = tuple(REASONS)


class ReconciliationError(RuntimeError):
    """Rows were lost or invented: rows_in != rows_kept + rows_quarantined."""


@dataclass(frozen=True)
class CleanConfig:
    """Thresholds of the clean stage.

    Attributes:
        timestamp_floor: events before this instant are impossible
            (``early_timestamp``).
        future_tolerance: events later than ``now`` plus this are impossible
            (``future_timestamp``); allows for clock skew between producers.
        now: the reference time; None takes the wall clock when the stage runs.
        near_duplicate_window_s: an event repeating the same user, item and type
            within this many seconds is a ``near_duplicate``; 0 turns it off.
        bot_events_per_minute: a user with more events than this in one minute is a
            ``bot_user`` (all their events); 0 turns it off.
        rows_per_bucket: events are cleaned in buckets of users of about this many
            rows (memory per task grows with it; the output does not depend on it).
            250k rows keep a bucket's working set in the CPU caches: measured on
            2 M events, 250k needs 0.70x the CPU of 1 M-row buckets and 0.93x that
            of 125k, with half the peak memory.
        scheduler: in-process Dask scheduler, ``threads`` or ``sync`` (see
            :mod:`shopml.processing`); a Dask address replaces it. ``threads`` runs
            a bucket per core (the heavy work releases the GIL) at the memory of
            one bucket per core.
        partition_threads: threads of the pass that cuts events into buckets, each
            over its share of the raw file's row groups (at most one per row
            group); 1 cuts them in one thread.
    """

    timestamp_floor: datetime = datetime(1990, 1, 1, tzinfo=UTC)
    future_tolerance: timedelta = timedelta(days=1)
    now: datetime | None = None
    near_duplicate_window_s: float = 2.0
    bot_events_per_minute: int = 60
    rows_per_bucket: int = 250_000
    scheduler: str = "threads"
    partition_threads: int = 2


@dataclass(frozen=True)
class TableReport:
    """What the clean stage did to one table.

    Attributes:
        table: ``events``, ``catalog`` or ``users``.
        rows_in: rows read from the raw folder.
        rows_kept: rows written to the curated table.
        rows_quarantined: rows written to the quarantine table.
        reasons: quarantine reason -> row count.
        repairs: repair -> row count (values fixed in place, rows kept).
    """

    table: str
    rows_in: int
    rows_kept: int
    rows_quarantined: int
    reasons: dict[str, int] = field(default_factory=dict)
    repairs: dict[str, int] = field(default_factory=dict)

    def check_reconciled(self) -> None:
        """Raise unless ``rows_in == rows_kept + rows_quarantined``.

        Raises:
            ReconciliationError: the counts do not add up.
        """
        if self.rows_in != self.rows_kept + self.rows_quarantined:
            raise ReconciliationError(
                f"table {self.table}: rows_in={self.rows_in} but kept="
                f"{self.rows_kept} + quarantined={self.rows_quarantined}; refusing "
                "to publish"
            )


class RowReasons:
    """The first failing check of every row, as small integer codes.

    Args:
        n_rows: rows of the table.
    """

    def __init__(self, n_rows: int) -> None:
        self.codes = np.zeros(n_rows, dtype=np.int8)

    def flag(self, mask: Any, code: str) -> None:
        """Give ``code`` to rows in ``mask`` (booleans, nulls false) without a reason."""
        assert code in REASONS, code
        if len(mask) != len(self.codes):
            raise ValueError(
                f"check {code}: mask of {len(mask)} rows for a table of "
                f"{len(self.codes)} rows"
            )
        if isinstance(mask, pa.ChunkedArray | pa.Array):
            # Most checks flag nothing: a count is cheaper than the mask's copy.
            if not pc.sum(mask).as_py():
                return
            mask = pc.fill_null(mask, False).to_numpy(zero_copy_only=False)
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return
        selected = mask & (self.codes == 0)
        self.codes[selected] = _CODES.index(code) + 1

    @property
    def is_ok(self) -> np.ndarray:
        """Rows that passed every check so far."""
        return np.asarray(self.codes == 0)

    def labels(self, rows: np.ndarray) -> list[str]:
        """The reason codes of ``rows`` (positions of flagged rows), as text."""
        return [_CODES[code - 1] for code in self.codes[rows].tolist()]

    def counts(self) -> dict[str, int]:
        """Reason -> rows, sorted by reason."""
        tally = np.bincount(self.codes, minlength=len(_CODES) + 1)
        found = {_CODES[i - 1]: int(n) for i, n in enumerate(tally) if i and n}
        return dict(sorted(found.items()))


def strip_blank(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Trim whitespace; text left blank becomes null."""
    trimmed = pc.utf8_trim_whitespace(column)
    return pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed)


def unparsed_mask(raw: pa.Table, name: str) -> np.ndarray:
    """Rows whose ``name`` (``row`` for the whole record) could not be read."""
    column = UNPARSED_ROW if name == "row" else UNPARSED_PREFIX + name
    if column not in raw.column_names:
        return np.zeros(raw.num_rows, dtype=bool)
    return np.asarray(raw.column(column).is_valid().to_numpy(zero_copy_only=False))


def quarantine_rows(raw: pa.Table, is_bad: object, reasons: list[str]) -> pa.Table:
    """Rejected rows with every original field as text, their reason and origin.

    Args:
        raw: the raw table.
        is_bad: boolean mask of rejected rows.
        reasons: reason code of each rejected row, in order.

    Returns:
        Data columns as strings (the unparsed original text where a value could not be
        read), then ``raw_record``, ``source_file``, ``source_row``, ``reason``.
    """
    rejected = raw.filter(pa.array(is_bad, pa.bool_()))
    columns: dict[str, pa.Array] = {}
    for name in rejected.column_names:
        if name.startswith("_"):
            continue
        text = to_id_strings(rejected.column(name).combine_chunks())
        unparsed = UNPARSED_PREFIX + name
        if unparsed in rejected.column_names:
            text = pc.coalesce(rejected.column(unparsed).combine_chunks(), text)
        columns[name] = text
    for target, source, kind in (
        ("raw_record", UNPARSED_ROW, pa.string()),
        ("source_file", SOURCE_FILE, pa.string()),
        ("source_row", SOURCE_ROW, pa.int64()),
    ):
        if source in rejected.column_names:
            columns[target] = rejected.column(source).combine_chunks().cast(kind)
        else:
            columns[target] = pa.nulls(rejected.num_rows, kind)
    columns["reason"] = pa.array(reasons, pa.string())
    return pa.table(columns)
