"""Clean stage: validate raw tables, quarantine bad rows with a reason, pseudonymize.

The core, :func:`clean_tables`, reads ``events``, ``catalog`` and (optionally) ``users``
from the raw folder written by the ingest stage and splits every row into exactly one
of two places:

* ``curated_dir/<table>.parquet``: canonical, typed, sorted; ``user_id`` holds the
  pseudonym and curated ``users`` keep no ``pii``/``sensitive`` column;
* ``quarantine_dir/<table>.parquet``: every original field as text, the ``reason`` (one
  of :data:`REASONS`, the first check a row fails), and its origin
  (``source_file``, ``source_row``).

User ids are normalized before anything else (emails case-folded, phones in E.164, see
:mod:`shopml.pii`), so duplicates and pseudonyms see one id per person; search queries
and extra event text columns are masked (emails, phones, cards, addresses) in curated
output; :data:`COLUMN_TRANSFORMS` lists these for lineage.

``rows_in == rows_kept + rows_quarantined`` is checked per table before returning.
The KFP component :func:`clean` wraps the core and adds metrics and an HTML report.
"""

import html
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from kfp import dsl

from components.common import stage_component
from shopml.lineage import parquet_dataset, start_run
from shopml.pii import mask_values, normalize_identifier
from shopml.quality import (
    CheckResult,
    QualityConfig,
    count_padded,
    evaluate_checks,
    flag_bot_users,
    flag_near_duplicates,
    quality_summary,
    render_quality_section,
    repair_text,
)
from shopml.schemas import (
    EVENT_TYPES,
    SOURCE_FILE,
    SOURCE_ROW,
    UNPARSED_PREFIX,
    UNPARSED_ROW,
    classify_columns,
    schema_for,
    to_id_strings,
)
from shopml.security import Pseudonymizer

logger = logging.getLogger(__name__)

TABLES: tuple[str, ...] = ("catalog", "events", "users")

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


#: How curated columns derive from raw ones, recorded as lineage in the curated metadata.
COLUMN_TRANSFORMS: dict[str, str] = {
    "events.user_id": "pseudonymized",
    "events.query": "masked",
    "events.<extra columns>": "masked",
    "users.user_id": "pseudonymized",
    "users.<pii and sensitive columns>": "dropped",
}


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
    """

    timestamp_floor: datetime = datetime(1990, 1, 1, tzinfo=UTC)
    future_tolerance: timedelta = timedelta(days=1)
    now: datetime | None = None
    near_duplicate_window_s: float = 2.0
    bot_events_per_minute: int = 60


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


@dataclass(frozen=True)
class CleanResult:
    """Outcome of :func:`clean_tables`.

    Attributes:
        tables: per-table report, for the tables that were present.
        key_id: fingerprint of the pseudonymization key used.
        seconds: duration of the stage.
        checks: the quality gates per table and check (see :mod:`shopml.quality`).
    """

    tables: dict[str, TableReport]
    key_id: str
    seconds: float
    checks: list[CheckResult] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Flat metrics: ``events_rows_kept``, ``events_reason_duplicate``, ..."""
        values: dict[str, float] = {}
        for name, report in self.tables.items():
            values[f"{name}_rows_in"] = float(report.rows_in)
            values[f"{name}_rows_kept"] = float(report.rows_kept)
            values[f"{name}_rows_quarantined"] = float(report.rows_quarantined)
            for reason, count in report.reasons.items():
                values[f"{name}_reason_{reason}"] = float(count)
            for repair, count in report.repairs.items():
                values[f"{name}_repair_{repair}"] = float(count)
        return values


def clean_tables(
    raw_dir: Path,
    curated_dir: Path,
    quarantine_dir: Path,
    pseudonymizer: Pseudonymizer,
    config: CleanConfig | None = None,
    quality: QualityConfig | None = None,
) -> CleanResult:
    """Validate the raw tables and split them into curated and quarantined rows.

    Args:
        raw_dir: holds ``events.parquet`` and ``catalog.parquet`` and, optionally,
            ``users.parquet`` as written by the ingest stage.
        curated_dir: receives the curated tables (created).
        quarantine_dir: receives ``<table>.parquet`` of rejected rows (created), one
            per table present, possibly empty.
        pseudonymizer: maps raw user ids to pseudonyms.
        config: thresholds; defaults to :class:`CleanConfig`.
        quality: thresholds of the quality gates, evaluated into ``checks`` (not
            enforced here: see :func:`shopml.quality.enforce_gates`).

    Returns:
        Counts per table, reasons, repairs and the quality checks.

    Raises:
        FileNotFoundError: events or catalog is missing from ``raw_dir``.
        ReconciliationError: a table's counts do not add up.
    """
    config = config or CleanConfig()
    now = config.now or datetime.now(UTC)
    started = time.monotonic()
    run = start_run(
        "clean", [parquet_dataset(p) for p in sorted(raw_dir.glob("*.parquet"))]
    )
    raw = _read_raw(raw_dir)
    curated_dir.mkdir(parents=True, exist_ok=True)
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    splitter = _Splitter(curated_dir, quarantine_dir, pseudonymizer)

    reports = {}
    frame, reasons, repairs = _check_catalog(raw["catalog"])
    reports["catalog"] = splitter.split(
        "catalog", raw["catalog"], frame, reasons, repairs
    )
    item_ids = set(frame.loc[reasons.isna(), "item_id"])

    frame, reasons, repairs = _check_events(raw["events"], item_ids, config, now)
    reports["events"] = splitter.split("events", raw["events"], frame, reasons, repairs)

    if "users" in raw:
        frame, reasons, repairs = _check_users(raw["users"])
        reports["users"] = splitter.split(
            "users", raw["users"], frame, reasons, repairs
        )

    checks = evaluate_checks(reports, quality)
    result = CleanResult(
        reports, pseudonymizer.key_id, time.monotonic() - started, checks
    )
    run.complete(
        [parquet_dataset(p) for p in sorted(curated_dir.glob("*.parquet"))],
        quality=quality_summary(checks),
    )
    for report in reports.values():
        logger.info(
            "clean table=%s rows_in=%d kept=%d quarantined=%d reasons=%s",
            report.table,
            report.rows_in,
            report.rows_kept,
            report.rows_quarantined,
            report.reasons,
        )
    return result


def _read_raw(raw_dir: Path) -> dict[str, pa.Table]:
    raw = {}
    for kind in TABLES:
        path = raw_dir / f"{kind}.parquet"
        if path.is_file():
            raw[kind] = pq.read_table(path)
        elif kind != "users":
            raise FileNotFoundError(
                f"raw table {kind} is missing: {path} does not exist"
            )
    return raw


def _frame(raw: pa.Table) -> pd.DataFrame:
    """The data columns (no bookkeeping) as pandas, ids stripped, blanks as missing."""
    columns = {}
    for name in raw.column_names:
        if name.startswith("_"):
            continue
        column = raw.column(name)
        if pa.types.is_string(column.type):
            column = _strip_blank(column)
        columns[name] = column
    frame = pa.table(columns).to_pandas()
    if "user_id" in frame.columns:
        # One person, one id: "Jane@X.com " and "jane@x.com" are the same user.
        ids = frame["user_id"].dropna().unique()
        frame["user_id"] = frame["user_id"].map(
            {u: normalize_identifier(u) for u in ids}
        )
    return frame


def _mask_free_text(frame: pd.DataFrame) -> dict[str, int]:
    """Mask personal data in ``query`` and extra event columns in place.

    Returns:
        ``masked_<column>`` -> number of values changed.
    """
    structured = set(schema_for("events").names) - {"query"}
    repairs = {}
    for name in [n for n in frame.columns if n not in structured]:
        before = [v if isinstance(v, str) else None for v in frame[name]]
        after = mask_values(before)
        repairs[f"masked_{name}"] = sum(
            a != b for a, b in zip(after, before, strict=True)
        )
        frame[name] = pd.Series(after, index=frame.index, dtype=object)
    return repairs


def _strip_blank(column: pa.ChunkedArray) -> pa.ChunkedArray:
    trimmed = pc.utf8_trim_whitespace(column)
    return pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed)


class _Reasons:
    """The first failing check of every row."""

    def __init__(self, n_rows: int) -> None:
        self.codes = pd.Series([None] * n_rows, dtype=object)

    def flag(self, mask: pd.Series, code: str) -> None:
        """Give ``code`` to rows in ``mask`` that have no reason yet."""
        assert code in REASONS, code
        self.codes[mask.to_numpy() & self.codes.isna().to_numpy()] = code

    @property
    def is_ok(self) -> pd.Series:
        return self.codes.isna()


def _unparsed(raw: pa.Table, name: str) -> pd.Series:
    column = UNPARSED_ROW if name == "row" else UNPARSED_PREFIX + name
    if column not in raw.column_names:
        return pd.Series([False] * raw.num_rows)
    return pd.Series(raw.column(column).is_valid().to_numpy(zero_copy_only=False))


def _check_required(reasons: _Reasons, frame: pd.DataFrame, names: list[str]) -> None:
    for name in names:
        reasons.flag(frame[name].isna(), f"null_{name}")


def _check_duplicates(reasons: _Reasons, frame: pd.DataFrame, key: str | None) -> None:
    """Exact duplicates, then (for tables keyed by an id) other rows with a taken id.

    Only rows that passed every earlier check take part, so the row kept is the first
    valid one.
    """
    ok = reasons.is_ok.to_numpy()
    repeated = frame[ok].duplicated(keep="first")
    reasons.flag(repeated.reindex(frame.index, fill_value=False), "duplicate")
    if key is not None:
        ok = reasons.is_ok.to_numpy()
        taken = frame[ok].duplicated(subset=[key], keep="first")
        reasons.flag(taken.reindex(frame.index, fill_value=False), "duplicate_id")


def _check_catalog(raw: pa.Table) -> tuple[pd.DataFrame, pd.Series, dict[str, int]]:
    frame = _frame(raw)
    reasons = _Reasons(len(frame))
    reasons.flag(_unparsed(raw, "row"), "unreadable_row")
    # Entity-encoded titles and control characters are repaired, not rejected.
    frame["title"], text_repairs = repair_text(frame["title"])
    _check_required(reasons, frame, ["item_id", "title"])
    reasons.flag(_unparsed(raw, "price"), "bad_price")
    reasons.flag(frame["price"].fillna(0) < 0, "negative_price")
    _check_duplicates(reasons, frame, key="item_id")
    repairs = {f"title_{k}": v for k, v in text_repairs.items()}
    return frame, reasons.codes, repairs | {"whitespace": count_padded(raw)}


def _check_users(raw: pa.Table) -> tuple[pd.DataFrame, pd.Series, dict[str, int]]:
    frame = _frame(raw)
    reasons = _Reasons(len(frame))
    reasons.flag(_unparsed(raw, "row"), "unreadable_row")
    _check_required(reasons, frame, ["user_id"])
    _check_duplicates(reasons, frame, key="user_id")
    return frame, reasons.codes, {"whitespace": count_padded(raw)}


def _check_events(
    raw: pa.Table, item_ids: set[str], config: CleanConfig, now: datetime
) -> tuple[pd.DataFrame, pd.Series, dict[str, int]]:
    frame = _frame(raw)
    reasons = _Reasons(len(frame))
    reasons.flag(_unparsed(raw, "row"), "unreadable_row")
    _check_required(reasons, frame, ["user_id", "item_id", "event_type"])
    reasons.flag(_unparsed(raw, "timestamp"), "bad_timestamp")
    reasons.flag(frame["timestamp"].isna(), "null_timestamp")
    reasons.flag(_unparsed(raw, "value"), "bad_value")

    # Repair case and whitespace of event types before checking the vocabulary.
    original = raw.column("event_type")
    lowered = pc.utf8_lower(_strip_blank(original))
    is_changed = pc.fill_null(pc.not_equal(lowered, original), False).to_numpy()
    frame["event_type"] = lowered.to_pandas()
    is_known = frame["event_type"].isin(EVENT_TYPES)
    reasons.flag(~is_known, "bad_event_type")
    repairs = {"event_type": int((is_changed & is_known.to_numpy()).sum())}

    latest = pd.Timestamp(now + config.future_tolerance)
    reasons.flag(frame["timestamp"] > latest, "future_timestamp")
    reasons.flag(
        frame["timestamp"] < pd.Timestamp(config.timestamp_floor), "early_timestamp"
    )
    reasons.flag(~frame["item_id"].isin(item_ids), "unknown_item")
    _check_duplicates(reasons, frame, key=None)
    window = config.near_duplicate_window_s
    is_near = flag_near_duplicates(frame, reasons.is_ok.to_numpy(), window)
    reasons.flag(pd.Series(is_near), "near_duplicate")
    is_bot = flag_bot_users(
        frame, reasons.is_ok.to_numpy(), config.bot_events_per_minute
    )
    reasons.flag(pd.Series(is_bot), "bot_user")
    repairs["whitespace"] = count_padded(raw)
    repairs |= _mask_free_text(frame)
    return frame, reasons.codes, repairs


class _Splitter:
    """Writes the kept rows to the curated folder and the rest to quarantine."""

    def __init__(
        self, curated_dir: Path, quarantine_dir: Path, pseudo: Pseudonymizer
    ) -> None:
        self.curated_dir = curated_dir
        self.quarantine_dir = quarantine_dir
        self.pseudo = pseudo

    def split(
        self,
        kind: str,
        raw: pa.Table,
        frame: pd.DataFrame,
        reasons: pd.Series,
        repairs: dict[str, int],
    ) -> TableReport:
        is_bad = reasons.notna().to_numpy()
        quarantine = quarantine_rows(raw, is_bad, reasons[is_bad].tolist())
        pq.write_table(quarantine, self.quarantine_dir / f"{kind}.parquet")

        curated = self.curate(kind, frame[~is_bad])
        pq.write_table(curated, self.curated_dir / f"{kind}.parquet")

        report = TableReport(
            table=kind,
            rows_in=raw.num_rows,
            rows_kept=curated.num_rows,
            rows_quarantined=quarantine.num_rows,
            reasons={
                str(k): int(v) for k, v in reasons.value_counts().sort_index().items()
            },
            repairs={k: v for k, v in repairs.items() if v},
        )
        if report.rows_in != report.rows_kept + report.rows_quarantined:
            raise ReconciliationError(
                f"table {kind}: rows_in={report.rows_in} but kept={report.rows_kept} + "
                f"quarantined={report.rows_quarantined}; refusing to publish"
            )
        return report

    def curate(self, kind: str, kept: pd.DataFrame) -> pa.Table:
        """Typed, pseudonymized, policy-filtered and sorted curated table."""
        kept = kept.copy()
        if "user_id" in kept.columns:
            pseudonyms = {
                u: self.pseudo.pseudonymize(u) for u in kept["user_id"].unique()
            }
            kept["user_id"] = kept["user_id"].map(pseudonyms)

        canonical = schema_for(kind)
        extras = [n for n in kept.columns if n not in canonical.names]
        schema = pa.schema(list(canonical) + [pa.field(n, pa.string()) for n in extras])
        table = pa.Table.from_pandas(kept, schema=schema, preserve_index=False)

        if kind == "users":
            classes = classify_columns(kind, table.column_names, curated=True)
            allowed = [n for n in table.column_names if classes[n] in _CURATED_CLASSES]
            table = table.select(allowed)

        # Sort on the table's keys, then on every other column: one order per content.
        keys = [n for n in _SORT_KEYS[kind] if n in table.column_names]
        keys += [n for n in table.column_names if n not in keys]
        return table.sort_by([(n, "ascending") for n in keys]).replace_schema_metadata(
            None
        )


_CURATED_CLASSES = frozenset({"public", "internal"})
_SORT_KEYS = {
    "events": ["user_id", "timestamp", "item_id", "event_type"],
    "catalog": ["item_id"],
    "users": ["user_id"],
}


def quarantine_rows(raw: pa.Table, is_bad: object, reasons: list[str]) -> pa.Table:
    """Rejected rows with every original field as text, their reason and origin.

    Args:
        raw: the raw table.
        is_bad: boolean mask of rejected rows.
        reasons: reason code of each rejected row, in order.

    Returns:
        Data columns as strings (the unparsed original text where a value could not be
        read), then ``raw_record``, ``reason``, ``source_file``, ``source_row``.
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


_STYLE = (
    "body{font-family:sans-serif;margin:2em}"
    "table{border-collapse:collapse;margin-bottom:1.5em}"
    "td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}"
)


def _html_table(headers: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def render_report(result: CleanResult, checks: list[CheckResult] | None = None) -> str:
    """A self-contained HTML page with counts, reasons and repairs per table.

    Args:
        result: the outcome of :func:`clean_tables`.
        checks: the quality gates' results; when given, the page shows them with
            plots (see :func:`shopml.quality.render_quality_section`).

    Returns:
        The HTML text.
    """
    reports = list(result.tables.values())
    counts = [
        [
            r.table,
            r.rows_in,
            r.rows_kept,
            r.rows_quarantined,
            f"{100.0 * r.rows_quarantined / r.rows_in if r.rows_in else 0.0:.2f}",
        ]
        for r in reports
    ]
    reasons = [
        [r.table, k, REASONS[k], n] for r in reports for k, n in r.reasons.items()
    ]
    repairs = [[r.table, k, n] for r in reports for k, n in r.repairs.items()]
    return "\n".join(
        [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            f"<title>shopml data quality</title><style>{_STYLE}</style></head><body>",
            "<h1>Data quality: clean stage</h1>",
            f"<p>Pseudonymization key id {html.escape(result.key_id)}; "
            f"{result.seconds:.1f} s.</p>",
            _html_table(
                ["table", "rows in", "kept", "quarantined", "quarantined %"], counts
            ),
            "<h2>Quarantine reasons</h2>",
            _html_table(["table", "reason", "meaning", "rows"], reasons),
            "<h2>Repairs (rows kept, values fixed)</h2>",
            _html_table(["table", "field", "rows"], repairs),
            render_quality_section(result.tables, checks) if checks else "",
            "</body></html>",
        ]
    )


@stage_component
def clean(
    raw: dsl.Input[dsl.Dataset],
    curated: dsl.Output[dsl.Dataset],
    quarantine: dsl.Output[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.HTML],
) -> None:
    """Validate raw tables into curated and quarantined datasets, with a report.

    Quality thresholds come from ``SHOPML_QUALITY_THRESHOLDS`` (JSON, e.g.
    ``{"max_nulls": 0.1}``; see :class:`shopml.quality.QualityConfig`); a breached one
    fails the stage after the report, the metrics and ``quality.json`` are written.
    """
    from pathlib import Path

    from components.clean import COLUMN_TRANSFORMS, clean_tables, render_report
    from shopml.config import load_settings
    from shopml.logs import configure_logging
    from shopml.quality import (
        enforce_gates,
        quality_config_from_env,
        write_quality_json,
    )
    from shopml.security import load_pseudonymizer

    configure_logging()
    quality = quality_config_from_env()
    result = clean_tables(
        Path(raw.path),
        Path(curated.path),
        Path(quarantine.path),
        load_pseudonymizer(load_settings()),
        quality=quality,
    )
    checks = result.checks
    for name, value in result.metrics().items():
        metrics.log_metric(name, value)
    for check in checks:
        metrics.log_metric(f"{check.table}_check_{check.check}", check.share)
    (Path(curated.path) / "quality.json").write_text(
        write_quality_json(checks, quality), encoding="utf-8"
    )
    curated.metadata.update({k: r.rows_kept for k, r in result.tables.items()})
    curated.metadata["key_id"] = result.key_id
    curated.metadata["column_transforms"] = COLUMN_TRANSFORMS
    curated.metadata["inputs"] = raw.metadata.get("inputs", [])
    quarantine.metadata.update(
        {k: r.rows_quarantined for k, r in result.tables.items()}
    )
    Path(report.path).write_text(render_report(result, checks), encoding="utf-8")
    enforce_gates(checks)
