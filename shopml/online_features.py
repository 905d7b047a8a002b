"""Online feature reads of the model servers: defaults, one failure type, a Redis path.

``OnlineFeatureClient`` is what the model servers call. It reads a user's recent items
and activity features, gives unknown users and missing values defined defaults, and
turns every way the online store can fail into ``FeatureStoreUnavailable`` so a server
can fall back on popularity. On Redis it reads Feast's own hash layout directly
(``RedisFeatureReader``: one ``HMGET`` per user, Feast's key and value serialization)
after checking the applied feature views in the registry once; Feast stays the only
writer. ``read_online_features`` reads any feature service (users or items) through
Feast.

The store comes from ``shopml.feast_store``; the write path of live events,
``push_events``, is in ``shopml.feature_push``. Feast is imported lazily, so importing
this module is cheap.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from feature_repo import (
    ITEM_SEQ,
    SEEN_ITEMS,
    USER_ACTIVITY,
    USER_ACTIVITY_FLOAT_DEFAULTS,
    USER_ACTIVITY_INT_FEATURES,
    USER_JOIN_KEY,
    USER_RECENT_ITEMS,
)
from shopml.config import Settings
from shopml.feast_store import (
    check_join_keys,
    feature_service_join_keys,
    feature_store_from_settings,
)

if TYPE_CHECKING:
    import feast
    import redis

logger = logging.getLogger(__name__)


class FeatureStoreUnavailable(Exception):  # noqa: N818 - name fixed by the serving API
    """The online store cannot be reached, timed out, or holds no applied feature views.

    The original error is kept as ``__cause__``. Callers are expected to degrade (for
    example rank by popularity) rather than fail the request.
    """


def unavailable_errors() -> tuple[type[BaseException], ...]:
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


# Features of the recommender_serving service, as ``view:feature`` references.
SERVING_FEATURES = [
    f"{USER_RECENT_ITEMS}:{ITEM_SEQ}",
    *(f"{USER_ACTIVITY}:{name}" for name in USER_ACTIVITY_INT_FEATURES),
    *(f"{USER_ACTIVITY}:{name}" for name in USER_ACTIVITY_FLOAT_DEFAULTS),
    f"{USER_ACTIVITY}:{SEEN_ITEMS}",
]
_ACTIVITY_FEATURES = SERVING_FEATURES[1:-1]


@dataclass(frozen=True)
class UserFeatures:
    """One user's serving features, defaults applied.

    Attributes:
        item_seq: the most recent item ids, oldest first; ``[]`` for an unknown user.
        activity: every ``user_activity`` count, recency and price feature.
        seen_items: every distinct item the user touched up to the last features run
            (pushed events since then are in ``item_seq``); serving excludes
            ``excluded_items`` from recommendations.
    """

    item_seq: list[str]
    activity: dict[str, float | int]
    seen_items: list[str] = field(default_factory=list)

    @property
    def excluded_items(self) -> set[str]:
        """Items never to recommend to this user: everything seen, recent or not."""
        return set(self.item_seq) | set(self.seen_items)


class RedisFeatureReader:
    """Reads user features from Feast's Redis layout in one round trip per request.

    The layout is Feast's (``feast.infra.online_stores.redis``): one hash per entity
    whose key is the serialized entity key followed by the project name; each feature
    is the field ``mmh3("<view>:<name>")`` holding a serialized ``feast.types.Value``.
    Keys and fields are computed with Feast's own (private) helpers, so Feast's writes
    (materialize, push) are read unchanged; the integration tests compare every read
    with ``get_online_features`` to catch a layout change in a Feast upgrade.

    Args:
        client: a redis-py client on the online store's database.
        project: the Feast project (the key suffix).
        key_version: the store's entity key serialization version.
    """

    def __init__(self, client: redis.Redis, project: str, key_version: int = 3) -> None:
        from feast.infra.online_stores.helpers import _mmh3, _redis_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        self._client = client
        self._project = project
        self._key_version = key_version
        self._redis_key, self._entity_key, self._value = _redis_key, EntityKey, Value
        self._fields: dict[str, bytes] = {ref: _mmh3(ref) for ref in SERVING_FEATURES}

    @classmethod
    def from_store(
        cls, store: feast.FeatureStore, views: Sequence[feast.FeatureView]
    ) -> RedisFeatureReader | None:
        """The reader for a store whose layout it can read, else ``None``.

        Args:
            store: a feature store whose online store is Redis.
            views: the applied feature views that will be read.

        Returns:
            The reader; ``None`` (with a warning) for Redis Cluster or Sentinel,
            versioned online views or a view with a TTL, which only Feast applies.
        """
        from feast.infra.online_stores.redis import RedisOnlineStore
        from redis import Redis

        config = store.config.online_store
        is_versioned = store.config.registry.enable_online_feature_view_versioning
        has_ttl = [view.name for view in views if view.ttl not in (None, timedelta(0))]
        if str(config.redis_type.value) != "redis" or is_versioned or has_ttl:
            logger.warning(
                "online reads go through Feast: redis_type=%s versioned=%s "
                "views_with_ttl=%s",
                config.redis_type.value,
                is_versioned,
                has_ttl,
            )
            return None

        nodes, params = RedisOnlineStore._parse_connection_string(
            config.connection_string
        )
        client = Redis(host=nodes[0]["host"], port=int(nodes[0]["port"]), **params)
        return cls(client, store.project, store.config.entity_key_serialization_version)

    def redis_key(self, user_id: str) -> bytes:
        """The hash key of one user (Feast's ``_redis_key``)."""
        entity_key = self._entity_key(
            join_keys=[USER_JOIN_KEY], entity_values=[self._value(string_val=user_id)]
        )
        return bytes(self._redis_key(self._project, entity_key, self._key_version))

    def field(self, ref: str) -> bytes:
        """The hash field of a ``view:feature`` reference."""
        if ref not in self._fields:
            from feast.infra.online_stores.helpers import _mmh3

            self._fields[ref] = _mmh3(ref)
        return self._fields[ref]

    def read(self, refs: list[str], user_ids: list[str]) -> dict[str, list[Any]]:
        """Read features of several users, like ``get_online_features(...).to_dict()``.

        Args:
            refs: ``view:feature`` references.
            user_ids: pseudonyms.

        Returns:
            Feature name -> one value per user id; ``None`` where the store holds none.
        """
        fields = [self.field(ref) for ref in refs]
        # redis-py's stubs type keys as str; Feast's keys and fields are bytes.
        client: Any = self._client
        replies: list[list[bytes | None]]
        if len(user_ids) == 1:
            replies = [client.hmget(self.redis_key(user_ids[0]), fields)]
        else:
            with client.pipeline(transaction=False) as pipe:
                for user_id in user_ids:
                    pipe.hmget(self.redis_key(user_id), fields)
                replies = pipe.execute()

        names = [ref.split(":", 1)[1] for ref in refs]
        columns: dict[str, list[Any]] = {name: [] for name in names}
        for reply in replies:
            for name, blob in zip(names, reply, strict=True):
                columns[name].append(_decode_value(blob))
        return columns


def _decode_value(blob: bytes | None) -> Any:
    """A serialized ``feast.types.Value`` as a Python value; ``None`` when unset."""
    if not blob:
        return None
    from feast.protos.feast.types.Value_pb2 import Value

    value = Value()
    value.ParseFromString(blob)
    kind = value.WhichOneof("val")
    if kind is None or kind == "null_val":
        return None
    content = getattr(value, kind)
    return list(content.val) if kind.endswith("_list_val") else content


class OnlineFeatureClient:
    """Reads online features of users for the model servers.

    Unknown users and missing values get defaults, never an exception: an empty
    sequence, 0 for counts, -1.0 for ``days_since_last_event`` and 0.0 for
    ``avg_price``.

    Args:
        store: the feature store, usually from ``feature_store_from_settings``.
        max_seq_len: the most recent items returned per user.
        use_redis_fast_path: on a Redis online store, read Feast's hash layout
            directly (``RedisFeatureReader``) instead of through
            ``get_online_features``; other stores always go through Feast.

    Raises:
        ValueError: ``max_seq_len`` is below 1.
    """

    def __init__(
        self,
        store: feast.FeatureStore,
        *,
        max_seq_len: int = 50,
        use_redis_fast_path: bool = True,
    ) -> None:
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len={max_seq_len} must be at least 1")
        self.store = store
        self.max_seq_len = max_seq_len
        self.use_redis_fast_path = use_redis_fast_path
        # Decided on the first successful registry check, then kept.
        self._reader: RedisFeatureReader | None = None
        self._is_reader_decided = False

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
        rows = self._read([SERVING_FEATURES[0]], user_ids)
        return [self._sequence(value) for value in rows[ITEM_SEQ]]

    def user_activity(self, user_id: str) -> dict[str, float | int]:
        """The user's activity features: event counts per window, recency, prices.

        Args:
            user_id: the user's pseudonym.

        Returns:
            Every feature of the ``user_activity`` view, missing values replaced by
            their defaults.

        Raises:
            FeatureStoreUnavailable: the online store cannot be read.
        """
        return _activity(self._read(_ACTIVITY_FEATURES, [user_id]))

    def serving_features(self, user_id: str) -> UserFeatures:
        """Everything the recommender reads for one user, in one online request.

        Args:
            user_id: the user's pseudonym.

        Returns:
            The recent items and the activity features, defaults applied.

        Raises:
            FeatureStoreUnavailable: the online store cannot be read.
        """
        return self.serving_features_batch([user_id])[0]

    def serving_features_batch(self, user_ids: list[str]) -> list[UserFeatures]:
        """The serving features of several users, read in one online request.

        Args:
            user_ids: pseudonyms; duplicates and unknown users are allowed.

        Returns:
            One ``UserFeatures`` per user id, in the order given, defaults applied.

        Raises:
            FeatureStoreUnavailable: the online store cannot be read.
        """
        if not user_ids:
            return []
        rows = self._read(SERVING_FEATURES, user_ids)
        return [
            UserFeatures(
                self._sequence(rows[ITEM_SEQ][i]),
                _activity(rows, i),
                [str(item) for item in (rows[SEEN_ITEMS][i] or [])],
            )
            for i in range(len(user_ids))
        ]

    def _sequence(self, value: Any) -> list[str]:
        items = [str(item) for item in (value or [])]
        return items[-self.max_seq_len :]

    def _read(self, features: list[str], user_ids: list[str]) -> dict[str, list[Any]]:
        """One online read (fast path or Feast), store failures mapped to ours."""
        try:
            reader = self._redis_reader()
            if reader is not None:
                return reader.read(features, user_ids)
            response = self.store.get_online_features(
                features=features,
                entity_rows=[{USER_JOIN_KEY: user_id} for user_id in user_ids],
            )
            return dict(response.to_dict())
        except unavailable_errors() as err:
            raise FeatureStoreUnavailable(
                f"online store cannot serve {features[0].split(':')[0]} for "
                f"{len(user_ids)} user(s): {type(err).__name__}: {err}"
            ) from err

    def _redis_reader(self) -> RedisFeatureReader | None:
        """The fast reader once the registry shows the views it reads, else None."""
        if self._is_reader_decided:
            return self._reader
        if self.use_redis_fast_path and self.store.config.online_store.type == "redis":
            # Raises FeastObjectNotFoundException until the views are applied.
            views = [self.store.get_feature_view(name) for name in _USER_VIEWS]
            self._reader = RedisFeatureReader.from_store(self.store, views)
        self._is_reader_decided = True
        return self._reader


def read_online_features(
    store: feast.FeatureStore, service: str, entity_rows: list[dict[str, Any]]
) -> dict[str, list[Any]]:
    """Online features of a feature service for entity rows (users or items).

    Args:
        store: the feature store.
        service: a feature service name, e.g. ``search_serving``.
        entity_rows: one dict of join key values per entity.

    Returns:
        Feature name (and join key) -> one value per row; ``None`` for unknown
        entities.

    Raises:
        ValueError: a row lacks a join key of the service; the message names the
            key given and the keys expected.
        FeatureStoreUnavailable: the online store cannot be read.
    """
    try:
        join_keys = feature_service_join_keys(store, service)
        for row in entity_rows:
            check_join_keys(list(row), join_keys, "entity row")
        response = store.get_online_features(
            features=store.get_feature_service(service), entity_rows=entity_rows
        )
        return dict(response.to_dict())
    except unavailable_errors() as err:
        raise FeatureStoreUnavailable(
            f"online store cannot serve {service} for {len(entity_rows)} row(s): "
            f"{type(err).__name__}: {err}"
        ) from err


_USER_VIEWS = (USER_RECENT_ITEMS, USER_ACTIVITY)


def _activity(rows: dict[str, list[Any]], index: int = 0) -> dict[str, float | int]:
    """One user's activity features from a read, defaults for missing values."""
    activity: dict[str, float | int] = {}
    for name in USER_ACTIVITY_INT_FEATURES:
        value = rows[name][index]
        activity[name] = 0 if _is_missing(value) else int(value)
    for name, default in USER_ACTIVITY_FLOAT_DEFAULTS.items():
        value = rows[name][index]
        activity[name] = default if _is_missing(value) else float(value)
    return activity


def _is_missing(value: Any) -> bool:
    """A feature value the store did not have (None) or stored as missing (NaN)."""
    return value is None or (isinstance(value, float) and math.isnan(value))
