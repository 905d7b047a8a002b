"""Features stage: curated events and catalog -> offline feature tables -> Feast online.

The core ``build_features`` computes three feature tables from the curated zone, writes
them as Parquet under the offline root (a local folder or
``s3://<bucket>/features/offline``), applies the Feast definitions of ``feature_repo``
and materializes the online store: the first run over the data's whole time range,
later runs incrementally up to the data's end, so running the stage twice on the
same data changes nothing online; a later run that finds the online store has lost
rows it loaded before (a Redis restarted without persistence) loads everything again.

Tables (one Parquet file per feature view, ``<offline_root>/<view>.parquet``):

* ``user_recent_items``: one row per user and distinct event time with the last
  ``max_seq_len`` item ids up to that time (``(timestamp, item_id)`` order), plus one
  empty-sequence row at the Unix epoch so that point-in-time joins before a user's
  first event return ``[]`` rather than losing the row (Feast's file offline store drops
  entity rows whose every feature row is later than the entity timestamp).
* ``user_activity`` and ``item_stats``: one snapshot row per user / item, with windows
  counted back from the reference time ``as_of`` (the newest event) and stamped at it.

``features`` below is the thin KFP component around the core.
"""

import contextlib
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from kfp import dsl

from components.common import stage_component
from feature_repo import (
    EVENT_TYPES,
    FEATURE_VIEWS,
    ITEM_COUNT_FEATURES,
    ITEM_FLOAT_FEATURES,
    ITEM_JOIN_KEY,
    ITEM_SEQ,
    ITEM_SEQ_LEN,
    ITEM_STATS,
    ITEM_STRING_FEATURES,
    MAX_SEEN_ITEMS,
    SEEN_ITEMS,
    TIMESTAMP_FIELD,
    USER_ACTIVITY,
    USER_ACTIVITY_FLOAT_DEFAULTS,
    USER_ACTIVITY_INT_FEATURES,
    USER_JOIN_KEY,
    USER_RECENT_ITEMS,
    WINDOWS,
)
from shopml.config import Settings

if TYPE_CHECKING:
    from shopml.assets import AssetStore, AssetVersion

logger = logging.getLogger(__name__)

# Owner recorded with every feature table asset.
FEATURES_OWNER = "shopml-features"

# Start of every user's sequence history: an empty sequence holds from here on.
EPOCH = pd.Timestamp(0, unit="s", tz="UTC")
_TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")
_REQUIRED_EVENT_COLUMNS = ("user_id", "item_id", "event_type", "timestamp")
_REQUIRED_CATALOG_COLUMNS = ("item_id", "title")


@dataclass(frozen=True)
class FeatureResult:
    """What the features stage produced.

    Attributes:
        offline_root: folder or ``s3://`` prefix holding ``<view>.parquet``.
        registry: path or URI of the Feast registry.
        online_store: the online store kind (``sqlite`` or ``redis``).
        row_counts: rows written per feature view's offline table.
        n_users: users with at least one event.
        n_items: items in the catalog or seen in events.
        as_of: reference time of the snapshots (the newest event), ISO-8601 UTC.
        materialization: ``full`` on the first run, ``incremental`` afterwards,
            ``refill`` when the online store had lost rows loaded before.
        duration_s: wall-clock seconds of the whole stage.
        assets: feature view -> ``name@version`` of its table in the ``features`` zone.
    """

    offline_root: str
    registry: str
    online_store: str
    row_counts: dict[str, int]
    n_users: int
    n_items: int
    as_of: str
    materialization: str
    duration_s: float = field(default=0.0)
    assets: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        """The result as indented JSON (the stage's ``features.json``)."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging as KFP metrics."""
        figures = {f"rows_{view}": float(n) for view, n in self.row_counts.items()}
        figures.update(
            n_users=float(self.n_users),
            n_items=float(self.n_items),
            duration_s=self.duration_s,
        )
        return figures


def read_curated(curated_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the curated events and catalog tables.

    Args:
        curated_dir: folder with ``events.parquet`` and ``catalog.parquet``.

    Returns:
        ``(events, catalog)`` with timestamps as UTC.

    Raises:
        FileNotFoundError: a table is missing.
        ValueError: a required column is missing or the events table is empty.
    """
    tables = {}
    for name, required in (
        ("events", _REQUIRED_EVENT_COLUMNS),
        ("catalog", _REQUIRED_CATALOG_COLUMNS),
    ):
        path = curated_dir / f"{name}.parquet"
        if not path.is_file():
            raise FileNotFoundError(
                f"curated table {path} is missing; run the clean stage first"
            )
        frame = pd.read_parquet(path)
        missing = [column for column in required if column not in frame.columns]
        if missing:
            raise ValueError(
                f"{path} lacks column(s) {missing}; see docs/architecture.md"
            )
        tables[name] = frame

    events = tables["events"]
    if events.empty:
        raise ValueError(
            f"{curated_dir / 'events.parquet'} has no rows; nothing to featurize"
        )
    events["timestamp"] = pd.to_datetime(events["timestamp"], utc=True)
    return events, tables["catalog"]


def _item_events(events: pd.DataFrame) -> pd.DataFrame:
    """Events that name an item (a search without a clicked item names none)."""
    return events[events["item_id"].notna() & (events["item_id"].astype(str) != "")]


def user_recent_items_table(events: pd.DataFrame, max_seq_len: int) -> pd.DataFrame:
    """Each user's last item ids as of every distinct event time.

    Args:
        events: canonical events; events that name no item are skipped (as in
            ``shopml.sequences``), every event type counts.
        max_seq_len: the most items kept per row.

    Returns:
        Columns ``user_id``, ``item_seq`` (oldest first), ``item_seq_len``,
        ``event_timestamp``; one extra empty row per user at the Unix epoch.

    Raises:
        ValueError: ``max_seq_len`` is below 1.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len={max_seq_len} must be at least 1")
    ordered = _item_events(events)[["user_id", "item_id", "timestamp"]].sort_values(
        ["user_id", "timestamp", "item_id"], kind="stable"
    )

    records: list[tuple[str, list[str], int, pd.Timestamp]] = []
    for user_id, group in ordered.groupby("user_id", sort=True):
        items = group["item_id"].astype(str).tolist()
        times = group["timestamp"].tolist()
        records.append((str(user_id), [], 0, EPOCH))
        for end, timestamp in enumerate(times, start=1):
            # Several events at one time: only the row after the last of them.
            if end < len(times) and times[end] == timestamp:
                continue
            sequence = items[max(0, end - max_seq_len) : end]
            records.append((str(user_id), sequence, len(sequence), timestamp))

    return pd.DataFrame.from_records(
        records, columns=[USER_JOIN_KEY, ITEM_SEQ, ITEM_SEQ_LEN, TIMESTAMP_FIELD]
    )


def _window_counts(events: pd.DataFrame, key: str, as_of: pd.Timestamp) -> pd.DataFrame:
    """Counts per ``key`` of all events and of each event type, for every window."""
    columns: dict[str, pd.Series] = {}
    for window, days in WINDOWS.items():
        in_window = (
            events
            if days is None
            else events[events["timestamp"] > as_of - pd.Timedelta(days=days)]
        )
        columns[f"n_events_{window}"] = in_window.groupby(key).size()
        by_type = in_window.groupby([key, "event_type"]).size().unstack(fill_value=0)
        for event_type in EVENT_TYPES:
            if event_type in by_type.columns:
                columns[f"n_{event_type}_{window}"] = by_type[event_type]
    counts = pd.DataFrame(columns).reindex(events[key].unique())
    return counts.fillna(0).astype("int64")


def user_activity_table(
    events: pd.DataFrame, catalog: pd.DataFrame, as_of: pd.Timestamp
) -> pd.DataFrame:
    """One activity snapshot row per user, windows counted back from ``as_of``.

    Args:
        events: canonical events.
        catalog: canonical catalog (``category`` and ``price`` are used when present).
        as_of: the reference time, normally the newest event.

    Returns:
        ``user_id``, every ``user_activity`` feature and ``event_timestamp`` (= as_of).
    """
    table = _window_counts(events, "user_id", as_of)
    last_event = events.groupby("user_id")["timestamp"].max()
    table["days_since_last_event"] = (as_of - last_event) / pd.Timedelta(days=1)

    # Category breadth and price level of the items each user touched.
    attributes = catalog.reindex(
        columns=["item_id", "category", "price"]
    ).drop_duplicates("item_id")
    touched = events[["user_id", "item_id"]].merge(attributes, on="item_id", how="left")
    table["n_distinct_categories"] = touched.groupby("user_id")["category"].nunique()
    table["avg_price"] = touched.groupby("user_id")["price"].mean()

    table = table.reindex(
        columns=[*USER_ACTIVITY_INT_FEATURES, *USER_ACTIVITY_FLOAT_DEFAULTS]
    )
    table[USER_ACTIVITY_INT_FEATURES] = (
        table[USER_ACTIVITY_INT_FEATURES].fillna(0).astype("int64")
    )
    table["avg_price"] = table["avg_price"].astype("float64")
    table[SEEN_ITEMS] = _seen_items(events).reindex(table.index)
    table[SEEN_ITEMS] = [v if isinstance(v, list) else [] for v in table[SEEN_ITEMS]]
    table[TIMESTAMP_FIELD] = as_of
    return table.rename_axis(USER_JOIN_KEY).reset_index()


def _seen_items(events: pd.DataFrame) -> pd.Series:
    """Each user's distinct item ids, most recent last, at most ``MAX_SEEN_ITEMS``."""
    ordered = _item_events(events).sort_values(["user_id", "timestamp", "item_id"])
    latest = ordered.drop_duplicates(["user_id", "item_id"], keep="last")
    return latest.groupby("user_id")["item_id"].agg(
        lambda items: [str(i) for i in items][-MAX_SEEN_ITEMS:]
    )


def item_stats_table(
    events: pd.DataFrame, catalog: pd.DataFrame, as_of: pd.Timestamp
) -> pd.DataFrame:
    """One popularity and catalog snapshot row per item, windows back from ``as_of``.

    Args:
        events: canonical events.
        catalog: canonical catalog; items never seen in events get zero counts.
        as_of: the reference time, normally the newest event.

    Returns:
        ``item_id``, every ``item_stats`` feature and ``event_timestamp`` (= as_of).
        ``conversion_rate`` (purchases / views) and ``avg_rating`` (mean ``value`` of
        ``rate`` events) are null where there is nothing to divide by.
    """
    item_events = _item_events(events)
    table = _window_counts(item_events, "item_id", as_of)
    table["n_users_all"] = item_events.groupby("item_id")["user_id"].nunique()

    attributes = catalog.reindex(columns=["item_id", *ITEM_STRING_FEATURES, "price"])
    attributes = attributes.drop_duplicates("item_id").set_index("item_id")
    table = table.reindex(table.index.union(attributes.index))
    table[ITEM_COUNT_FEATURES] = (
        table.reindex(columns=ITEM_COUNT_FEATURES).fillna(0).astype("int64")
    )

    views = table["n_view_all"].where(table["n_view_all"] > 0)
    table["conversion_rate"] = table["n_purchase_all"] / views
    rates = item_events[item_events["event_type"] == "rate"]
    if "value" in rates.columns:
        table["avg_rating"] = rates.groupby("item_id")["value"].mean()
    table = table.join(attributes)

    table = table.reindex(
        columns=[*ITEM_COUNT_FEATURES, *ITEM_FLOAT_FEATURES, *ITEM_STRING_FEATURES]
    )
    table[ITEM_FLOAT_FEATURES] = table[ITEM_FLOAT_FEATURES].astype("float64")
    table[TIMESTAMP_FIELD] = as_of
    return table.rename_axis(ITEM_JOIN_KEY).reset_index()


def write_offline_table(frame: pd.DataFrame, path: str, settings: Settings) -> None:
    """Write one feature table as Parquet, locally or to S3 with the endpoint override.

    Args:
        frame: the table; ``event_timestamp`` is stored as ``timestamp[us, UTC]``.
        path: a local path or ``s3://bucket/key``.
        settings: process settings; ``settings.s3`` is required for ``s3://`` paths.

    Raises:
        ValueError: an ``s3://`` path without S3 settings.
    """
    table = pa.Table.from_pandas(frame, preserve_index=False)
    index = table.schema.get_field_index(TIMESTAMP_FIELD)
    table = table.set_column(
        index, TIMESTAMP_FIELD, table[TIMESTAMP_FIELD].cast(_TIMESTAMP_TYPE)
    )

    if not path.startswith("s3://"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return
    if settings.s3 is None:
        raise ValueError(
            f"offline path {path!r} is on S3 but SHOPML_S3_ENDPOINT is not set"
        )

    from pyarrow import fs

    s3 = fs.S3FileSystem(
        access_key=settings.s3.access_key,
        secret_key=settings.s3.secret_key,
        endpoint_override=settings.s3.endpoint_url,
        region=settings.s3.region,
    )
    pq.write_table(table, path.removeprefix("s3://"), filesystem=s3)


def materialize(
    store: Any,
    start: datetime,
    end: datetime,
    online_lost: Callable[[datetime], bool] | None = None,
) -> str:
    """Load the online store: everything in ``[start, end]`` once, then incrementally.

    The registry, not the online store, remembers what was loaded, so an online store
    that lost its rows (a Redis restarted without persistence, a flushed database)
    would never be refilled by incremental runs. ``online_lost`` guards that: given
    the end of the previous materialization, it says whether rows loaded then are
    gone, and if so everything in ``[start, end]`` is loaded again.

    Args:
        store: the ``feast.FeatureStore`` with the views applied.
        start: first event time of the data (used on a full load only).
        end: newest event time of the data (inclusive).
        online_lost: probe of the online store; ``None`` trusts the registry.

    Returns:
        ``full`` when a view had never been materialized, ``refill`` when the online
        store had lost rows, else ``incremental``.
    """
    views = [store.get_feature_view(name) for name in FEATURE_VIEWS]
    ends = [view.most_recent_end_time for view in views]
    if any(previous is None for previous in ends):
        mode = "full"
    elif online_lost is not None and online_lost(min(ends)):
        mode = "refill"
        logger.warning(
            "online store lost rows materialized up to %s: loading everything again",
            min(ends),
        )
    else:
        mode = "incremental"

    # Feast prints progress lines to stdout; keep them out of the stage's output.
    feast_output = io.StringIO()
    with contextlib.redirect_stdout(feast_output):
        if mode == "incremental":
            store.materialize_incremental(end_date=end)
        else:
            store.materialize(start_date=start, end_date=end)
    logger.debug("feast materialize output: %s", feast_output.getvalue().strip())
    return mode


def register_feature_assets(
    tables: dict[str, pd.DataFrame], curated_dir: Path, assets: "AssetStore"
) -> dict[str, "AssetVersion"]:
    """Store each offline feature table as a version in the ``features`` zone.

    Lineage points at the curated versions the store stage listed in
    ``curated_dir/versions.json`` (quarantine left out), so ``shopml assets lineage``
    runs from a feature table back to the raw files. Every column is ``internal``:
    user keys are pseudonyms and no free text reaches a feature table.

    Args:
        tables: feature view name -> its offline table.
        curated_dir: the store stage's folder; without ``versions.json`` (a folder
            of curated files made by hand) the versions have no inputs.
        assets: the asset store.

    Returns:
        Feature view name -> its version, new or unchanged.
    """
    refs_path = curated_dir / "versions.json"
    refs = json.loads(refs_path.read_text()) if refs_path.is_file() else {}
    inputs = sorted(
        ref
        for name, ref in refs.items()
        if name in ("events", "catalog") and isinstance(ref, str)
    )
    versions = {}
    for view, frame in tables.items():
        table = pa.Table.from_pandas(frame, preserve_index=False)
        versions[view] = assets.put_table(
            view,
            "features",
            table,
            owner=FEATURES_OWNER,
            classification=dict.fromkeys(table.column_names, "internal"),
            producer="kfp:features",
            inputs=inputs,
            quality={"rows": table.num_rows},
        )
    return versions


class MaterializationError(RuntimeError):
    """Materialization reported success but the online store lacks what it wrote."""


def sample_users(
    recent_items: pd.DataFrame, sample: int = 20, before: datetime | None = None
) -> list[str]:
    """Users with a non-empty sequence: the first and last ones by pseudonym.

    Args:
        recent_items: a ``user_recent_items`` offline table.
        sample: how many users at most.
        before: only users with a sequence at or before this time (ones an earlier
            materialization up to it has loaded).

    Returns:
        Sorted pseudonyms, deterministic for a table.
    """
    rows = recent_items[recent_items[ITEM_SEQ_LEN] > 0]
    if before is not None:
        cutoff = pd.Timestamp(before)
        cutoff = cutoff.tz_localize("UTC") if cutoff.tzinfo is None else cutoff
        rows = rows[rows[TIMESTAMP_FIELD] <= cutoff]
    users = sorted(rows[USER_JOIN_KEY].unique())
    return sorted(
        set(users[: sample // 2] + users[len(users) - (sample - sample // 2) :])
    )


def missing_online(settings: Settings, users: list[str], max_seq_len: int) -> int:
    """How many of ``users`` have no ``user_recent_items`` sequence online."""
    from shopml.online_features import OnlineFeatureClient

    if not users:
        return 0
    client = OnlineFeatureClient.from_settings(settings, max_seq_len=max_seq_len)
    return sum(1 for seq in client.user_sequences(users) if not seq)


def verify_online(
    settings: Settings, recent_items: pd.DataFrame, max_seq_len: int, sample: int = 20
) -> None:
    """Read a sample of users back from the online store after materialization.

    Some Feast compute engines (the Ray engine of Feast 0.67) swallow failed online
    writes and report success; this read-back turns that into a stage failure. Only
    presence is checked, not equality: events pushed since the batch may have made a
    user's online sequence newer than the offline table.

    Args:
        settings: where the online store is.
        recent_items: the ``user_recent_items`` offline table just materialized.
        max_seq_len: the sequence length the client reads.
        sample: how many users with a non-empty sequence to read back
            (:func:`sample_users`).

    Raises:
        MaterializationError: a sampled user has no sequence online.
    """
    picked = sample_users(recent_items, sample)
    missing = missing_online(settings, picked, max_seq_len)
    if missing:
        raise MaterializationError(
            f"online store holds no {USER_RECENT_ITEMS} row for {missing} of "
            f"{len(picked)} sampled users after materialization with the "
            f"{settings.feast_batch_engine!r} engine: its online writes failed"
        )
    logger.info("online read-back ok users=%d", len(picked))


def build_features(
    curated_dir: Path, settings: Settings, *, max_seq_len: int = 50
) -> FeatureResult:
    """Compute, store and serve shopml's features from the curated zone.

    Args:
        curated_dir: folder with curated ``events.parquet`` and ``catalog.parquet``.
        settings: where the offline tables, registry and online store live.
        max_seq_len: items kept in each ``user_recent_items`` sequence.

    Returns:
        Where everything went and how many rows each table has.

    Raises:
        FileNotFoundError: a curated table is missing.
        ValueError: a curated table is malformed or ``max_seq_len`` is below 1.
    """
    from feature_repo.definitions import build_definitions, offline_table_path
    from shopml.assets import asset_store_from_settings
    from shopml.feast_store import feature_store_from_settings, offline_root

    started = time.monotonic()
    events, catalog = read_curated(curated_dir)
    first, as_of = events["timestamp"].min(), events["timestamp"].max()
    logger.info(
        "features start events=%d items=%d as_of=%s", len(events), len(catalog), as_of
    )

    tables = {
        USER_RECENT_ITEMS: user_recent_items_table(events, max_seq_len),
        USER_ACTIVITY: user_activity_table(events, catalog, as_of),
        ITEM_STATS: item_stats_table(events, catalog, as_of),
    }
    root = offline_root(settings)
    for view, frame in tables.items():
        write_offline_table(frame, offline_table_path(root, view), settings)
        logger.info("wrote feature_view=%s rows=%d to %s", view, len(frame), root)

    versions = register_feature_assets(
        tables, curated_dir, asset_store_from_settings(settings)
    )
    store = feature_store_from_settings(settings)
    endpoint = settings.s3.endpoint_url if settings.s3 else None
    definitions: list[Any] = build_definitions(root, endpoint)
    store.apply(definitions)
    recent = tables[USER_RECENT_ITEMS]

    def online_lost(previous_end: datetime) -> bool:
        users = sample_users(recent, before=previous_end)
        return missing_online(settings, users, max_seq_len) > 0

    mode = materialize(store, first.to_pydatetime(), as_of.to_pydatetime(), online_lost)
    verify_online(settings, recent, max_seq_len)

    result = FeatureResult(
        offline_root=root,
        registry=str(store.config.registry.path),
        online_store=str(store.config.online_store.type),
        row_counts={view: len(frame) for view, frame in tables.items()},
        n_users=int(events["user_id"].nunique()),
        n_items=len(tables[ITEM_STATS]),
        as_of=as_of.isoformat(),
        materialization=mode,
        duration_s=round(time.monotonic() - started, 3),
        assets={view: version.ref for view, version in versions.items()},
    )
    logger.info(
        "features done materialization=%s duration_s=%.1f", mode, result.duration_s
    )
    return result


@stage_component
def features(
    curated: dsl.Input[dsl.Dataset],
    features: dsl.Output[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
    max_seq_len: int = 50,
) -> None:
    """Build the feature tables, apply the Feast definitions and fill the online store.

    Args:
        curated: the clean stage's folder with ``events.parquet`` and
            ``catalog.parquet``.
        features: receives ``features.json`` (offline root, registry, online store kind,
            row counts).
        metrics: row counts per feature view, users, items and duration.
        max_seq_len: items kept in each user's recent-items sequence.
    """
    import os
    from pathlib import Path

    from components.features import build_features
    from shopml.config import load_settings
    from shopml.logs import configure_logging

    configure_logging()
    result = build_features(
        Path(curated.path), load_settings(), max_seq_len=max_seq_len
    )

    os.makedirs(features.path, exist_ok=True)
    with open(
        os.path.join(features.path, "features.json"), "w", encoding="utf-8"
    ) as handle:
        handle.write(result.to_json())
    for name, value in result.metrics().items():
        metrics.log_metric(name, value)
