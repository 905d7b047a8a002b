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

Catalog and users are small and cleaned here in memory. Events are streamed and
cleaned in buckets of users as a Dask graph (:mod:`shopml.clean_events`: in-process
by default, on the cluster at ``SHOPML_DASK_ADDRESS`` when set). The bucket and part
files live under ``work_dir`` (``SHOPML_DASK_WORK_DIR``; a temporary folder when
unset). On a Dask cluster the workers read and write those files, so the work dir
must be shared storage: a ReadWriteMany volume (NFS, CephFS, EFS, Filestore)
mounted at the same path in the stage's pod and in every worker; a node-local
folder or a ReadWriteOnce volume makes the workers fail on missing files.

Curated events are sorted by ``user_id``, ``timestamp``, ``item_id``, ``event_type``,
then the other columns; quarantined events follow the user buckets, raw order within
each. Catalog and users are sorted by their id; their quarantine is in raw order.

``rows_in == rows_kept + rows_quarantined`` is checked per table before returning.
The KFP component :func:`clean` wraps the core and adds metrics and an HTML report.
"""

import html
import logging
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from kfp import dsl

from components.common import stage_component
from shopml.clean_events import PARQUET_OPTIONS, clean_events
from shopml.clean_rules import (
    REASONS,
    CleanConfig,
    ReconciliationError,
    RowReasons,
    TableReport,
    quarantine_rows,
    strip_blank,
    unparsed_mask,
)
from shopml.lineage import parquet_dataset, start_run
from shopml.pii import normalize_identifier
from shopml.quality import (
    CheckResult,
    QualityConfig,
    count_padded,
    evaluate_checks,
    quality_summary,
    render_quality_section,
    repair_text,
)
from shopml.schemas import classify_columns, schema_for
from shopml.security import Pseudonymizer

logger = logging.getLogger(__name__)

__all__ = [
    "COLUMN_TRANSFORMS",
    "REASONS",
    "TABLES",
    "CleanConfig",
    "CleanResult",
    "ReconciliationError",
    "TableReport",
    "clean",
    "clean_tables",
    "quarantine_rows",
    "render_report",
]

TABLES: tuple[str, ...] = ("catalog", "events", "users")

#: How curated columns derive from raw ones, recorded as lineage in the curated metadata.
COLUMN_TRANSFORMS: dict[str, str] = {
    "events.user_id": "pseudonymized",
    "events.query": "masked",
    "events.<extra columns>": "masked",
    "users.user_id": "pseudonymized",
    "users.<pii and sensitive columns>": "dropped",
}


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
    *,
    dask_address: str | None = None,
    work_dir: Path | None = None,
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
        dask_address: a Dask scheduler that cleans the event buckets; None cleans
            them in-process (the same graph).
        work_dir: folder under which this run makes a folder of its own for the
            event buckets (removed afterwards); None uses the temporary folder. A
            Dask cluster's workers must see it at the same path (shared storage).

    Returns:
        Counts per table, reasons, repairs and the quality checks.

    Raises:
        FileNotFoundError: events or catalog is missing from ``raw_dir``.
        ReconciliationError: a table's counts do not add up.
    """
    config = config or CleanConfig()
    started = time.monotonic()
    paths = _raw_paths(raw_dir)
    run = start_run("clean", [parquet_dataset(p) for p in sorted(paths.values())])
    curated_dir.mkdir(parents=True, exist_ok=True)
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    splitter = _Splitter(curated_dir, quarantine_dir, pseudonymizer)

    reports = {}
    catalog = pq.read_table(paths["catalog"])
    frame, reasons, repairs = _check_catalog(catalog)
    reports["catalog"] = splitter.split("catalog", catalog, frame, reasons, repairs)
    item_ids = pa.array(frame.loc[reasons.is_ok, "item_id"], pa.string())

    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    # A folder of this run's own, also inside a shared work dir (runs may overlap).
    with tempfile.TemporaryDirectory(prefix="shopml-clean-", dir=work_dir) as tmp:
        reports["events"] = clean_events(
            paths["events"],
            item_ids,
            curated_dir / "events.parquet",
            quarantine_dir / "events.parquet",
            pseudonymizer,
            config=config,
            now=config.now or datetime.now(UTC),
            work_dir=Path(tmp) / "events",
            dask_address=dask_address,
        )

    if "users" in paths:
        users = pq.read_table(paths["users"])
        frame, reasons, repairs = _check_users(users)
        reports["users"] = splitter.split("users", users, frame, reasons, repairs)

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


def _raw_paths(raw_dir: Path) -> dict[str, Path]:
    paths = {}
    for kind in TABLES:
        path = raw_dir / f"{kind}.parquet"
        if path.is_file():
            paths[kind] = path
        elif kind != "users":
            raise FileNotFoundError(
                f"raw table {kind} is missing: {path} does not exist"
            )
    return paths


def _frame(raw: pa.Table) -> pd.DataFrame:
    """The data columns (no bookkeeping) as pandas, ids stripped, blanks as missing."""
    columns = {}
    for name in raw.column_names:
        if name.startswith("_"):
            continue
        column = raw.column(name)
        if pa.types.is_string(column.type):
            column = strip_blank(column)
        columns[name] = column
    frame = pa.table(columns).to_pandas()
    if "user_id" in frame.columns:
        # One person, one id: "Jane@X.com " and "jane@x.com" are the same user.
        ids = frame["user_id"].dropna().unique()
        frame["user_id"] = frame["user_id"].map(
            {u: normalize_identifier(u) for u in ids}
        )
    return frame


def _check_required(reasons: RowReasons, frame: pd.DataFrame, names: list[str]) -> None:
    for name in names:
        reasons.flag(frame[name].isna(), f"null_{name}")


def _check_duplicates(
    reasons: RowReasons, frame: pd.DataFrame, key: str | None
) -> None:
    """Exact duplicates, then (for tables keyed by an id) other rows with a taken id.

    Only rows that passed every earlier check take part, so the row kept is the first
    valid one.
    """
    ok = reasons.is_ok
    repeated = frame[ok].duplicated(keep="first")
    reasons.flag(repeated.reindex(frame.index, fill_value=False), "duplicate")
    if key is not None:
        ok = reasons.is_ok
        taken = frame[ok].duplicated(subset=[key], keep="first")
        reasons.flag(taken.reindex(frame.index, fill_value=False), "duplicate_id")


def _check_catalog(raw: pa.Table) -> tuple[pd.DataFrame, RowReasons, dict[str, int]]:
    frame = _frame(raw)
    reasons = RowReasons(len(frame))
    reasons.flag(unparsed_mask(raw, "row"), "unreadable_row")
    # Entity-encoded titles and control characters are repaired, not rejected.
    frame["title"], text_repairs = repair_text(frame["title"])
    _check_required(reasons, frame, ["item_id", "title"])
    reasons.flag(unparsed_mask(raw, "price"), "bad_price")
    reasons.flag(frame["price"].fillna(0) < 0, "negative_price")
    _check_duplicates(reasons, frame, key="item_id")
    repairs = {f"title_{k}": v for k, v in text_repairs.items()}
    return frame, reasons, repairs | {"whitespace": count_padded(raw)}


def _check_users(raw: pa.Table) -> tuple[pd.DataFrame, RowReasons, dict[str, int]]:
    frame = _frame(raw)
    reasons = RowReasons(len(frame))
    reasons.flag(unparsed_mask(raw, "row"), "unreadable_row")
    _check_required(reasons, frame, ["user_id"])
    _check_duplicates(reasons, frame, key="user_id")
    return frame, reasons, {"whitespace": count_padded(raw)}


class _Splitter:
    """Writes the kept rows of a small table to curated, the rest to quarantine."""

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
        reasons: RowReasons,
        repairs: dict[str, int],
    ) -> TableReport:
        is_bad = ~reasons.is_ok
        labels = reasons.labels(is_bad.nonzero()[0])
        quarantine = quarantine_rows(raw, is_bad, labels)
        target = self.quarantine_dir / f"{kind}.parquet"
        pq.write_table(quarantine, target, **PARQUET_OPTIONS)

        curated = self.curate(kind, frame[~is_bad])
        pq.write_table(curated, self.curated_dir / f"{kind}.parquet", **PARQUET_OPTIONS)

        report = TableReport(
            table=kind,
            rows_in=raw.num_rows,
            rows_kept=curated.num_rows,
            rows_quarantined=quarantine.num_rows,
            reasons=reasons.counts(),
            repairs={k: v for k, v in repairs.items() if v},
        )
        report.check_reconciled()
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

        # Sort on the table's id, then on every other column: one order per content.
        keys = [n for n in _SORT_KEYS[kind] if n in table.column_names]
        keys += [n for n in table.column_names if n not in keys]
        return table.sort_by([(n, "ascending") for n in keys]).replace_schema_metadata(
            None
        )


_CURATED_CLASSES = frozenset({"public", "internal"})
_SORT_KEYS = {"catalog": ["item_id"], "users": ["user_id"]}


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

    ``raw`` holds the refs the ingest stage wrote (or, made by hand, the raw tables
    themselves). Quarantined rows keep raw fields, so they are stored as
    ``quarantine_<table>`` assets in the restricted raw zone and ``quarantine`` holds
    only their refs; ``curated`` holds the pseudonymized, masked tables.

    Quality thresholds come from ``SHOPML_QUALITY_THRESHOLDS`` (JSON, e.g.
    ``{"max_nulls": 0.1}``; see :class:`shopml.quality.QualityConfig`); a breached one
    fails the stage after the report, the metrics and ``quality.json`` are written.
    Event buckets are cleaned on the Dask cluster at ``SHOPML_DASK_ADDRESS`` when set,
    in bucket files under ``SHOPML_DASK_WORK_DIR`` (shared storage on a cluster).
    """
    import tempfile
    from pathlib import Path

    from components.clean import COLUMN_TRANSFORMS, clean_tables, render_report
    from components.ingest import fetch_raw_tables
    from components.store import store_quarantine
    from shopml.assets import asset_store_from_settings, read_refs, write_refs
    from shopml.config import load_settings
    from shopml.logs import configure_logging
    from shopml.quality import (
        enforce_gates,
        quality_config_from_env,
        write_quality_json,
    )
    from shopml.security import load_pseudonymizer

    configure_logging()
    settings = load_settings()
    quality = quality_config_from_env()
    assets = asset_store_from_settings(settings)
    raw_refs = read_refs(Path(raw.path))
    # Raw rows and quarantined rows keep personal data: they stay in scratch space
    # and the restricted raw zone, never in a KFP artifact.
    with tempfile.TemporaryDirectory(prefix="shopml-clean-") as tmp:
        raw_dir = Path(raw.path)
        if raw_refs is not None:
            raw_dir = fetch_raw_tables(raw_refs, assets, Path(tmp) / "raw")
        result = clean_tables(
            raw_dir,
            Path(curated.path),
            Path(tmp) / "quarantine",
            load_pseudonymizer(settings),
            quality=quality,
            dask_address=settings.dask_address,
            work_dir=settings.dask_work_dir,
        )
        stored = store_quarantine(
            Path(tmp) / "quarantine",
            assets,
            producer="kfp:clean",
            inputs=sorted((raw_refs or {}).values()),
        )
    write_refs(Path(quarantine.path), {n: v.ref for n, v in stored.items()})
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
