"""Feast feature store of shopml: building it from settings, and the online client.

``feature_store_from_settings`` builds a ``feast.FeatureStore`` in Python (no
``feature_store.yaml``): the registry and SQLite online store live in
``settings.feast_dir`` on local runs; a cluster keeps the registry in S3/MinIO and the
online store in Redis. ``OnlineFeatureClient`` is what the model servers call: it reads
a user's recent items and activity counts and turns every way the online store can fail
into ``FeatureStoreUnavailable``, so a server can fall back on popularity.

Feast is imported lazily (``import feast`` takes seconds), so importing this module is
cheap.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from feature_repo import (
    ITEM_SEQ,
    ITEM_SEQ_LEN,
    PROJECT,
    TIMESTAMP_FIELD,
    USER_ACTIVITY,
    USER_ACTIVITY_FLOAT_DEFAULTS,
    USER_ACTIVITY_INT_FEATURES,
    USER_JOIN_KEY,
    USER_RECENT_ITEMS,
    USER_RECENT_ITEMS_PUSH,
)
from shopml.config import Settings

if TYPE_CHECKING:
    import feast
    import pandas as pd

logger = logging.getLogger(__name__)

# Seconds a Redis read may block (connect and each command) before we give up.
REDIS_TIMEOUT_S = 1.0
# Seconds a reader trusts its cached copy of the registry before reloading it.
REGISTRY_CACHE_TTL_S = 60


class FeatureStoreUnavailable(Exception):  # noqa: N818 - name fixed by the serving API
    """The online store cannot be reached, timed out, or holds no applied feature views.

    The original error is kept as ``__cause__``. Callers are expected to degrade (for
    example rank by popularity) rather than fail the request.
    """


def offline_root(settings: Settings) -> str:
    """Where the offline feature tables (Parquet) live for these settings.

    Args:
        settings: process settings.

    Returns:
        ``s3://<bucket>/features/offline`` when S3 is configured, otherwise the local
        folder ``<store_root>/features/offline`` as an absolute path.
    """
    if settings.s3 is not None:
        return f"s3://{settings.s3.bucket}/features/offline"
    return str(settings.store_root / "features" / "offline")


def redis_connection_string(redis_url: str) -> str:
    """Turn ``redis://[user:password@]host:port/db`` into a Feast connection string.

    Args:
        redis_url: the URL, scheme ``redis`` or ``rediss`` (TLS).

    Returns:
        ``host:port,db=N`` plus TLS, credentials, short socket timeouts and no
        retries, so that a dead server fails fast instead of hanging a request.

    Raises:
        ValueError: the URL has another scheme, no host, or a database that is not an
            integer.
    """
    parts = urlsplit(redis_url)
    if parts.scheme not in {"redis", "rediss"} or not parts.hostname:
        raise ValueError(
            f"redis_url={redis_url!r} is not a Redis URL; expected redis://host:port/db"
        )
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise ValueError(
            f"redis_url database {db_text!r} is not an integer (in {parts.path!r})"
        )

    fields = [f"{parts.hostname}:{parts.port or 6379}", f"db={int(db_text)}"]
    if parts.scheme == "rediss":
        fields.append("ssl=true")
    if parts.username:
        fields.append(f"username={unquote(parts.username)}")
    if parts.password:
        fields.append(f"password={unquote(parts.password)}")
    fields.append(f"socket_timeout={REDIS_TIMEOUT_S}")
    fields.append(f"socket_connect_timeout={REDIS_TIMEOUT_S}")
    # No client-side retries: redis-py's default backs off for up to ~7 s on a dead
    # server; callers fall back at once and the next request tries again.
    fields.append("retry=null")
    return ",".join(fields)


def _registry_config(settings: Settings) -> dict[str, Any]:
    """Registry in S3 when configured (via ``FEAST_S3_ENDPOINT_URL``), else local."""
    if settings.s3 is None:
        path = str(settings.feast_dir / "registry.db")
    else:
        # Feast's S3 registry store builds its boto3 client from the environment.
        current = os.environ.get("FEAST_S3_ENDPOINT_URL")
        if current and current != settings.s3.endpoint_url:
            logger.warning(
                "FEAST_S3_ENDPOINT_URL=%s differs from the configured S3 endpoint; "
                "using %s",
                current,
                settings.s3.endpoint_url,
            )
        os.environ["FEAST_S3_ENDPOINT_URL"] = settings.s3.endpoint_url
        os.environ.setdefault("AWS_ACCESS_KEY_ID", settings.s3.access_key)
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", settings.s3.secret_key)
        os.environ.setdefault("AWS_DEFAULT_REGION", settings.s3.region)
        path = f"s3://{settings.s3.bucket}/feast/registry.pb"
    return {
        "registry_type": "file",
        "path": path,
        "cache_ttl_seconds": REGISTRY_CACHE_TTL_S,
    }


def _online_store_config(settings: Settings) -> dict[str, Any]:
    """Redis when ``settings.redis_url`` is set, else SQLite in ``feast_dir``."""
    if settings.redis_url:
        return {
            "type": "redis",
            "connection_string": redis_connection_string(settings.redis_url),
        }
    return {"type": "sqlite", "path": str(settings.feast_dir / "online.db")}


def feature_store_from_settings(settings: Settings) -> feast.FeatureStore:
    """Build the shopml feature store (project ``shopml``) from settings.

    Args:
        settings: process settings. ``s3`` moves the registry to
            ``s3://<bucket>/feast/registry.pb``; ``redis_url`` selects the Redis online
            store. The offline store is always ``file`` (Parquet read with Dask).

    Returns:
        A ``feast.FeatureStore``; nothing is applied or contacted yet.

    Raises:
        ValueError: ``settings.redis_url`` is not a usable Redis URL.
    """
    from feast import FeatureStore, RepoConfig

    settings.feast_dir.mkdir(parents=True, exist_ok=True)
    config = RepoConfig(
        project=PROJECT,
        provider="local",
        registry=_registry_config(settings),
        online_store=_online_store_config(settings),
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
        repo_path=settings.feast_dir,
    )
    logger.debug(
        "feature store: registry=%s online_store=%s",
        config.registry.path,
        config.online_store.type,
    )
    return FeatureStore(repo_path=str(settings.feast_dir), config=config)


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the online store cannot serve, whatever its backend."""
    from feast.errors import FeastObjectNotFoundException
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (
        RedisConnectionError,
        RedisTimeoutError,
        sqlite3.Error,  # SQLite file or table missing: nothing materialized yet
        FeastObjectNotFoundException,  # feature view or service never applied
        OSError,  # sockets, files, registry download
    )


class OnlineFeatureClient:
    """Reads online features of users for the model servers.

    Args:
        store: the feature store, usually from ``feature_store_from_settings``.
        max_seq_len: the most recent items returned per user.

    Raises:
        ValueError: ``max_seq_len`` is below 1.
    """

    def __init__(self, store: feast.FeatureStore, *, max_seq_len: int = 50) -> None:
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len={max_seq_len} must be at least 1")
        self.store = store
        self.max_seq_len = max_seq_len

    @classmethod
    def from_settings(
        cls, settings: Settings, *, max_seq_len: int = 50
    ) -> OnlineFeatureClient:
        """Build the client on the feature store that ``settings`` describe.

        Args:
            settings: process settings (see ``feature_store_from_settings``).
            max_seq_len: the most recent items returned per user.

        Returns:
            The client.
        """
        return cls(feature_store_from_settings(settings), max_seq_len=max_seq_len)

    def user_sequence(self, user_id: str) -> list[str]:
        """The user's most recent item ids, oldest first and newest last.

        Args:
            user_id: the user's pseudonym (as in curated tables).

        Returns:
            At most ``max_seq_len`` item ids; ``[]`` for a user the store does not know.

        Raises:
            FeatureStoreUnavailable: the online store cannot be read.
        """
        return self.user_sequences([user_id])[0]

    def user_sequences(self, user_ids: list[str]) -> list[list[str]]:
        """The recent item ids of several users, read in one online request.

        Args:
            user_ids: pseudonyms; duplicates and unknown users are allowed.

        Returns:
            One list per user id, in the order given; ``[]`` for unknown users.

        Raises:
            FeatureStoreUnavailable: the online store cannot be read.
        """
        if not user_ids:
            return []
        rows = self._read([f"{USER_RECENT_ITEMS}:{ITEM_SEQ}"], user_ids)
        sequences = []
        for value in rows[ITEM_SEQ]:
            items = [str(item) for item in (value or [])]
            sequences.append(items[-self.max_seq_len :])
        return sequences

    def user_activity(self, user_id: str) -> dict[str, float | int]:
        """The user's activity features: event counts per window, recency, prices.

        Args:
            user_id: the user's pseudonym.

        Returns:
            Every feature of the ``user_activity`` view; a missing value (unknown user,
            no prices) is replaced by its default: 0 for counts, -1.0 for
            ``days_since_last_event``, 0.0 for ``avg_price``.

        Raises:
            FeatureStoreUnavailable: the online store cannot be read.
        """
        names = [*USER_ACTIVITY_INT_FEATURES, *USER_ACTIVITY_FLOAT_DEFAULTS]
        rows = self._read([f"{USER_ACTIVITY}:{name}" for name in names], [user_id])

        activity: dict[str, float | int] = {}
        for name in USER_ACTIVITY_INT_FEATURES:
            value = rows[name][0]
            activity[name] = 0 if _is_missing(value) else int(value)
        for name, default in USER_ACTIVITY_FLOAT_DEFAULTS.items():
            value = rows[name][0]
            activity[name] = default if _is_missing(value) else float(value)
        return activity

    def _read(self, features: list[str], user_ids: list[str]) -> dict[str, list[Any]]:
        """One ``get_online_features`` call, with store failures mapped to ours."""
        try:
            response = self.store.get_online_features(
                features=features,
                entity_rows=[{USER_JOIN_KEY: user_id} for user_id in user_ids],
            )
            return dict(response.to_dict())
        except _unavailable_errors() as err:
            raise FeatureStoreUnavailable(
                f"online store cannot serve {features[0].split(':')[0]} for "
                f"{len(user_ids)} user(s): {type(err).__name__}: {err}"
            ) from err


def _is_missing(value: Any) -> bool:
    """A feature value the store did not have (None) or stored as missing (NaN)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def push_events(
    store: feast.FeatureStore, events: pd.DataFrame, max_seq_len: int = 50
) -> int:
    """Append new events to the users' online sequences through the push source.

    The users' current sequences are read from the online store, the new items are
    appended in ``(timestamp, item_id)`` order, the result is cut to the newest
    ``max_seq_len`` items and pushed online only (the offline table is rebuilt by the
    features stage). Events must be newer than what is online: the Redis store ignores
    writes older than the value it holds.

    Args:
        store: the feature store with ``user_recent_items`` applied.
        events: canonical events with at least ``user_id`` (pseudonym), ``item_id`` and
            ``timestamp`` (UTC).
        max_seq_len: the most recent items kept per user.

    Returns:
        The number of users whose sequence was pushed.

    Raises:
        ValueError: a required column is missing or ``max_seq_len`` is below 1.
        FeatureStoreUnavailable: the online store cannot be read or written.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len={max_seq_len} must be at least 1")
    missing = {"user_id", "item_id", "timestamp"} - set(events.columns)
    if missing:
        raise ValueError(
            f"events lack column(s) {sorted(missing)}; canonical events needed"
        )
    if events.empty:
        return 0

    # New items per user in sequence order, appended to what is online now.
    ordered = events.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    grouped = ordered.groupby("user_id", sort=True)
    user_ids = [str(user_id) for user_id in grouped.groups]
    client = OnlineFeatureClient(store, max_seq_len=max_seq_len)
    current = dict(zip(user_ids, client.user_sequences(user_ids), strict=True))
    frame = _merged_sequences(grouped, current, max_seq_len)

    from feast.data_source import PushMode

    try:
        store.push(USER_RECENT_ITEMS_PUSH, frame, to=PushMode.ONLINE)
    except _unavailable_errors() as err:
        raise FeatureStoreUnavailable(
            f"cannot push {len(frame)} sequence(s) to {USER_RECENT_ITEMS_PUSH}: {err}"
        ) from err
    logger.info("pushed feature_view=%s users=%d", USER_RECENT_ITEMS, len(frame))
    return len(frame)


def _merged_sequences(
    grouped: Any, current: dict[str, list[str]], max_seq_len: int
) -> pd.DataFrame:
    """Rows for the push source: each user's online sequence plus its new items."""
    import pandas as pd

    records = []
    for user_id, group in grouped:
        items = [*current[str(user_id)], *group["item_id"].astype(str)][-max_seq_len:]
        records.append(
            {
                USER_JOIN_KEY: str(user_id),
                ITEM_SEQ: items,
                ITEM_SEQ_LEN: len(items),
                TIMESTAMP_FIELD: pd.Timestamp(group["timestamp"].max()),
            }
        )
    return pd.DataFrame.from_records(records)
