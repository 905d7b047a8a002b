"""Integer codes of a bucket's columns and its curated sort (events clean).

:func:`rank_codes` codes values in their order (dense ranks), :func:`group_codes`
only by equality, :func:`tied_codes` ranks a column among a subset of rows.
:func:`sort_bucket` puts a bucket's rows in the curated order (:data:`SORT_KEYS`,
then every other column of :func:`curated_schema`) and keeps the codes it sorted
by (:class:`BucketSort`), which the duplicate, near-duplicate and bot checks of
:mod:`shopml.quality` reuse. :func:`shopml.clean_events.clean_bucket` uses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shopml.quality import sort_rows
from shopml.schemas import schema_for

#: Columns of the curated sort, before every other column.
SORT_KEYS: tuple[str, ...] = ("user_id", "timestamp", "item_id", "event_type")


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
