"""The Feast feature store of shopml, built from settings, and its services' join keys.

``feature_store_from_settings`` builds a ``feast.FeatureStore`` in Python (no
``feature_store.yaml``): the registry and SQLite online store live in
``settings.feast_dir`` on local runs; with S3 configured the registry is
``s3://<bucket>/feast/registry.pb`` and with Redis configured the online store is Redis.
``materialize`` runs in this process, as Kubernetes Jobs or on Ray, as
``settings.feast_batch_engine`` says (``_batch_engine_config``).

``feature_service_join_keys`` and ``check_join_keys`` are shared by the online reads
(``shopml.online_features``) and the point-in-time joins (``shopml.training_data``).
Feast is imported lazily (``import feast`` takes seconds), so importing this module is
cheap.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from feature_repo import PROJECT, TIMESTAMP_FIELD
from shopml.config import Settings

if TYPE_CHECKING:
    import feast

logger = logging.getLogger(__name__)


# Seconds a Redis read may block (connect and each command) before we give up.
REDIS_TIMEOUT_S = 1.0
# Seconds a reader trusts its cached copy of the registry before reloading it.
REGISTRY_CACHE_TTL_S = 60


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


# --- join keys of the applied feature services, for online reads and joins ------------


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
