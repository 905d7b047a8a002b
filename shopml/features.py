"""Feast feature store of shopml: the store from settings, online reads, training data.

``feature_store_from_settings`` builds a ``feast.FeatureStore`` in Python (no
``feature_store.yaml``): the registry and SQLite online store live in
``settings.feast_dir`` on local runs; with S3 configured the registry is
``s3://<bucket>/feast/registry.pb`` and with Redis configured the online store is Redis.

Online: ``OnlineFeatureClient`` is what the model servers call. It reads a user's recent
items and activity features, gives unknown users and missing values defined defaults,
and turns every way the online store can fail into ``FeatureStoreUnavailable`` so a
server can fall back on popularity. On Redis it reads Feast's own hash layout directly
(one ``HMGET`` per user, Feast's key and value serialization) after checking the applied
feature views in the registry once; Feast stays the only writer. ``push_events`` sends
fresh events through the push source.

Offline: ``training_examples`` runs a point-in-time join for an entity frame (checked
join keys, timestamps normalized to UTC by the rule in ``prepare_entity_frame``), and
``split_for_training`` gives the train stage its leave-one-out split with training
histories from the events or from Feast.

The module runs past 500 lines because the online client, the push path and the
training join share one set of names and error rules; each part reads on its own.
Feast is imported lazily (``import feast`` takes seconds), so importing this module is
cheap.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd

from feature_repo import (
    ITEM_SEQ,
    ITEM_SEQ_LEN,
    PROJECT,
    RECOMMENDER_TRAINING,
    SEEN_ITEMS,
    TIMESTAMP_FIELD,
    USER_ACTIVITY,
    USER_ACTIVITY_FLOAT_DEFAULTS,
    USER_ACTIVITY_INT_FEATURES,
    USER_JOIN_KEY,
    USER_RECENT_ITEMS,
    USER_RECENT_ITEMS_PUSH,
)
from shopml.config import Settings, load_settings
from shopml.sequences import MIN_EVAL_EVENTS, LeaveOneOutSplit, split_events

if TYPE_CHECKING:
    import feast
    import redis

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


def _batch_engine_config(settings: Settings) -> str | dict[str, Any]:
    """Feast's compute engine for ``materialize``: in-process, Kubernetes Jobs or Ray.

    With ``feast_batch_engine == "k8s"`` Feast (``KubernetesComputeEngine``) runs one
    indexed Job per feature view in this pod's namespace, with the components image,
    the ``feast-materializer`` ServiceAccount and the S3 credentials of the
    ``shopml-credentials`` Secret (manifests/components/feast-k8s-materialization).
    With ``"ray"`` see ``_ray_engine_config``.

    Raises:
        ValueError: ``k8s`` without S3 or Redis: Job pods cannot read the registry or
            write the online store from this pod's local files; ``ray`` on a
            cluster without Redis.
    """
    if settings.feast_batch_engine == "ray":
        return _ray_engine_config(settings)
    if settings.feast_batch_engine != "k8s":
        return "local"
    if settings.s3 is None or not settings.redis_url:
        raise ValueError(
            "feast_batch_engine='k8s' needs the registry on S3 and the online store "
            f"on Redis; SHOPML_S3_ENDPOINT={settings.s3 and settings.s3.endpoint!r} "
            f"SHOPML_REDIS_URL={settings.redis_url!r}"
        )
    try:  # where the kubelet mounts the pod's namespace; "shopml" off-cluster
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as file:
            namespace = file.read().strip()
    except OSError:
        namespace = "shopml"
    secret = "shopml-credentials"
    return {
        "type": "k8s",
        "namespace": namespace,
        "image": settings.image,
        "service_account_name": "feast-materializer",
        "labels": {
            "app.kubernetes.io/part-of": "shopml",
            "app.kubernetes.io/component": "feast-materializer",
        },
        "resources": {
            "requests": {"cpu": "500m", "memory": "1Gi"},
            "limits": {"cpu": "1", "memory": "2Gi"},
        },
        "env": [
            {"name": "FEAST_S3_ENDPOINT_URL", "value": settings.s3.endpoint_url},
            {"name": "AWS_ENDPOINT_URL", "value": settings.s3.endpoint_url},
            {"name": "AWS_DEFAULT_REGION", "value": settings.s3.region},
            *(
                {
                    "name": key,
                    "valueFrom": {"secretKeyRef": {"name": secret, "key": key}},
                }
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
            ),
        ],
        "max_parallelism": 8,
        "synchronous": True,  # the features stage ends once the online store is written
    }


# Ray tasks that write the online store at once: Redis takes parallel writers; the
# SQLite file of local runs takes one.
RAY_WRITE_CONCURRENCY = 4
# CPUs and object-store bytes of an in-process Ray (no ray_address): a features pod
# shares its node, and Ray would otherwise claim every core and 30% of the memory.
RAY_LOCAL_NUM_CPUS = 2
RAY_LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2


def _ray_engine_config(settings: Settings) -> dict[str, Any]:
    """Feast's Ray engine (``ray.engine``): a KubeRay cluster, or Ray in this process.

    The ``file`` offline store still reads the Parquet tables in this process (the
    driver); Ray's tasks then filter, deduplicate and write the online store, so with
    ``ray_address`` the Ray workers need Redis but not MinIO. Worker output reaches
    this process's log (``log_to_driver``): Feast 0.67 logs a failed online write on
    the worker and goes on (see docs/platform.md, "Scaling out").

    Raises:
        ValueError: a Ray cluster (``ray_address``) with the SQLite online store,
            a file the cluster's workers cannot reach.
    """
    ray_conf: dict[str, Any] = {"log_to_driver": True}
    if settings.ray_address is None:
        ray_conf |= {
            "num_cpus": RAY_LOCAL_NUM_CPUS,
            "object_store_memory": RAY_LOCAL_OBJECT_STORE_BYTES,
        }
    elif not settings.redis_url:
        raise ValueError(
            f"feast_batch_engine='ray' with ray_address={settings.ray_address!r} "
            "needs the online store on Redis (SHOPML_REDIS_URL); the cluster's "
            "workers cannot write this pod's SQLite file"
        )
    return {
        "type": "ray.engine",
        "ray_address": settings.ray_address,
        "write_concurrency": RAY_WRITE_CONCURRENCY if settings.redis_url else 1,
        "max_workers": RAY_LOCAL_NUM_CPUS if settings.ray_address is None else None,
        "enable_ray_logging": False,
        "ray_conf": ray_conf,
    }


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
        batch_engine=_batch_engine_config(settings),
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
        except _unavailable_errors() as err:
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


def check_join_keys(
    columns: Sequence[str], join_keys: Sequence[str], what: str
) -> None:
    """Raise when entity rows lack a join key, naming the keys given and expected.

    Args:
        columns: the keys (or columns) the caller passed.
        join_keys: the join keys the requested features need.
        what: what is being checked, for the message (``entity row``, ...).

    Raises:
        ValueError: a join key is missing.
    """
    missing = [key for key in join_keys if key not in columns]
    if missing:
        extra = sorted(
            str(column)
            for column in columns
            if column not in join_keys and column != TIMESTAMP_FIELD
        )
        raise ValueError(
            f"{what} lacks join key(s) {missing} and has key(s) {extra} that the "
            f"requested features do not use; expected join keys {sorted(join_keys)}"
        )


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
    except _unavailable_errors() as err:
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


def push_events(
    store: feast.FeatureStore, events: pd.DataFrame, max_seq_len: int = 50
) -> int:
    """Append new events to the users' online sequences through the push source.

    The users' current sequences are read from the online store, the new items are
    appended in ``(timestamp, item_id)`` order, the result is cut to the newest
    ``max_seq_len`` items and pushed online only (the offline table is rebuilt by the
    features stage from the curated events). Events that name no item (a search) are
    skipped, as in the sequences. Events must be newer than what is online: the Redis
    store ignores writes older than the value it holds.

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
    events = events[events["item_id"].notna() & (events["item_id"].astype(str) != "")]
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


# --- training data: point-in-time joins ----------------------------------------------

# Where the train stage takes its training histories from (see split_for_training).
TRAINING_SOURCES = ("events", "feast")
# Shift that turns "as of t" (Feast joins rows stamped <= t) into "strictly before t".
_JUST_BEFORE = pd.Timedelta(microseconds=1)


def prepare_entity_frame(
    entity_df: pd.DataFrame, join_keys: Sequence[str]
) -> pd.DataFrame:
    """Check an entity frame's join keys and bring its timestamps to UTC.

    Timestamp rule: timezone-aware timestamps are converted to UTC; timezone-naive
    ones (and ISO-8601 text without an offset) are taken to be UTC already, never local
    time, because every canonical table stores UTC. Other columns (labels) pass
    through.

    Args:
        entity_df: one row per training example: the join keys, ``event_timestamp``
            and any label columns.
        join_keys: the join keys the requested features need.

    Returns:
        A copy with ``event_timestamp`` as ``datetime64[us, UTC]``.

    Raises:
        ValueError: a join key or ``event_timestamp`` is missing, or a timestamp is
            null or unreadable.
    """
    check_join_keys(list(entity_df.columns), join_keys, "entity frame")
    if TIMESTAMP_FIELD not in entity_df.columns:
        raise ValueError(
            f"entity frame lacks {TIMESTAMP_FIELD!r}, the time each example is "
            f"observed at; it has columns {sorted(map(str, entity_df.columns))}"
        )

    frame = entity_df.copy()
    stamps = frame[TIMESTAMP_FIELD]
    try:
        if isinstance(stamps.dtype, pd.DatetimeTZDtype):
            stamps = stamps.dt.tz_convert("UTC")
        elif pd.api.types.is_datetime64_dtype(stamps.dtype):
            stamps = stamps.dt.tz_localize("UTC")
        elif pd.api.types.is_string_dtype(stamps.dtype) and all(
            isinstance(value, str) for value in stamps.dropna()
        ):
            stamps = pd.to_datetime(stamps, utc=True, format="ISO8601")
        else:  # Python datetimes, naive or aware, possibly mixed
            stamps = pd.to_datetime(stamps, utc=True)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"entity frame {TIMESTAMP_FIELD!r} is unreadable: {err}"
        ) from err
    if stamps.isna().any():
        row = int(np.flatnonzero(stamps.isna().to_numpy())[0])
        raise ValueError(
            f"entity frame {TIMESTAMP_FIELD!r} is null at row {row}; every example "
            "needs the time it is observed at"
        )
    frame[TIMESTAMP_FIELD] = stamps.astype("datetime64[us, UTC]")
    return frame


def feature_service_join_keys(store: feast.FeatureStore, service: str) -> list[str]:
    """The join keys of every feature view in a feature service.

    Raises:
        feast.errors.FeatureServiceNotFoundException: the service is not applied.
    """
    keys: set[str] = set()
    for projection in store.get_feature_service(service).feature_view_projections:
        view = store.get_feature_view(projection.name)
        keys.update(store.get_entity(name).join_key for name in view.entities)
    return sorted(keys)


def training_examples(
    store: feast.FeatureStore,
    entity_df: pd.DataFrame,
    *,
    service: str = RECOMMENDER_TRAINING,
) -> pd.DataFrame:
    """Point-in-time training data: each example gets the features as of its time.

    Feast joins, for every entity row, the newest feature row stamped at or before the
    row's ``event_timestamp``, so an example never sees an event after its own time.
    To see only what happened strictly before an event, pass the event time minus one
    microsecond (``training_cutoffs`` does).

    Args:
        store: the feature store with the service applied and its tables written.
        entity_df: join keys, ``event_timestamp`` (see ``prepare_entity_frame`` for the
            timezone rule) and any label columns.
        service: the feature service whose features are joined.

    Returns:
        The entity frame's rows in their original order with the service's features;
        ``item_seq`` is a list of item ids (``[]`` before a user's first event) and
        ``item_seq_len`` an integer.

    Raises:
        ValueError: a join key or timestamp problem (see ``prepare_entity_frame``).
    """
    frame = prepare_entity_frame(
        entity_df, feature_service_join_keys(store, service)
    ).assign(_entity_row=np.arange(len(entity_df)))

    joined = store.get_historical_features(
        entity_df=frame, features=store.get_feature_service(service)
    ).to_df()

    joined = joined.sort_values("_entity_row").drop(columns="_entity_row")
    joined = joined.reset_index(drop=True)
    if ITEM_SEQ in joined.columns:
        joined[ITEM_SEQ] = [
            [] if not isinstance(v, list | np.ndarray) else [str(i) for i in v]
            for v in joined[ITEM_SEQ]
        ]
        joined[ITEM_SEQ_LEN] = joined[ITEM_SEQ].map(len).astype("int64")
    logger.info("point-in-time join service=%s examples=%d", service, len(joined))
    return joined


def training_cutoffs(events: pd.DataFrame) -> pd.DataFrame:
    """Per user, the time its training history ends, for a point-in-time join.

    Events are ordered per user by ``(timestamp, item_id)`` as in
    ``shopml.sequences``. A user with at least 3 item events holds out the last two
    (validation and test targets): the cutoff is one microsecond before the
    validation event, so the history holds only what happened strictly before it.
    Other users are trained on everything: the cutoff is their last event time.

    Args:
        events: canonical events (``user_id``, ``item_id``, ``timestamp`` in UTC).

    Returns:
        ``user_id`` and ``event_timestamp``, one row per user, sorted by user.
    """
    named = events[events["item_id"].notna() & (events["item_id"].astype(str) != "")]
    ordered = named.astype({"user_id": str, "item_id": str}).sort_values(
        ["user_id", "timestamp", "item_id"], kind="stable"
    )
    by_user = ordered.groupby("user_id", sort=True)
    from_last = by_user.cumcount(ascending=False)  # 0: last event, 1: the one before
    size = by_user["item_id"].transform("size")

    is_eval = size >= MIN_EVAL_EVENTS
    valid_rows = ordered[is_eval & (from_last == 1)]
    last_rows = ordered[~is_eval & (from_last == 0)]
    cutoffs = pd.concat(
        [
            valid_rows.assign(
                **{TIMESTAMP_FIELD: valid_rows["timestamp"] - _JUST_BEFORE}
            ),
            last_rows.assign(**{TIMESTAMP_FIELD: last_rows["timestamp"]}),
        ]
    )
    return (
        cutoffs[[USER_JOIN_KEY, TIMESTAMP_FIELD]]
        .sort_values(USER_JOIN_KEY)
        .reset_index(drop=True)
    )


def feast_training_split(
    store: feast.FeatureStore, split: LeaveOneOutSplit, events: pd.DataFrame
) -> LeaveOneOutSplit:
    """Replace a split's training histories by point-in-time sequences from Feast.

    Targets, users and vocabulary stay those of ``split`` (leave-one-out by time);
    each history becomes the ``user_recent_items`` sequence as of the user's cutoff
    (``training_cutoffs``), so it holds at most the features stage's ``max_seq_len``
    newest items, and events sharing the validation event's timestamp are not in it.

    Args:
        store: the feature store built by the features stage from the same events.
        split: the leave-one-out split of ``events``.
        events: the curated events the split was built from.

    Returns:
        A copy of ``split`` with the Feast histories.

    Raises:
        ValueError: the store holds an item the split does not know (it was built
            from other data), or a user the join did not return.
    """
    examples = training_examples(store, training_cutoffs(events))
    sequences = dict(zip(examples[USER_JOIN_KEY], examples[ITEM_SEQ], strict=True))

    train_seqs = []
    for user_id in split.user_ids:
        if user_id not in sequences:
            raise ValueError(f"point-in-time join returned no row for user {user_id}")
        indices = [split.vocab.index_of(item) for item in sequences[user_id]]
        if None in indices:
            unknown = sequences[user_id][indices.index(None)]
            raise ValueError(
                f"feature store item {unknown!r} is not in the training vocabulary; "
                "run the features stage on the same curated data"
            )
        train_seqs.append(np.asarray(indices, dtype=np.int64))

    logger.info(
        "training histories from feast users=%d interactions=%d (events: %d)",
        len(train_seqs),
        sum(len(seq) for seq in train_seqs),
        sum(len(seq) for seq in split.train_seqs),
    )
    return replace(split, train_seqs=train_seqs)


def split_for_training(
    events: pd.DataFrame,
    catalog: pd.DataFrame | None,
    source: str = "events",
    settings: Settings | None = None,
) -> LeaveOneOutSplit:
    """The train stage's leave-one-out split, with histories from ``source``.

    Args:
        events: curated events.
        catalog: curated catalog (its items are ranked too).
        source: ``events``: full training histories from the events table;
            ``feast``: point-in-time histories from the offline feature store (see
            ``feast_training_split``; the features stage must have run on the same
            events).
        settings: where the feature store is; read from the environment when
            ``None``. Only used for ``feast``.

    Returns:
        The split; validation and test targets are the same for both sources.

    Raises:
        ValueError: an unknown ``source``, or Feast data that does not match.
    """
    if source not in TRAINING_SOURCES:
        raise ValueError(
            f"source={source!r} is not a training data source; use one of "
            f"{list(TRAINING_SOURCES)}"
        )
    split = split_events(events, catalog)
    if source == "events":
        return split
    store = feature_store_from_settings(settings or load_settings())
    return feast_training_split(store, split, events)
