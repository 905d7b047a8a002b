"""Feast objects of shopml, in dependency order: entities, sources, views, services.

Code builds them with ``build_definitions(offline_root, s3_endpoint)`` so the Parquet
location follows the settings (a local folder, or ``s3://bucket/features/offline`` with
an endpoint override for MinIO). The module-level objects at the bottom serve the
Feast CLI (``cd feature_repo && feast apply``) and read ``SHOPML_OFFLINE_ROOT`` and
``FEAST_S3_ENDPOINT_URL`` from the environment.

Every view has ``ttl=timedelta(0)``: Feast then applies no look-back limit in
point-in-time joins and materialization keeps old rows, so MovieLens' 1997-98 events
are still served.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from datetime import timedelta

from feast import (
    Entity,
    FeatureService,
    FeatureView,
    Field,
    FileSource,
    PushSource,
    ValueType,
)
from feast.types import Array, Float64, Int64, String

from feature_repo import (
    ITEM,
    ITEM_COUNT_FEATURES,
    ITEM_FLOAT_FEATURES,
    ITEM_JOIN_KEY,
    ITEM_SEQ,
    ITEM_SEQ_LEN,
    ITEM_STATS,
    ITEM_STRING_FEATURES,
    RECOMMENDER_SERVING,
    RECOMMENDER_TRAINING,
    SEARCH_SERVING,
    SEEN_ITEMS,
    TIMESTAMP_FIELD,
    USER,
    USER_ACTIVITY,
    USER_ACTIVITY_FLOAT_DEFAULTS,
    USER_ACTIVITY_INT_FEATURES,
    USER_JOIN_KEY,
    USER_RECENT_ITEMS,
    USER_RECENT_ITEMS_PUSH,
)

# No expiry: old event data stays valid for joins and online reads.
NO_TTL = timedelta(0)


@dataclass(frozen=True)
class FeatureRepo:
    """Every Feast object of shopml, built for one offline location."""

    user: Entity
    item: Entity
    user_recent_items_source: FileSource
    user_recent_items_push: PushSource
    user_activity_source: FileSource
    item_stats_source: FileSource
    user_recent_items: FeatureView
    user_activity: FeatureView
    item_stats: FeatureView
    recommender_training: FeatureService
    recommender_serving: FeatureService
    search_serving: FeatureService


def offline_table_path(offline_root: str, view: str) -> str:
    """Path of a feature view's offline Parquet table under ``offline_root``."""
    return f"{offline_root.rstrip('/')}/{view}.parquet"


def _file_source(offline_root: str, view: str, s3_endpoint: str | None) -> FileSource:
    """A Parquet source for one view; the endpoint override only matters for s3://."""
    return FileSource(
        name=f"{view}_source",
        path=offline_table_path(offline_root, view),
        timestamp_field=TIMESTAMP_FIELD,
        s3_endpoint_override=s3_endpoint if offline_root.startswith("s3://") else None,
        description=f"offline table of the {view} feature view",
    )


def build_repo(offline_root: str, s3_endpoint: str | None = None) -> FeatureRepo:
    """Build every Feast object of shopml for one offline location.

    Args:
        offline_root: folder (or ``s3://bucket/prefix``) holding ``<view>.parquet``.
        s3_endpoint: S3 endpoint URL with scheme (MinIO), used for ``s3://`` roots.

    Returns:
        The objects, ready for ``FeatureStore.apply``.
    """
    # The shopper; join key is the pseudonym from curated tables, never a raw id.
    user = Entity(
        name=USER,
        join_keys=[USER_JOIN_KEY],
        value_type=ValueType.STRING,
        description="shopper (pseudonym)",
    )
    # A catalog item (product, movie).
    item = Entity(
        name=ITEM,
        join_keys=[ITEM_JOIN_KEY],
        value_type=ValueType.STRING,
        description="catalog item",
    )

    # Sequences as of each event time, one row per user and distinct timestamp.
    recent_source = _file_source(offline_root, USER_RECENT_ITEMS, s3_endpoint)
    # Online-only updates of the sequences from live events (see shopml.features).
    recent_push = PushSource(name=USER_RECENT_ITEMS_PUSH, batch_source=recent_source)
    # Activity snapshot per user, stamped at the snapshot's reference time.
    activity_source = _file_source(offline_root, USER_ACTIVITY, s3_endpoint)
    # Popularity and catalog snapshot per item, stamped at the reference time.
    item_source = _file_source(offline_root, ITEM_STATS, s3_endpoint)

    # The last item ids of a user, newest last: the recommender's input sequence.
    user_recent_items = FeatureView(
        name=USER_RECENT_ITEMS,
        entities=[user],
        ttl=NO_TTL,
        schema=[
            Field(name=ITEM_SEQ, dtype=Array(String)),
            Field(name=ITEM_SEQ_LEN, dtype=Int64),
        ],
        source=recent_push,
        online=True,
        description="last item ids of the user, oldest first, newest last",
    )
    # Event counts per type and window, recency, category breadth and spend level.
    user_activity = FeatureView(
        name=USER_ACTIVITY,
        entities=[user],
        ttl=NO_TTL,
        schema=[Field(name=name, dtype=Int64) for name in USER_ACTIVITY_INT_FEATURES]
        + [Field(name=name, dtype=Float64) for name in USER_ACTIVITY_FLOAT_DEFAULTS]
        + [Field(name=SEEN_ITEMS, dtype=Array(String))],
        source=activity_source,
        online=True,
        description="user event counts in 7d/30d/all windows up to the reference time",
    )
    # Item popularity over windows, conversion, rating, and catalog attributes.
    item_stats = FeatureView(
        name=ITEM_STATS,
        entities=[item],
        ttl=NO_TTL,
        schema=[Field(name=name, dtype=Int64) for name in ITEM_COUNT_FEATURES]
        + [Field(name=name, dtype=Float64) for name in ITEM_FLOAT_FEATURES]
        + [Field(name=name, dtype=String) for name in ITEM_STRING_FEATURES],
        source=item_source,
        online=True,
        description="item popularity, conversion rate, price, category and title",
    )

    # Point-in-time training data for the sequential recommender. Snapshot views are
    # left out: stamped at the reference time, they would make Feast's file offline
    # store drop every training row older than that time.
    recommender_training = FeatureService(
        name=RECOMMENDER_TRAINING, features=[user_recent_items]
    )
    # What the recommender's transformer reads per request.
    recommender_serving = FeatureService(
        name=RECOMMENDER_SERVING, features=[user_recent_items, user_activity]
    )
    # Item attributes and popularity for search re-ranking and result display.
    search_serving = FeatureService(name=SEARCH_SERVING, features=[item_stats])

    return FeatureRepo(
        user,
        item,
        recent_source,
        recent_push,
        activity_source,
        item_source,
        user_recent_items,
        user_activity,
        item_stats,
        recommender_training,
        recommender_serving,
        search_serving,
    )


def build_definitions(
    offline_root: str, s3_endpoint: str | None = None
) -> list[object]:
    """Every Feast object of shopml as a list for ``FeatureStore.apply``.

    Args:
        offline_root: folder (or ``s3://bucket/prefix``) holding ``<view>.parquet``.
        s3_endpoint: S3 endpoint URL with scheme (MinIO), used for ``s3://`` roots.

    Returns:
        Entities, sources, feature views and feature services in dependency order.
    """
    repo = build_repo(offline_root, s3_endpoint)
    return [getattr(repo, field.name) for field in fields(repo)]


# Objects for the Feast CLI, which collects module-level Feast objects of this file.
_cli_repo = build_repo(
    os.environ.get("SHOPML_OFFLINE_ROOT", "data/offline"),
    os.environ.get("FEAST_S3_ENDPOINT_URL") or None,
)
user = _cli_repo.user
item = _cli_repo.item
user_recent_items_source = _cli_repo.user_recent_items_source
user_recent_items_push = _cli_repo.user_recent_items_push
user_activity_source = _cli_repo.user_activity_source
item_stats_source = _cli_repo.item_stats_source
user_recent_items = _cli_repo.user_recent_items
user_activity = _cli_repo.user_activity
item_stats = _cli_repo.item_stats
recommender_training = _cli_repo.recommender_training
recommender_serving = _cli_repo.recommender_serving
search_serving = _cli_repo.search_serving
