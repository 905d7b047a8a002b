"""Data-quality suite of the clean stage: extra checks, repairs, gates and the report.

The clean stage (:mod:`components.clean`) decides, row by row, what is quarantined and
why. This module adds the checks that look at more than one row or repair text, then
turns the per-table counts into **gates**: each check has a threshold on the share of a
table's rows it may reject (:class:`QualityConfig`), and a breached threshold stops the
pipeline with :class:`QualityGateError`, naming the check, the figure and the threshold.

* :func:`flag_duplicates`: rows equal to an earlier row in every column, kept once;
* :func:`flag_near_duplicates`: the same user, item and event type again within a few
  seconds (a double click or a resent event), kept once;
* :func:`flag_bot_users`: users whose busiest minute has far more events than a person
  makes; every event of such a user is quarantined;

These three work on integer codes of the columns (numpy arrays), so they cost a sort
whatever the column types, and see only the rows they are given: the clean stage calls
them per bucket of users, which holds every event of its users.
* :func:`repair_text`: HTML entities decoded and control characters removed from
  catalog text, counted as repairs (a title left empty is then ``null_title``);
* :func:`evaluate_checks`, :func:`enforce_gates`, :func:`quality_summary` and
  :func:`render_quality_report` (HTML with matplotlib plots as base64 PNG).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger(__name__)

#: Check name -> the quarantine reasons (or repairs, for ``catalog_text``) it counts.
CHECKS: dict[str, tuple[str, ...]] = {
    "nulls": ("null_user_id", "null_item_id", "null_event_type", "null_timestamp"),
    "types": ("unreadable_row", "bad_timestamp", "bad_value", "bad_price"),
    "ranges": ("negative_price",),
    "vocabulary": ("bad_event_type",),
    "referential_integrity": ("unknown_item",),
    "duplicates": ("duplicate", "duplicate_id"),
    "near_duplicates": ("near_duplicate",),
    "timestamps": ("future_timestamp", "early_timestamp"),
    "bot_users": ("bot_user",),
    "catalog_text": ("null_title", "title_html_entities", "title_control_chars"),
}

#: Environment variable with threshold overrides as JSON.
THRESHOLDS_ENV = "SHOPML_QUALITY_THRESHOLDS"

_ENTITY = re.compile(r"&(?:#\d+|#x[0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]{1,31});")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class QualityGateError(RuntimeError):
    """A quality check rejected a larger share of a table than its threshold allows."""


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds of the quality gates: the largest share of a table's rows a check may
    reject (or, for ``catalog_text``, touch) before the pipeline stops.

    Attributes:
        max_nulls: required fields missing or blank.
        max_types: unreadable records or values of the wrong type.
        max_ranges: values out of range (a negative price).
        max_vocabulary: event types outside the vocabulary.
        max_referential_integrity: events whose item is not in the catalog.
        max_duplicates: exact duplicate rows and repeated ids.
        max_near_duplicates: the same event again within the near-duplicate window.
        max_timestamps: future or too-early timestamps.
        max_bot_users: events of users flagged as bots.
        max_catalog_text: catalog rows with an empty title, HTML entities or control
            characters (repaired ones included: many of them mean a broken export).
    """

    max_nulls: float = 0.05
    max_types: float = 0.05
    max_ranges: float = 0.01
    max_vocabulary: float = 0.05
    max_referential_integrity: float = 0.05
    max_duplicates: float = 0.10
    max_near_duplicates: float = 0.10
    max_timestamps: float = 0.05
    max_bot_users: float = 0.10
    max_catalog_text: float = 0.20

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(
                    f"QualityConfig.{item.name}={value!r} is not a share; "
                    "use a number from 0.0 to 1.0"
                )

    def threshold(self, check: str) -> float:
        """The threshold of ``check`` (one of :data:`CHECKS`)."""
        return float(getattr(self, f"max_{check}"))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> QualityConfig:
        """Build a config from ``{"max_nulls": 0.1, ...}``; unknown keys are errors.

        Raises:
            ValueError: a key is not a field, or a value is not a share.
        """
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"quality thresholds {unknown} are unknown; use any of {sorted(known)}"
            )
        return cls(**{k: float(v) for k, v in values.items()})


def quality_config_from_env() -> QualityConfig:
    """Thresholds from ``SHOPML_QUALITY_THRESHOLDS`` (JSON), defaults for the rest.

    Raises:
        ValueError: the variable is not a JSON object of known thresholds.
    """
    text = os.environ.get(THRESHOLDS_ENV, "").strip()
    if not text:
        return QualityConfig()
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{THRESHOLDS_ENV}={text!r} is not JSON; use e.g. '{{\"max_nulls\": 0.1}}'"
        ) from err
    if not isinstance(values, dict):
        raise ValueError(f"{THRESHOLDS_ENV}={text!r} must be a JSON object")
    return QualityConfig.from_mapping(values)


@dataclass(frozen=True)
class CheckResult:
    """One check on one table.

    Attributes:
        table: ``events``, ``catalog`` or ``users``.
        check: a name from :data:`CHECKS`.
        rows: rows the check rejected (or touched, for ``catalog_text``).
        rows_in: rows of the table.
        threshold: the largest share allowed.
    """

    table: str
    check: str
    rows: int
    rows_in: int
    threshold: float

    @property
    def share(self) -> float:
        """``rows / rows_in`` (0 for an empty table)."""
        return self.rows / self.rows_in if self.rows_in else 0.0

    @property
    def passed(self) -> bool:
        """Whether the share is within the threshold."""
        return self.share <= self.threshold


class TableCounts(Protocol):
    """What the gates read from a clean stage table report."""

    @property
    def rows_in(self) -> int: ...
    @property
    def reasons(self) -> dict[str, int]: ...
    @property
    def repairs(self) -> dict[str, int]: ...


def pack_keys(keys: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Fold integer sort keys into as few int64 keys as give the same order.

    Consecutive keys are packed into one (``a * span(b) + b``, offsets removed) while
    the product of their spans stays below 2**62; sorting by the packed keys
    lexicographically sorts by the original ones.

    Args:
        keys: integer arrays of one length, most significant first.

    Returns:
        The packed keys, most significant first.
    """
    words: list[np.ndarray] = []
    packed: np.ndarray | None = None
    packed_span = 1
    for key in keys:
        values = np.asarray(key, dtype=np.int64)
        low = int(values.min()) if len(values) else 0
        span = int(values.max()) - low + 1 if len(values) else 1
        if packed is not None and packed_span * span < 2**62:
            packed = packed * span + (values - low)
            packed_span *= span
            continue
        if packed is not None:
            words.append(packed)
        packed, packed_span = values - low, span
    if packed is not None:
        words.append(packed)
    return words


def sort_rows(keys: Sequence[np.ndarray], rows: np.ndarray | None = None) -> np.ndarray:
    """Row positions sorted by ``keys`` (most significant first), ties in row order.

    Args:
        keys: integer arrays over all rows.
        rows: the positions to sort; None sorts every row.

    Returns:
        ``rows`` in sorted order.
    """
    if rows is None:
        rows = np.arange(len(keys[0]) if keys else 0)
        words = pack_keys(keys)
    else:
        words = pack_keys([key[rows] for key in keys])
    if not words or len(rows) < 2:
        return rows
    order = np.argsort(words[0], kind="stable")
    if len(words) > 1:
        order = _break_ties(words, order)
    return rows[order]


def _break_ties(words: Sequence[np.ndarray], order: np.ndarray) -> np.ndarray:
    """Refine ``order`` (sorted by the first word) by the other words, where it ties.

    Rows are rarely equal in the leading columns, so only the runs of equal first
    words are sorted again, by every word; the rest stays as it is.
    """
    lead = words[0][order]
    tied = np.flatnonzero(lead[1:] == lead[:-1])
    if not len(tied):
        return order
    in_run = np.zeros(len(order), dtype=bool)
    in_run[tied] = in_run[tied + 1] = True
    spots = np.flatnonzero(in_run)
    runs = order[spots]
    # np.lexsort's last key leads; it is stable, so ties keep row order.
    order[spots] = runs[np.lexsort([word[runs] for word in words[::-1]])]
    return order


def _same_as_previous(keys: Sequence[np.ndarray], order: np.ndarray) -> np.ndarray:
    """For ``order[1:]``: whether each row equals the row before it in every key."""
    same = np.ones(max(len(order) - 1, 0), dtype=bool)
    for key in keys:
        column = key[order]
        same &= column[1:] == column[:-1]
    return same


def flag_duplicates(
    keys: Sequence[np.ndarray], is_ok: np.ndarray, order: np.ndarray | None = None
) -> np.ndarray:
    """Rows equal in every key to an earlier row still in play (the first is kept).

    Args:
        keys: one integer code array per column (equal values, equal codes; see
            :func:`shopml.clean_events.rank_codes`), all of one length.
        is_ok: rows still in play (earlier checks passed); only they are compared.
        order: every row sorted by ``keys`` with ties in row order
            (:func:`sort_rows`), when the caller has it; None sorts here.

    Returns:
        A boolean array over the rows; of equal rows the one earliest in row order
        is kept.
    """
    flagged = np.zeros(len(is_ok), dtype=bool)
    order = (
        sort_rows(keys, np.flatnonzero(is_ok)) if order is None else order[is_ok[order]]
    )
    if len(order) < 2:
        return flagged
    flagged[order[1:][_same_as_previous(keys, order)]] = True
    return flagged


def flag_near_duplicates(
    keys: Sequence[np.ndarray],
    timestamps_us: np.ndarray,
    is_ok: np.ndarray,
    window_s: float,
    *,
    time_codes: np.ndarray | None = None,
    time_order: np.ndarray | None = None,
) -> np.ndarray:
    """Rows repeating an earlier event of the same key within a window.

    Args:
        keys: integer codes of user, item and event type (one array each).
        timestamps_us: microseconds since 1970 (int64).
        is_ok: rows still in play (earlier checks passed); only they are compared.
        window_s: seconds within which a repeat counts as a near duplicate.
        time_codes: integer codes that sort like ``timestamps_us`` (dense ranks, see
            :func:`shopml.clean_events.rank_codes`); their small range lets the sort
            use one key. None sorts by ``timestamps_us``.
        time_order: every row, listed so that the rows of each key group are in
            time order with ties in row order (e.g. sorted by the first key, then
            time, when the first key is part of every group): the groups are then
            gathered by a stable sort on the keys alone, or, when the listing is
            sorted by the first key and then time, not gathered at all (see
            :func:`_near_in_time_order`). Replaces ``time_codes``.

    Returns:
        A boolean array over the rows. Each row is compared with the previous event
        of its key in time (row order breaks ties); the earliest of a run is kept.
    """
    flagged = np.zeros(len(is_ok), dtype=bool)
    rows = (
        np.flatnonzero(is_ok) if time_order is None else time_order[is_ok[time_order]]
    )
    if window_s <= 0 or len(rows) < 2:
        return flagged
    if time_order is not None:
        near = _near_in_time_order(keys, timestamps_us, rows, window_s * 1e6)
        if near is not None:
            flagged[rows[near]] = True
            return flagged
        order = _stable_sort(keys, rows)
    else:
        times = timestamps_us if time_codes is None else time_codes
        order = sort_rows([*keys, times], rows)

    # A near duplicate has the previous row's key and lies close to it in time.
    same = _same_as_previous(keys, order)
    gaps = np.diff(timestamps_us[order])
    flagged[order[1:][same & (gaps <= window_s * 1e6)]] = True
    return flagged


#: Pairs of rows (same first key, within the window) :func:`_near_in_time_order`
#: compares, per row, before it leaves the rows to a sort instead.
_NEAR_PAIRS_PER_ROW = 4


def _near_in_time_order(
    keys: Sequence[np.ndarray],
    timestamps_us: np.ndarray,
    rows: np.ndarray,
    window: float,
) -> np.ndarray | None:
    """Near duplicates among ``rows`` listed by the first key, then time, unsorted.

    A row repeats an earlier event of its key within ``window`` microseconds when
    some earlier row of the listing with the same first key lies within the window
    and matches the other keys (the latest such row is the previous event of its
    key). Rows ``lag`` places apart are compared for lag 1, 2, ... while any pair
    shares the first key within the window; a pair ``lag + 1`` apart is such a pair
    only if the pair ``lag`` apart is, so each lag compares only the pairs that
    remain. Events are rarely that close, so this costs a few passes over the rows
    instead of a sort (on 10 M synthetic events, 0.35 instead of 0.9 CPU s).

    Returns:
        A boolean mask over ``rows``; None when ``rows`` are not listed by the first
        key and then time, or when too many events lie close together (a sort is
        then cheaper).
    """
    first = keys[0][rows]
    times = timestamps_us[rows]
    same_first = first[1:] == first[:-1]
    if not np.all((first[1:] > first[:-1]) | (same_first & (times[1:] >= times[:-1]))):
        return None
    near = np.zeros(len(rows), dtype=bool)
    # Positions i (in the listing) whose row i - lag is a candidate pair.
    spots = np.flatnonzero(same_first & (np.diff(times) <= window)) + 1
    budget = _NEAR_PAIRS_PER_ROW * len(rows)
    lag = 1
    while len(spots):
        budget -= len(spots)
        if budget < 0:
            return None
        earlier = spots - lag
        same = np.ones(len(spots), dtype=bool)
        for key in keys[1:]:
            same &= key[rows[spots]] == key[rows[earlier]]
        near[spots[same]] = True
        lag += 1
        spots = spots[spots >= lag]
        earlier = spots - lag
        close = first[spots] == first[earlier]
        spots = spots[close & (times[spots] - times[earlier] <= window)]
    return near


def _stable_sort(keys: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """``rows`` sorted by ``keys`` (most significant first), ties in given order."""
    words = pack_keys([key[rows] for key in keys])
    if len(words) == 1:
        return rows[np.argsort(words[0], kind="stable")]
    return rows[np.lexsort(words[::-1])]


def flag_bot_users(
    users: np.ndarray,
    timestamps_us: np.ndarray,
    is_ok: np.ndarray,
    per_minute: int,
    *,
    order: np.ndarray | None = None,
) -> np.ndarray:
    """Events of users whose busiest minute has more than ``per_minute`` events.

    Args:
        users: integer user codes (non-negative).
        timestamps_us: microseconds since 1970 (int64).
        is_ok: rows still in play; only they are counted and flagged.
        per_minute: the most events a person makes in one minute; 0 turns it off.
        order: every row sorted by user, then time (the curated order), when the
            caller has it: the minutes are then counted in one pass, without a sort.

    Returns:
        A boolean array over the rows.
    """
    flagged = np.zeros(len(is_ok), dtype=bool)
    rows = np.flatnonzero(is_ok) if order is None else order[is_ok[order]]
    if per_minute <= 0 or not len(rows):
        return flagged
    minutes = np.floor_divide(timestamps_us[rows], 60_000_000)
    user = users[rows].astype(np.int64)
    if order is None:
        rows_sorted = np.lexsort((minutes, user))
        user, minutes = user[rows_sorted], minutes[rows_sorted]

    # Runs of one (user, minute) are consecutive: a run holds more than per_minute
    # rows when a row and the one per_minute places on share user and minute.
    if len(user) <= per_minute:
        return flagged
    crowded = (user[per_minute:] == user[:-per_minute]) & (
        minutes[per_minute:] == minutes[:-per_minute]
    )
    busy_users = np.unique(user[per_minute:][crowded])
    if not len(busy_users):
        return flagged
    in_play = users[rows]
    top = int(user.max())
    if int(user.min()) >= 0 and top < 4 * len(user) + 1024:
        # Dense codes (dense ranks): a table lookup instead of a set search.
        is_busy = np.zeros(top + 1, dtype=bool)
        is_busy[busy_users] = True
        flagged[rows] = is_busy[in_play]
    else:
        flagged[rows] = np.isin(in_play, busy_users)
    return flagged


def repair_text(values: pd.Series) -> tuple[pd.Series, dict[str, int]]:
    """Decode HTML entities and remove control characters from free text.

    Args:
        values: text (None where missing).

    Returns:
        ``(repaired values, counts)``; counts are ``html_entities`` and
        ``control_chars``, the number of values each repair changed. A value left
        blank becomes None.
    """
    text = pd.Series(values, dtype=object)
    is_text = text.map(lambda v: isinstance(v, str)).to_numpy(dtype=bool)
    has_entity = np.zeros(len(text), dtype=bool)
    has_control = np.zeros(len(text), dtype=bool)
    if is_text.any():
        strings = text[is_text].astype(str)
        has_entity[is_text] = strings.str.contains(_ENTITY).to_numpy(dtype=bool)
        has_control[is_text] = strings.str.contains(_CONTROL).to_numpy(dtype=bool)
    fixed = text.copy()
    for position in np.flatnonzero(has_entity | has_control):
        value = html.unescape(str(text.iloc[position]))
        value = _CONTROL.sub(" ", value)
        value = " ".join(value.split())
        fixed.iloc[position] = value or None
    counts = {
        "html_entities": int(has_entity.sum()),
        "control_chars": int(has_control.sum()),
    }
    return fixed, counts


def count_padded(table: pa.Table) -> int:
    """Number of text cells with leading or trailing whitespace (repaired by trimming).

    Args:
        table: a raw table; bookkeeping columns (``_...``) are skipped.

    Returns:
        The count over every string column.
    """
    total = 0
    for name in table.column_names:
        column = table.column(name)
        if name.startswith("_") or not pa.types.is_string(column.type):
            continue
        trimmed = pc.utf8_trim_whitespace(column)
        changed = pc.and_(pc.not_equal(trimmed, column), pc.not_equal(trimmed, ""))
        total += int(pc.sum(pc.fill_null(changed, False)).as_py() or 0)
    return total


def evaluate_checks(
    tables: Mapping[str, TableCounts], config: QualityConfig | None = None
) -> list[CheckResult]:
    """Every check on every table, with its figure and threshold.

    Args:
        tables: table name -> counts of the clean stage (``rows_in``, ``reasons``,
            ``repairs``).
        config: thresholds; defaults to :class:`QualityConfig`.

    Returns:
        One result per (table, check), in table then check order.
    """
    config = config or QualityConfig()
    results = []
    for table, counts in tables.items():
        tally = dict(counts.reasons) | dict(counts.repairs)
        for check, codes in CHECKS.items():
            rows = sum(int(tally.get(code, 0)) for code in codes)
            results.append(
                CheckResult(table, check, rows, counts.rows_in, config.threshold(check))
            )
    return results


def enforce_gates(results: list[CheckResult]) -> None:
    """Stop the pipeline when a check breached its threshold.

    Raises:
        QualityGateError: names every breached check, its figure and its threshold.
    """
    breached = [r for r in results if not r.passed]
    if not breached:
        logger.info("quality gates passed: %d checks", len(results))
        return
    lines = [
        f"check {r.check!r} on table {r.table}: {r.share:.2%} of rows "
        f"({r.rows} of {r.rows_in}) > threshold {r.threshold:.2%}"
        for r in breached
    ]
    raise QualityGateError(
        "data quality gate failed: "
        + "; ".join(lines)
        + ". Fix the source data or raise the threshold (QualityConfig.max_<check>)."
    )


def quality_summary(results: list[CheckResult]) -> dict[str, Any]:
    """The JSON form of the results: per table, per check figure and verdict."""
    summary: dict[str, Any] = {"passed": all(r.passed for r in results), "tables": {}}
    for r in results:
        table = summary["tables"].setdefault(r.table, {"rows_in": r.rows_in})
        table[r.check] = {
            "rows": r.rows,
            "share": round(r.share, 6),
            "threshold": r.threshold,
            "passed": r.passed,
        }
    return summary


def write_quality_json(results: list[CheckResult], config: QualityConfig) -> str:
    """The results and the thresholds used, as indented JSON text."""
    return json.dumps(
        quality_summary(results) | {"config": asdict(config)}, indent=2, sort_keys=True
    )


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_rows(tables: Mapping[str, TableCounts]) -> str:
    """Kept versus quarantined rows per table, as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(tables)
    quarantined = [sum(tables[n].reasons.values()) for n in names]
    kept = [tables[n].rows_in - q for n, q in zip(names, quarantined, strict=True)]
    figure, axis = plt.subplots(figsize=(6, 2.8))
    axis.barh(names, kept, color="#4c9a2a", label="kept")
    axis.barh(names, quarantined, left=kept, color="#c0392b", label="quarantined")
    axis.set_xlabel("rows")
    axis.legend(loc="lower right")
    try:
        return _png(figure)
    finally:
        plt.close(figure)


def plot_checks(results: list[CheckResult]) -> str:
    """Share of rows per check and table against its threshold, as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.rows or not r.passed]
    labels = [f"{r.table}: {r.check}" for r in shown] or ["no findings"]
    shares = [100 * r.share for r in shown] or [0.0]
    figure, axis = plt.subplots(figsize=(7, 0.4 * len(labels) + 1.2))
    colors = ["#4c9a2a" if r.passed else "#c0392b" for r in shown] or ["#4c9a2a"]
    axis.barh(labels, shares, color=colors)
    for row, r in enumerate(shown):
        axis.plot([100 * r.threshold] * 2, [row - 0.4, row + 0.4], "k--", lw=1)
    axis.set_xlabel("% of table rows (dashed: threshold)")
    try:
        return _png(figure)
    finally:
        plt.close(figure)


def render_quality_section(
    tables: Mapping[str, TableCounts], results: list[CheckResult]
) -> str:
    """The HTML of the gates: a verdict, two plots and the table of checks."""
    verdict = "passed" if all(r.passed for r in results) else "FAILED"
    rows = "".join(
        f"<tr><td>{html.escape(r.table)}</td><td>{html.escape(r.check)}</td>"
        f"<td>{r.rows:,}</td><td>{r.share:.2%}</td><td>{r.threshold:.2%}</td>"
        f"<td>{'ok' if r.passed else 'BREACHED'}</td></tr>"
        for r in results
    )
    return (
        f"<h2>Quality gates: {verdict}</h2>"
        f"<img alt='rows kept and quarantined' "
        f"src='data:image/png;base64,{plot_rows(tables)}'>"
        f"<img alt='checks against thresholds' "
        f"src='data:image/png;base64,{plot_checks(results)}'>"
        "<table><tr><th>table</th><th>check</th><th>rows</th><th>share</th>"
        f"<th>threshold</th><th>verdict</th></tr>{rows}</table>"
    )
