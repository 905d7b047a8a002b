"""Data-quality suite of the clean stage: extra checks, repairs, gates and the report.

The clean stage (:mod:`components.clean`) decides, row by row, what is quarantined and
why. This module adds the checks that look at more than one row or repair text, then
turns the per-table counts into **gates**: each check has a threshold on the share of a
table's rows it may reject (:class:`QualityConfig`), and a breached threshold stops the
pipeline with :class:`QualityGateError`, naming the check, the figure and the threshold.

* :func:`flag_near_duplicates`: the same user, item and event type again within a few
  seconds (a double click or a resent event), kept once;
* :func:`flag_bot_users`: users whose busiest minute has far more events than a person
  makes; every event of such a user is quarantined;
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
from collections.abc import Mapping
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


def flag_near_duplicates(
    frame: pd.DataFrame, is_ok: np.ndarray, window_s: float
) -> Any:
    """Rows repeating an earlier event of the same user, item and type within a window.

    Args:
        frame: events with ``user_id``, ``item_id``, ``event_type``, ``timestamp``.
        is_ok: rows still in play (earlier checks passed); only they are compared.
        window_s: seconds within which a repeat counts as a near duplicate.

    Returns:
        A boolean numpy array over ``frame``; the earliest event of a run is kept.
    """
    flagged = np.zeros(len(frame), dtype=bool)
    if window_s <= 0 or not is_ok.any():
        return flagged
    keys = ["user_id", "item_id", "event_type"]
    rows = frame.loc[is_ok, [*keys, "timestamp"]].reset_index()
    rows = rows.sort_values([*keys, "timestamp", "index"], kind="stable")

    # A row is a near duplicate when the previous row has its key and is close in time.
    same_key = np.ones(len(rows), dtype=bool)
    for key in keys:
        column = rows[key].to_numpy()
        same_key[1:] &= column[1:] == column[:-1]
    same_key[0] = False
    gaps = rows["timestamp"].diff().dt.total_seconds().to_numpy()
    is_near = same_key & (np.nan_to_num(gaps, nan=np.inf) <= window_s)
    flagged[rows["index"].to_numpy()[is_near]] = True
    return flagged


def flag_bot_users(frame: pd.DataFrame, is_ok: np.ndarray, per_minute: int) -> Any:
    """Events of users whose busiest minute has more than ``per_minute`` events.

    Args:
        frame: events with ``user_id`` and ``timestamp``.
        is_ok: rows still in play; only they are counted and flagged.
        per_minute: the most events a person makes in one minute; 0 turns it off.

    Returns:
        A boolean numpy array over ``frame``.
    """
    flagged = np.zeros(len(frame), dtype=bool)
    if per_minute <= 0 or not is_ok.any():
        return flagged
    rows = frame.loc[is_ok, ["user_id", "timestamp"]]
    minutes = rows["timestamp"].dt.floor("min")
    busiest = rows.groupby([rows["user_id"], minutes]).size().groupby(level=0).max()
    bots = busiest.index[busiest.to_numpy() > per_minute]
    if len(bots):
        logger.warning(
            "%d user(s) exceed %d events per minute; their events are quarantined",
            len(bots),
            per_minute,
        )
    flagged[is_ok] = rows["user_id"].isin(set(bots)).to_numpy()
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
